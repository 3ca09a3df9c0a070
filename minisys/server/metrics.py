"""Server metrics rendered in the Prometheus text format (vLLM's names, ``minisys:`` prefix).

Gauges are read from the engine when /metrics is scraped (requests running
and waiting, KV blocks in use and free); counters and histograms are
updated by the routes as tokens stream out: prompt and generation tokens,
time to first token (TTFT), inter-token latency (ITL, one observation per
engine step that gave the request new tokens) and end-to-end latency.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram: ``counts[i]`` observations <= ``buckets[i]`` (plus +Inf = count)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i in range(bisect.bisect_left(self.buckets, value), len(self.buckets)):
            self.counts[i] += 1

    def render(self, name: str, help: str, labels: str) -> list[str]:
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        for le, c in zip(self.buckets, self.counts):
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {c}')
        out += [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}',
                f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"]
        return out


@dataclass
class ServerMetrics:
    model_name: str
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_success: dict[str, int] = field(default_factory=dict)   # finish_reason -> count
    requests_aborted: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))

    def finished(self, reasons: list[str]) -> None:
        for r in reasons:
            self.requests_success[r] = self.requests_success.get(r, 0) + 1

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text; ``gauges`` come from the engine (see `AsyncEngine.stats`)."""
        labels = f'model_name="{self.model_name}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float, extra: str = "") -> None:
            lines.extend([f"# HELP minisys:{name} {help}", f"# TYPE minisys:{name} {kind}"])
            lines.append(f"minisys:{name}{{{labels}{extra}}} {value}")

        for name, (help, value) in _gauge_help(gauges).items():
            metric(name, "gauge", help, value)
        metric("prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
        metric("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        metric("request_aborted_total", "counter", "Requests aborted (client gone).", self.requests_aborted)
        lines += ["# HELP minisys:request_success_total Finished requests by finish reason.",
                  "# TYPE minisys:request_success_total counter"]
        for reason, c in sorted(self.requests_success.items()):
            lines.append(f'minisys:request_success_total{{{labels},finished_reason="{reason}"}} {c}')
        lines += self.ttft.render("minisys:time_to_first_token_seconds", "Time to first token.", labels)
        lines += self.itl.render("minisys:inter_token_latency_seconds", "Time between streamed tokens.", labels)
        lines += self.e2e.render("minisys:e2e_request_latency_seconds", "Request latency, arrival to finish.",
                                 labels)
        return "\n".join(lines) + "\n"


_GAUGES = {
    "num_requests_running": "Sequences in the running batch.",
    "num_requests_waiting": "Sequences waiting to be scheduled.",
    "num_requests_in_engine": "Requests (all their sequences) not yet finished or aborted.",
    "kv_cache_usage_perc": "Fraction of KV blocks in use (1 = full).",
    "kv_blocks_total": "KV blocks in the pool.",
    "kv_blocks_free": "KV blocks free (including free blocks holding a cached prefix).",
}


def _gauge_help(gauges: dict[str, float]) -> dict[str, tuple[str, float]]:
    return {k: (_GAUGES.get(k, k), v) for k, v in gauges.items()}


def parse_metrics(text: str) -> dict[str, float]:
    """``{name: value}`` of the unlabelled-by-bucket samples (for tests and the lab): labels dropped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "_bucket{" in line:
            continue
        name, _, value = line.rpartition(" ")
        out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out
