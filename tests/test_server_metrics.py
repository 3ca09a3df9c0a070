"""/metrics: `ServerMetrics` over prometheus_client, one registry per app.

Oracles: bucket counts recomputed with numpy from the observed values;
counter values written out by hand; the exposition text read back with a
small line parser written here (not `parse_metrics`, which is under test
too); gauges from a stats function whose values the test sets.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from minisys.server.metrics import TTFT_BUCKETS, ServerMetrics, parse_metrics

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line of a text exposition (comments skipped)."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, line
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            out.append((m["name"], labels, float(m["value"])))
    return out


def scrape(metrics: ServerMetrics) -> str:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return body.decode()


def test_histogram_buckets_are_cumulative():
    rng = np.random.default_rng(0)
    values = rng.exponential(0.3, size=500)
    m = ServerMetrics("m")
    for v in values:
        m.ttft.observe(float(v))
    got = {labels["le"]: v for name, labels, v in samples(scrape(m))
           if name == "minisys:time_to_first_token_seconds_bucket"}
    assert [got[str(b)] for b in TTFT_BUCKETS] == [int((values <= b).sum()) for b in TTFT_BUCKETS]
    assert got["+Inf"] == 500
    flat = parse_metrics(scrape(m))
    assert flat["minisys:time_to_first_token_seconds_count"] == 500
    assert flat["minisys:time_to_first_token_seconds_sum"] == pytest.approx(values.sum())


def test_counters_and_finish_reasons_by_hand():
    m = ServerMetrics("smol")
    m.prompt_tokens.inc(7)
    m.prompt_tokens.inc(5)
    m.generation_tokens.inc(3)
    m.requests_aborted.inc()
    m.finished(["stop", "length", "stop"])
    text = scrape(m)
    assert all(labels.get("model_name") == "smol" for name, labels, _ in samples(text) if name.startswith("minisys:"))
    assert parse_metrics(text)["process_resident_memory_bytes"] > 1 << 20      # the process's own (soak bench)
    reasons = {labels["finished_reason"]: v for name, labels, v in samples(text)
               if name == "minisys:request_success_total"}
    assert reasons == {"stop": 2, "length": 1}
    flat = parse_metrics(text)
    assert (flat["minisys:prompt_tokens_total"], flat["minisys:generation_tokens_total"],
            flat["minisys:request_aborted_total"], flat["minisys:request_success_total"]) == (12, 3, 1, 3)
    for name in ("inter_token_latency_seconds_count", "e2e_request_latency_seconds_count"):
        assert flat["minisys:" + name] == 0


def test_gauges_are_read_at_scrape_time():
    stats = {"num_requests_running": 2, "num_requests_waiting": 5, "kv_cache_usage_perc": 0.25}
    m = ServerMetrics("m", lambda: dict(stats))
    assert parse_metrics(scrape(m))["minisys:num_requests_waiting"] == 5
    stats.update(num_requests_waiting=0, kv_cache_usage_perc=0.5)
    flat = parse_metrics(scrape(m))
    assert (flat["minisys:num_requests_running"], flat["minisys:num_requests_waiting"],
            flat["minisys:kv_cache_usage_perc"]) == (2, 0, 0.5)
    assert "# TYPE minisys:kv_cache_usage_perc gauge" in scrape(m)


def test_two_apps_in_one_process_do_not_share_metrics():
    a, b = ServerMetrics("same"), ServerMetrics("same", lambda: {"num_requests_running": 1})
    a.generation_tokens.inc(10)
    a.ttft.observe(0.2)
    fa, fb = parse_metrics(scrape(a)), parse_metrics(scrape(b))
    assert fa["minisys:generation_tokens_total"] == 10 and fb["minisys:generation_tokens_total"] == 0
    assert fb["minisys:time_to_first_token_seconds_count"] == 0
    assert "minisys:num_requests_running" in fb and "minisys:num_requests_running" not in fa


def test_openmetrics_when_asked():
    m = ServerMetrics("m")
    m.prompt_tokens.inc(4)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")
