"""Latency metrics against numpy and hand-computed values (vLLM's definitions)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minisys.bench.metrics import SLO, RequestTrace, percentile, poisson_arrivals, summarize


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100))
@settings(max_examples=200, deadline=None)
def test_percentile_equals_numpy(xs, p):
    assert math.isclose(percentile(xs, p), float(np.percentile(xs, p)), rel_tol=1e-9, abs_tol=1e-6)


def test_request_metrics_by_hand():
    r = RequestTrace(arrival=1.0, token_times=[1.5, 1.6, 1.8, 2.1], output_tokens=4, prompt_tokens=7)
    assert math.isclose(r.ttft, 0.5) and math.isclose(r.e2el, 1.1)
    assert math.isclose(r.tpot, (1.1 - 0.5) / 3)
    assert np.allclose(r.itls, [0.1, 0.2, 0.3])
    one = RequestTrace(arrival=0.0, token_times=[0.2], output_tokens=1)
    assert one.tpot is None and one.itls == []


def test_summary_and_goodput():
    a = RequestTrace(0.0, [0.1, 0.2, 0.3], 3, 5)          # ttft 100 ms, tpot 100 ms
    b = RequestTrace(0.0, [0.5, 0.6], 2, 5)               # ttft 500 ms, tpot 100 ms
    failed = RequestTrace(0.0, [], 0, 5, error="HTTP 500")
    s = summarize([a, b, failed], duration=2.0, slo=SLO(ttft_ms=200, tpot_ms=150))
    assert (s["completed"], s["failed"], s["output_tokens"]) == (2, 1, 5)
    assert math.isclose(s["output_throughput"], 2.5)
    assert math.isclose(s["mean_ttft_ms"], 300) and math.isclose(s["p50_ttft_ms"], 300)
    assert math.isclose(s["p99_ttft_ms"], float(np.percentile([100, 500], 99)))
    assert math.isclose(s["mean_itl_ms"], 100)
    assert math.isclose(s["goodput"], 0.5)                 # only a meets both SLOs, over 2 s


def test_poisson_arrivals_rate_and_seed():
    t = poisson_arrivals(20000, rate=4.0, seed=1)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() - 0.25) < 0.01   # exponential: mean = std
    assert t == poisson_arrivals(20000, rate=4.0, seed=1) and t != poisson_arrivals(20000, 4.0, seed=2)
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            poisson_arrivals(3, bad)
