"""The scheduling-policy interface: *who* goes next; the `Scheduler` decides *how*.

The scheduler (lessons 04–05) keeps one code path for the mechanics — slots,
blocks, the token budget, chunking, preemption by recompute. A policy answers
only these questions, each called by that one code path:

* `pick(waiting)` — which WAITING request is tried for admission next (the
  scheduler stops admitting when it does not fit: no one jumps the pick);
* `order_running(running)` — the running requests, most deserving first: on a
  block shortage the scheduler preempts from the *end* of this order;
* `displace(candidate, running)` — a running request to preempt so that the
  waiting ``candidate`` (which does not fit now) can start, or None: how a
  high-priority arrival gets into a full engine, or Andes pauses a request
  that is far ahead of its reader;
* `charge(req, prefill_tokens, decode_tokens)` — the service the scheduler
  just gave ``req`` this step (VTC counts it), called as each request is
  scheduled, so a policy sees its own effect within the step;
* `on_arrival(req, waiting)` — a new request joined (not a re-queue after
  preemption); `on_finish(req)` — it finished or was aborted.

Every policy keeps the scheduler's invariants: it only orders and chooses
among the requests it is shown; it never moves a request between queues
itself. So policies change the order of work, never the text of an answer
(greedy outputs under every policy equal the eager baseline's).

``clock`` is the scheduler's clock (seconds): wall time in a server, a
virtual step clock in the deterministic replays of `minisys.bench.scheduling`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from ..engine.config import EngineConfig
    from ..engine.request import Request
    from ..engine.scheduler import WaitingQueue


class SchedulingPolicy:
    """First come, first served: the base behaviour every policy refines (see the module docstring)."""

    name = "fcfs"
    preempts_for_waiting = False      # True: the scheduler asks `displace` when the picked request does not fit

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def on_arrival(self, req: Request, waiting: WaitingQueue) -> None:
        """A new request was queued (``req.arrival_time`` is set; ``req`` is in ``waiting``)."""

    def on_finish(self, req: Request) -> None:
        """``req`` finished or was aborted (it left the scheduler for good)."""

    def pick(self, waiting: WaitingQueue) -> Request:
        """The WAITING request to try next (``waiting`` is non-empty). FCFS: the head of the queue
        (preempted requests are re-queued at the head: they were admitted before anyone waiting)."""
        return waiting[0]

    def order_running(self, running: Sequence[Request]) -> list[Request]:
        """Running requests, most deserving first; shortage preempts from the end. FCFS: admission
        order, so the newest running request is preempted first (it has waited least)."""
        return list(running)

    def displace(self, candidate: Request, running: Sequence[Request]) -> Request | None:
        """A running request to preempt in favour of ``candidate``, or None. FCFS: never."""
        return None

    def charge(self, req: Request, prefill_tokens: int, decode_tokens: int) -> None:
        """``req`` was scheduled to compute this many prompt (prefill) and decode tokens."""


def make_policy(config: EngineConfig, clock: Callable[[], float]) -> SchedulingPolicy:
    """The policy named by ``config.scheduling_policy``, with its knobs from the config."""
    from .andes import AndesPolicy
    from .qoe import QoESpec
    from .priority import PriorityPolicy
    from .vtc import VTCPolicy
    name = config.scheduling_policy
    if name == "fcfs":
        return SchedulingPolicy(clock)
    if name == "priority":
        return PriorityPolicy(clock)
    if name == "vtc":
        return VTCPolicy(clock, config.vtc_input_weight, config.vtc_output_weight)
    if name == "andes":
        return AndesPolicy(clock, QoESpec(config.andes_ttft_s, config.andes_tds), config.andes_preempt_ahead_s)
    raise ValueError(f"unknown scheduling_policy {name!r}")
