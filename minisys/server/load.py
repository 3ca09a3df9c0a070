"""``GET /minisys/load``: this server's load, as a router reads it (lesson 14).

    {"free_blocks", "total_blocks", "block_size", "running", "waiting",
     "queued_demand_blocks", "prefix_queries", "prefix_hits"}

``queued_demand_blocks`` is what the waiting queue will ask of the pool when
it is admitted: the blocks of every waiting request's tokens (a waiting
request holds none; a preempted one is waiting again with its output so
far). A router's "freeness" (Llumnix) is ``free_blocks`` net of that demand.
``prefix_queries`` / ``prefix_hits`` are the allocator's counters since
start: full prompt blocks looked up in the prefix cache (a lookup stops at
a request's first miss) / found there.

Read off the engine thread, like the /metrics gauges: each value is one
attribute or ``len()``; the waiting queue is copied with a retry if the
engine thread resizes it meanwhile, so a report never waits behind a step.
"""
from __future__ import annotations


def _waiting_tokens(scheduler) -> list[int]:
    for _ in range(5):
        try:
            return [r.num_tokens for r in scheduler.waiting]
        except RuntimeError:                    # the engine thread changed the queue meanwhile
            continue
    return []


def load_report(engine) -> dict[str, int]:
    """The load report of an `LLMEngine` (see the module docstring)."""
    sched = engine.scheduler
    alloc = sched.allocator
    bs = alloc.block_size
    demand = sum(-(-n // bs) for n in _waiting_tokens(sched))
    return {"free_blocks": alloc.num_free, "total_blocks": alloc.num_blocks, "block_size": bs,
            "running": len(sched.running), "waiting": len(sched.waiting),
            "queued_demand_blocks": demand, "prefix_queries": alloc.queries, "prefix_hits": alloc.hits}
