"""Lab 07 tests: SSE parsing, request traces, latency metrics, Poisson arrivals, goodput.

Oracles: events and metrics worked out by hand; streams built here from a
random script, so the expected arrival time of every event is known by
construction (the time of the read holding its last byte), however the
bytes are split into reads; latency formulas recomputed with numpy;
Poisson arrivals checked statistically (mean gap, a Kolmogorov-Smirnov test
against the exponential distribution) rather than against one generator's
exact draws.
"""
from __future__ import annotations

import json
import math
import random
import types

import numpy as np
import pytest

from minisys.bench.metrics import RequestTrace


def reference_impl():
    from minisys.bench import metrics
    from minisys.bench.recorder import record_chunk
    from minisys.bench.sse_client import SSEDecoder

    def parse_sse(reads):
        dec, out = SSEDecoder(), []
        for t, b in reads:
            out += [(t, e) for e in dec.feed(b)]
        return out

    def trace_from_events(arrival, events):
        trace, saw_usage = RequestTrace(arrival=arrival), False
        for t, data in events:
            if data == "[DONE]":
                break
            payload = json.loads(data)
            record_chunk(trace, payload, t)
            saw_usage |= bool(payload.get("usage"))
            if trace.error:
                break
        if not saw_usage:
            trace.output_tokens = len(trace.token_times)
        return trace

    def latency_metrics(trace):
        return {"ttft": trace.ttft, "e2el": trace.e2el, "tpot": trace.tpot, "itls": trace.itls}

    def goodput(traces, duration, ttft_ms=None, tpot_ms=None):
        return metrics.summarize(traces, duration, metrics.SLO(ttft_ms=ttft_ms, tpot_ms=tpot_ms))["goodput"]

    return types.SimpleNamespace(parse_sse=parse_sse, trace_from_events=trace_from_events,
                                 latency_metrics=latency_metrics, poisson_arrivals=metrics.poisson_arrivals,
                                 goodput=goodput)


