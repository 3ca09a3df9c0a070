"""Lesson 14: beyond one engine. N replicas of the ordinary server behind a router.

* `replica`: start, watch and stop the replica processes (`minisys.parallel.workers`).
* `policies`: where a request goes: round_robin, least_loaded (Llumnix's freeness), prefix_affinity.
* `router`: the FastAPI router speaking the same OpenAI API, forwarding with httpx.

    python -m minisys serve --replicas 2 --routing-policy least_loaded
"""
