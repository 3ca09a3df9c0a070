"""Service per client, measured from what each step computed (lesson 08's fairness metric).

``W_u`` is the weighted tokens client u was served: every prompt token
computed costs ``w_in``, every decode token ``w_out`` (VTC's weights). The
meter reads each step's `SchedulerOutput` — what ran, not what a policy's
counters believe — so it measures any policy, FCFS included.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from ..engine.scheduler import SchedulerOutput


@dataclass
class ServiceMeter:
    """Cumulative weighted service per client (``totals``), step by step."""

    w_in: float = 1.0
    w_out: float = 2.0
    totals: dict[str, float] = field(default_factory=dict)

    def record(self, sched: SchedulerOutput) -> dict[str, float]:
        """Add one step's service; return this step's ``{client: weighted tokens}``."""
        step: dict[str, float] = {}
        for s in sched.scheduled:
            cost = (self.w_in if s.is_prefill else self.w_out) * s.num_tokens
            c = s.request.client_key
            step[c] = step.get(c, 0.0) + cost
        for c, v in step.items():
            self.totals[c] = self.totals.get(c, 0.0) + v
        return step


def max_service_gap(steps: Sequence[dict[str, float]], a: str, b: str,
                    backlogged: Iterable[bool] | None = None) -> float:
    """max over intervals [t1, t2) of |W_a(t1, t2) - W_b(t1, t2)|, from per-step service.

    With ``backlogged`` (one flag per step: both clients had waiting requests),
    only intervals inside one run of backlogged steps count — the paper's
    theorem speaks of clients backlogged throughout the interval. The
    difference D(t) = W_a(0, t) - W_b(0, t) makes it max D - min D per run.
    """
    flags = list(backlogged) if backlogged is not None else [True] * len(steps)
    if len(flags) != len(steps):
        raise ValueError("one backlogged flag per step")
    worst, d, lo, hi, inside = 0.0, 0.0, 0.0, 0.0, False
    for step, flag in zip(steps, flags):
        if not flag:
            inside = False
            continue
        if not inside:
            d, lo, hi, inside = 0.0, 0.0, 0.0, True
        d += step.get(a, 0.0) - step.get(b, 0.0)
        lo, hi = min(lo, d), max(hi, d)
        worst = max(worst, hi - lo)
    return worst
