"""Per-request latency metrics of an online workload, with vLLM's definitions.

Shared by the chunked-prefill benchmark (lesson 05, in-process engine) and
the serving benchmark (lesson 07, over HTTP). A `RequestTrace` records when
a request was sent and when each piece of its output arrived; everything
else is derived from it:

    TTFT  time to first token   = first_token_time - arrival
    E2EL  end-to-end latency    = last_token_time - arrival
    TPOT  time per output token = (E2EL - TTFT) / (output_tokens - 1)   (per request,
                                  first token excluded; undefined for 1 token)
    ITL   inter-token latency   = the gaps between consecutive output arrivals,
                                  pooled over all requests (one gap per arrival
                                  after the first; a chunk carrying several
                                  tokens is one arrival, as in vLLM's client)

Throughput is output tokens / wall duration; goodput is the number of
requests per second that met every stated SLO (DistServe's definition, as
vLLM's ``--goodput`` reports it). Percentiles interpolate linearly
(``numpy.percentile``'s default), so p50 of [1, 2, 3, 4] is 2.5.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class RequestTrace:
    """Timestamps (seconds, one clock) of one request.

    Invariants: ``arrival <= token_times[0] <= token_times[1] <= ...``;
    ``output_tokens >= len(token_times)`` (a chunk may carry several tokens).
    """

    arrival: float
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for a single token."""
        if self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default method); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def poisson_arrivals(num: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s from 0) of ``num`` requests at ``rate`` per second; rate=inf sends all at 0.

    Exponential gaps with mean 1/rate: a Poisson process, seeded.
    """
    if not rate > 0:                      # also refuses NaN
        raise ValueError("rate must be > 0 (use float('inf') to send everything at once)")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class SLO:
    """Latency targets in milliseconds; None means no target on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def met_by(self, r: RequestTrace) -> bool:
        if not r.ok:
            return False
        checks = [(self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot), (self.e2el_ms, r.e2el)]
        return all(limit is None or value is None or value * 1000 <= limit for limit, value in checks)


def summarize(traces: list[RequestTrace], duration: float, slo: SLO | None = None,
              percentiles: tuple[float, ...] = (50, 90, 99)) -> dict:
    """Aggregate metrics (times in ms) over the successful requests of one run of ``duration`` s."""
    ok = [r for r in traces if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    res: dict = {
        "requests": len(traces), "completed": len(ok), "failed": len(traces) - len(ok),
        "duration_s": duration,
        "input_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else math.nan,
        "output_throughput": out_tokens / duration if duration > 0 else math.nan,
    }
    series = {"ttft": [r.ttft for r in ok],
              "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [g for r in ok for g in r.itls],
              "e2el": [r.e2el for r in ok]}
    for name, xs in series.items():
        ms = [x * 1000 for x in xs]
        res[f"mean_{name}_ms"] = sum(ms) / len(ms) if ms else math.nan
        for p in percentiles:
            res[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    if slo is not None:
        good = sum(slo.met_by(r) for r in traces)
        res["goodput"] = good / duration if duration > 0 else math.nan
        res["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2el_ms": slo.e2el_ms}
    return res
