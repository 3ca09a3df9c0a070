"""Priority scheduling, vLLM's rule: lower ``priority`` value first, ties by arrival.

* Admission tries the waiting request with the smallest ``(priority, arrival)``.
* On a block shortage the running request with the largest key is preempted.
* A waiting request that does not fit (no seat or no blocks) displaces the
  running request with the largest key if that one has a strictly larger
  ``priority`` value: a high-priority arrival at a full engine starts at once.

Starvation is the price: a steady stream of urgent requests starves the rest
(the lesson's reason for fair share and QoE policies).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .policy import SchedulingPolicy

if TYPE_CHECKING:
    from ..engine.request import Request
    from ..engine.scheduler import WaitingQueue


def priority_key(req: Request) -> tuple[int, int]:
    return (req.priority, req.arrival)


class PriorityPolicy(SchedulingPolicy):
    name = "priority"
    preempts_for_waiting = True

    def pick(self, waiting: WaitingQueue) -> Request:
        return min(waiting, key=priority_key)

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        return sorted(running, key=priority_key)

    def displace(self, candidate: Request, running: Sequence[Request]) -> Request | None:
        if not running:
            return None
        victim = max(running, key=priority_key)
        return victim if victim.priority > candidate.priority else None
