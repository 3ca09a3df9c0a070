"""Lesson 14: beyond one engine. N replicas of the ordinary server behind a router, and KV moved between them.

* `replica`: start, watch and stop the replica processes (`minisys.parallel.workers`).
* `policies`: where a request goes: round_robin, least_loaded (Llumnix's freeness), prefix_affinity.
* `router`: the FastAPI router speaking the same OpenAI API, forwarding with httpx.
* `kv_transfer`: the KVConnector interface and its torch.distributed transport (disaggregated prefill/decode).
* `migration`: Llumnix's live migration in rounds.

    python -m minisys serve --replicas 2 --routing-policy least_loaded
"""
