"""Andes-style QoE scheduling (Liu et al., *Andes: Defining and Enhancing Quality-of-Experience in
LLM-Based Text Streaming Services*, 2024): give this step to the readers who would otherwise wait.

A request that arrived at ``a`` with ``d`` tokens delivered has its next token
due at e_{d+1} = a + ttft + d / tds (`minisys.scheduling.qoe`). A token now is
worth the reader's wait it saves: nothing to a request whose reader is still
``e_{d+1} - now`` seconds behind it, the most to the one whose reader has
waited longest. So the policy ranks every request by its next-token *due
time* (earliest first) — the greedy on QoE gain that Andes uses to
approximate its knapsack, with one seat of the batch per request as the
weight (minisys's batch is bounded by seats, ``max_num_seqs``, before memory):

* **pick**: the waiting request due soonest;
* **order_running**: due soonest first, so a block shortage preempts the one
  furthest ahead of its reader;
* **displace**: when the picked request does not fit, pause (preempt by
  recompute) the running request furthest ahead of its reader, if it is at
  least ``preempt_ahead_s`` seconds ahead and due later than the candidate.
  That request's reader still has ``preempt_ahead_s`` seconds of text to
  read: the seat serves someone who has nothing yet. The threshold keeps a
  paused request's recompute paid for by many tokens of reading.

No starvation. While a request waits, its due time does not move; every
request that arrives later than ``due - ttft`` ranks after it, and a paused
request is due at least ``preempt_ahead_s`` after the moment it was paused.
So a waiting request is passed over only by the finitely many requests due
before it, each holding a seat for at most its ``max_tokens`` decode steps:
with S seats and k requests due before it, it is admitted within
``ceil((k + 1) / S)`` rounds of at most ``max_tokens`` steps each (tested
with an endless stream of arrivals).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from .policy import SchedulingPolicy
from .qoe import QoESpec

if TYPE_CHECKING:
    from ..engine.request import Request
    from ..engine.scheduler import WaitingQueue

DEFAULT_PREEMPT_AHEAD_S = 2.0


class AndesPolicy(SchedulingPolicy):
    name = "andes"
    preempts_for_waiting = True

    def __init__(self, clock: Callable[[], float], default: QoESpec = QoESpec(),
                 preempt_ahead_s: float = DEFAULT_PREEMPT_AHEAD_S) -> None:
        super().__init__(clock)
        if not preempt_ahead_s >= 0:
            raise ValueError(f"preempt_ahead_s must be >= 0, got {preempt_ahead_s!r}")
        self.default, self.preempt_ahead_s = default, preempt_ahead_s

    def due(self, req: Request) -> float:
        """When the reader of ``req`` expects its next token (e_{d+1})."""
        spec = req.qoe or self.default
        return spec.due(req.arrival_time, len(req.output_token_ids) + 1)

    def gain(self, req: Request, now: float) -> float:
        """Seconds of reader's wait a token now saves: (now - e_{d+1})+ (0 for a reader still behind)."""
        return max(0.0, now - self.due(req))

    def _key(self, req: Request) -> tuple[float, int]:
        return (self.due(req), req.arrival)

    def pick(self, waiting: WaitingQueue) -> Request:
        return min(waiting, key=self._key)

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        return sorted(running, key=self._key)

    def displace(self, candidate: Request, running: Sequence[Request]) -> Request | None:
        if not running:
            return None
        victim = max(running, key=self._key)
        ahead = self.due(victim) - self.clock()
        if ahead >= self.preempt_ahead_s and self._key(candidate) < self._key(victim):
            return victim
        return None
