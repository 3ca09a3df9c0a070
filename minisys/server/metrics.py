"""Server metrics for ``GET /metrics``, with `prometheus_client` (vLLM's names, ``minisys:`` prefix).

Gauges are read from the engine when /metrics is scraped (requests running
and waiting, KV blocks in use and free: `EngineGauges`); counters and
histograms are updated by the routes as tokens stream out: prompt and
generation tokens, finished and aborted requests, time to first token
(TTFT), inter-token latency (ITL, one observation per engine step that gave
the request new tokens) and end-to-end latency. Failures are counted too:
``request_errors_total{code}`` (every 4xx/5xx answered, and an SSE error
event as ``"500"``) and ``engine_step_errors_total`` (engine steps that
raised, read from the engine). Every sample carries the label ``model_name``,
except the process's own (``process_resident_memory_bytes``, ``process_open_fds``,
... from `prometheus_client`'s ``ProcessCollector``, for the soak benchmark).

Invariant: each `ServerMetrics` owns its own ``CollectorRegistry``: no
global state, so two apps in one process (tests, a notebook) never share
or collide on a metric.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

PREFIX = "minisys:"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)

GAUGE_HELP = {
    "num_requests_running": "Sequences in the running batch.",
    "num_requests_waiting": "Sequences waiting to be scheduled.",
    "num_requests_in_engine": "Requests (all their sequences) not yet finished or aborted.",
    "kv_cache_usage_perc": "Fraction of KV blocks in use (1 = full).",
    "kv_blocks_total": "KV blocks in the pool.",
    "kv_blocks_free": "KV blocks free (including free blocks holding a cached prefix).",
}
ENGINE_COUNTERS = {"engine_step_errors": "Engine steps that raised (their requests were failed; see the log).",
                   "prefix_cache_queries": "Prompt tokens looked up in the prefix cache (whole blocks; vLLM's name).",
                   "prefix_cache_hits": "Prompt tokens found in the prefix cache, not recomputed (vLLM's name)."}


class EngineGauges(Collector):
    """The engine's gauges, read at scrape time from ``read()`` (`AsyncEngine.stats`): ``{name: value}``;
    the names in `ENGINE_COUNTERS` are counters (exposed as ``name_total``)."""

    def __init__(self, model_name: str, read: Callable[[], dict[str, float]]) -> None:
        self.model_name, self.read = model_name, read

    def collect(self) -> Iterator[Metric]:
        for name, value in self.read().items():
            if name in ENGINE_COUNTERS:
                family = CounterMetricFamily(PREFIX + name, ENGINE_COUNTERS[name], labels=["model_name"])
            else:
                family = GaugeMetricFamily(PREFIX + name, GAUGE_HELP.get(name, name), labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family


MAX_CLIENT_LABELS = 100      # per-client series at most (the rest summed under client="other")


class ClientService(Collector):
    """``client_service_tokens_total{client}``: weighted tokens each client was served (lesson 08:
    prompt tokens x w_in + decode tokens x w_out), read from the engine at scrape time. Clients are
    named by the request's ``user``, which anyone can set: only the ``MAX_CLIENT_LABELS`` most
    served get a series of their own, so a flood of names cannot blow up the scrape."""

    def __init__(self, model_name: str, read: Callable[[], dict[str, float]]) -> None:
        self.model_name, self.read = model_name, read

    def collect(self) -> Iterator[Metric]:
        totals = self.read()
        top = sorted(totals.items(), key=lambda kv: -kv[1])
        family = CounterMetricFamily(PREFIX + "client_service_tokens",
                                     "Weighted tokens served per client (the OpenAI user; '' if none).",
                                     labels=["model_name", "client"])
        for client, value in top[:MAX_CLIENT_LABELS]:
            family.add_metric([self.model_name, client], value)
        if len(top) > MAX_CLIENT_LABELS:
            family.add_metric([self.model_name, "other"], sum(v for _, v in top[MAX_CLIENT_LABELS:]))
        yield family


class ServerMetrics:
    """The server's metrics in a registry of its own.

    The routes call ``prompt_tokens.inc(n)``, ``generation_tokens.inc(n)``,
    ``requests_aborted.inc()``, ``ttft`` / ``itl`` / ``e2e.observe(seconds)``,
    `finished` and `error`; `render` is the scrape.
    """

    def __init__(self, model_name: str, gauges: Callable[[], dict[str, float]] | None = None,
                 client_service: Callable[[], dict[str, float]] | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        reg, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", label,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", label,
                                         registry=reg).labels(model_name)
        self.requests_aborted = Counter(PREFIX + "request_aborted", "Requests aborted (client gone).", label,
                                        registry=reg).labels(model_name)
        self._success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                label + ["finished_reason"], registry=reg)
        self._errors = Counter(PREFIX + "request_errors", "Requests answered with an error, by HTTP status "
                               "(an SSE error event counts as 500).", label + ["code"], registry=reg)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between streamed tokens.", label,
                             buckets=ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency, arrival to finish.", label,
                             buckets=E2E_BUCKETS, registry=reg).labels(model_name)
        if gauges is not None:
            reg.register(EngineGauges(model_name, gauges))
        if client_service is not None:
            reg.register(ClientService(model_name, client_service))
        ProcessCollector(registry=reg)        # process_resident_memory_bytes, open fds, CPU (the soak bench)

    def finished(self, reasons: list[str]) -> None:
        """Count one finished choice per finish reason given (``stop``, ``length``, ...)."""
        for reason in reasons:
            self._success.labels(self.model_name, reason).inc()

    def error(self, code: str) -> None:
        """Count one request answered with an error (``code``: the HTTP status, e.g. ``"429"``)."""
        self._errors.labels(self.model_name, code).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of a scrape; ``accept`` (the request's header) may ask for OpenMetrics."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def parse_metrics(text: str) -> dict[str, float]:
    """``{sample name: value}`` of a scrape, labels summed over, ``_bucket`` samples left out (tests, the lab)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