def sse(data: str, crlf=False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    return "".join(f"data: {line}{nl}" for line in data.split("\n")).encode() + nl.encode()


def completion_chunk(text):
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [
        {"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}, ensure_ascii=False)


# ----------------------------------------------------------------------------- parse_sse

@pytest.mark.points(2)
@pytest.mark.exercise("parse_sse")
def test_parse_sse_by_hand(impl):
    wire = (b'data: {"a": 1}\n\n'
            b': a comment\n'
            b'event: message\r\nid: 3\r\n'
            b'data:no space\r\n\r\n'
            b'data: two\ndata:  lines\n\n'
            b'\n'                                   # a blank line with no data: no event
            b'data: [DONE]\n\n')
    assert impl.parse_sse([(1.0, wire)]) == [(1.0, '{"a": 1}'), (1.0, "no space"), (1.0, "two\n lines"),
                                             (1.0, "[DONE]")]
    assert impl.parse_sse([(0.5, b"data: x\n"), (0.7, b"\n"), (0.9, b"data: unfinished\n")]) == [(0.7, "x")]


@pytest.mark.points(3)
@pytest.mark.exercise("parse_sse")
@pytest.mark.parametrize("seed", range(5))
def test_parse_sse_any_split_keeps_events_and_times(impl, seed):
    rng = random.Random(seed)
    texts = ["".join(rng.choice("ab \u00e9\u4e16\U0001f600") for _ in range(rng.randint(1, 4))) for _ in range(8)]
    pieces = [sse(completion_chunk(t), crlf=rng.random() < 0.5) for t in texts] + [sse("[DONE]")]
    wire = b"".join(pieces)
    ends = list(np.cumsum([len(p) for p in pieces]))            # byte offset where each event completes
    cuts = sorted(rng.sample(range(1, len(wire)), 12))
    bounds = [0] + cuts + [len(wire)]
    reads = [(float(i), wire[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    expected_times = [float(next(i for i, b in enumerate(bounds[1:]) if b >= e)) for e in ends]
    got = impl.parse_sse(reads)
    assert [d for _, d in got] == [completion_chunk(t) for t in texts] + ["[DONE]"]
    assert [t for t, _ in got] == expected_times


# ----------------------------------------------------------------------------- trace_from_events

@pytest.mark.points(2)
@pytest.mark.exercise("trace_from_events")
def test_trace_from_events_by_hand(impl):
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}})
    events = [(1.1, completion_chunk("")), (1.3, completion_chunk("The")), (1.4, completion_chunk(" sky")),
              (1.6, completion_chunk(" is blue")), (1.61, usage), (1.62, "[DONE]"), (9.0, completion_chunk("late"))]
    tr = impl.trace_from_events(1.0, events)
    assert isinstance(tr, RequestTrace) and tr.arrival == 1.0 and not tr.error
    assert tr.token_times == [1.3, 1.4, 1.6]
    assert (tr.output_tokens, tr.prompt_tokens) == (5, 6)


@pytest.mark.points(2)
@pytest.mark.exercise("trace_from_events")
def test_trace_without_usage_and_with_error(impl):
    tr = impl.trace_from_events(0.0, [(0.2, completion_chunk("a")), (0.3, completion_chunk("")),
                                      (0.5, completion_chunk("b")), (0.6, "[DONE]")])
    assert tr.token_times == [0.2, 0.5] and tr.output_tokens == 2
    two = json.dumps({"choices": [{"index": 0, "text": ""}, {"index": 1, "text": "x"}]})
    assert impl.trace_from_events(0.0, [(0.4, two), (0.5, "[DONE]")]).token_times == [0.4]
    err = json.dumps({"error": {"message": "prompt too long", "type": "BadRequestError", "param": None,
                                "code": 400}})
    tr = impl.trace_from_events(0.0, [(0.2, completion_chunk("a")), (0.3, err), (0.4, completion_chunk("b"))])
    assert tr.error == "prompt too long" and tr.token_times == [0.2]


# ----------------------------------------------------------------------------- latency_metrics

@pytest.mark.points(2)
@pytest.mark.exercise("latency_metrics")
def test_latency_metrics_by_hand(impl):
    m = impl.latency_metrics(RequestTrace(arrival=2.0, token_times=[2.5, 2.6, 2.9, 3.3], output_tokens=6))
    assert math.isclose(m["ttft"], 0.5) and math.isclose(m["e2el"], 1.3)
    assert math.isclose(m["tpot"], (1.3 - 0.5) / 5)                     # per token, not per chunk
    assert np.allclose(m["itls"], [0.1, 0.3, 0.4])
    one = impl.latency_metrics(RequestTrace(arrival=0.0, token_times=[0.3], output_tokens=1))
    assert math.isclose(one["ttft"], 0.3) and one["tpot"] is None and list(one["itls"]) == []


@pytest.mark.points(2)
@pytest.mark.exercise("latency_metrics")
def test_latency_metrics_random_against_numpy(impl):
    rng = np.random.default_rng(0)
    for _ in range(50):
        arrival = float(rng.uniform(0, 10))
        times = list(arrival + np.cumsum(rng.exponential(0.1, size=int(rng.integers(2, 30)))))
        n = len(times) + int(rng.integers(0, 5))
        m = impl.latency_metrics(RequestTrace(arrival=arrival, token_times=times, output_tokens=n))
        assert math.isclose(m["ttft"], times[0] - arrival)
        assert math.isclose(m["tpot"], (times[-1] - times[0]) / (n - 1))
        assert np.allclose(m["itls"], np.diff(times))


# ----------------------------------------------------------------------------- poisson_arrivals

@pytest.mark.points(3)
@pytest.mark.exercise("poisson_arrivals")
def test_poisson_arrivals_statistics(impl):
    from scipy import stats
    t = impl.poisson_arrivals(20000, rate=5.0, seed=1)
    assert len(t) == 20000 and t[0] == 0.0
    gaps = np.diff(t)
    assert (gaps >= 0).all()
    assert abs(gaps.mean() - 0.2) < 0.01                              # mean gap 1/rate
    assert stats.kstest(gaps, "expon", args=(0, 0.2)).pvalue > 1e-3   # exponential gaps
    counts = np.histogram(t, bins=np.arange(0, t[-1] - 1, 1.0))[0]    # requests per second: Poisson(5)
    assert abs(counts.mean() - 5) < 0.25 and abs(counts.var() - 5) < 0.75


@pytest.mark.points(2)
@pytest.mark.exercise("poisson_arrivals")
def test_poisson_arrivals_seed_inf_and_bad_rates(impl):
    assert impl.poisson_arrivals(10, 2.0, seed=3) == impl.poisson_arrivals(10, 2.0, seed=3)
    assert impl.poisson_arrivals(10, 2.0, seed=3) != impl.poisson_arrivals(10, 2.0, seed=4)
    assert list(impl.poisson_arrivals(7, math.inf)) == [0.0] * 7
    for bad in (0, -1.0):
        with pytest.raises(ValueError):
            impl.poisson_arrivals(3, bad)


# ----------------------------------------------------------------------------- goodput

@pytest.mark.points(2)
@pytest.mark.exercise("goodput")
def test_goodput_by_hand(impl):
    fast = RequestTrace(0.0, [0.1, 0.2, 0.3], 3)                  # ttft 100 ms, tpot 100 ms
    slow_start = RequestTrace(0.0, [0.9, 1.0], 2)                 # ttft 900 ms, tpot 100 ms
    slow_pace = RequestTrace(0.0, [0.1, 0.6, 1.1], 3)             # ttft 100 ms, tpot 500 ms
    single = RequestTrace(0.0, [0.15], 1)                         # no TPOT: meets any TPOT target
    failed = RequestTrace(0.0, [0.1], 1, error="HTTP 500")
    empty = RequestTrace(0.0, [], 0)
    traces = [fast, slow_start, slow_pace, single, failed, empty]
    assert math.isclose(impl.goodput(traces, 2.0, ttft_ms=200, tpot_ms=200), 2 / 2.0)
    assert math.isclose(impl.goodput(traces, 2.0, ttft_ms=200), 3 / 2.0)
    assert math.isclose(impl.goodput(traces, 4.0, tpot_ms=200), 3 / 4.0)
    assert math.isclose(impl.goodput(traces, 1.0), 4.0)
