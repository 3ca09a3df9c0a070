"""Quality of experience of a streamed answer (Andes, Liu et al. 2024), as one number in [0, 1].

A reader who asked at time ``a`` expects the first token after ``ttft``
seconds and then ``tds`` tokens per second (the *token delivery speed* they
can digest: reading, or listening to speech). Token ``j`` (1-based) is due at

    e_j = a + ttft + (j - 1) / tds                      (`due_times`)

The *expected* curve E(t) counts the tokens due by t; the *actual* curve A(t)
counts the tokens delivered by t. Tokens that arrive early do not help (the
reader cannot read ahead), so what the reader experiences is min(A, E), and

    QoE = ∫ min(A(t), E(t)) dt / ∫ E(t) dt     over [a, T],  T = max(t_L, e_L)

for an answer of L tokens delivered at t_1 <= ... <= t_L. QoE = 1 exactly when
every token arrives no later than it is due; a long wait for the first token
or a stall mid-answer lowers it, even when the mean TPOT looks fine.

Both curves are step functions, so the integrals are sums (`qoe`):
min(A, E)(t) = #{j : max(t_j, e_j) <= t} (both sequences are sorted), hence

    QoE = Σ_j (T - max(t_j, e_j)) / Σ_j (T - e_j).

`qoe_numeric` integrates the two curves on a fine grid instead: the oracle
the tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_TTFT_S = 1.0        # the reader waits one second for the first token
DEFAULT_TDS = 5.0           # tokens/s they digest: ~240 words/min of reading at ~1.3 tokens/word


@dataclass(frozen=True)
class QoESpec:
    """A request's expectation: first token within ``ttft`` s, then ``tds`` tokens/s.

    Errors name the server's request fields (``expected_ttft``, ``expected_tds``), which are these."""

    ttft: float = DEFAULT_TTFT_S
    tds: float = DEFAULT_TDS

    def __post_init__(self) -> None:
        for name in ("ttft", "tds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"expected_{name} must be a finite number >= 0, got {v!r}")
        if self.tds == 0:
            raise ValueError("expected_tds (tokens per second) must be > 0, got 0")

    def due(self, arrival: float, j: int) -> float:
        """e_j: when token ``j`` (1-based) is due for a request that arrived at ``arrival``."""
        return arrival + self.ttft + (j - 1) / self.tds


def due_times(arrival: float, n: int, spec: QoESpec) -> np.ndarray:
    """(n,) e_1 .. e_n."""
    return arrival + spec.ttft + np.arange(n) / spec.tds


def _check(arrival: float, times: Sequence[float]) -> np.ndarray:
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or len(t) == 0:
        raise ValueError("a timeline needs at least one delivered token")
    if np.any(np.diff(t) < 0) or t[0] < arrival:
        raise ValueError("token times must be sorted and not before the arrival")
    return t


def qoe(arrival: float, token_times: Sequence[float], spec: QoESpec = QoESpec()) -> float:
    """Andes' QoE of one answer whose tokens were delivered at ``token_times`` (closed form)."""
    t = _check(arrival, token_times)
    e = due_times(arrival, len(t), spec)
    end = max(t[-1], e[-1])
    expected = float(np.sum(end - e))
    if expected == 0.0:                  # a one-token answer due exactly when it came: nothing to wait for
        return 1.0 if t[-1] <= e[-1] else 0.0
    return float(np.sum(end - np.maximum(t, e)) / expected)


def qoe_numeric(arrival: float, token_times: Sequence[float], spec: QoESpec = QoESpec(),
                steps: int = 200_000) -> float:
    """The same QoE by integrating min(A, E) and E on a grid of ``steps`` points (the test oracle)."""
    t = _check(arrival, token_times)
    e = due_times(arrival, len(t), spec)
    end = max(t[-1], e[-1])
    grid = np.linspace(arrival, end, steps)
    actual = np.searchsorted(t, grid, side="right")          # A(t): tokens delivered by t
    expected = np.searchsorted(e, grid, side="right")        # E(t): tokens due by t
    area_e = np.trapezoid(expected, grid) if hasattr(np, "trapezoid") else np.trapz(expected, grid)
    area_a = (np.trapezoid if hasattr(np, "trapezoid") else np.trapz)(np.minimum(actual, expected), grid)
    return float(area_a / area_e) if area_e > 0 else 1.0
