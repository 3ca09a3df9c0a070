"""The serving benchmark's client against scripted streams and a fake local SSE server.

Oracles: SSE events written out by hand (the parser must give the same
events however the bytes are split); latencies computed by hand from a
scripted clock (exact) and from a fake server's scripted token delays
(within a tolerance for the event loop's scheduling on a busy machine);
send times checked against `poisson_arrivals` recomputed here.
"""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time

import pytest

from minisys.bench import serve, serve_report, server_process, sse_client
from minisys.bench.metrics import SLO, RequestTrace, poisson_arrivals, summarize
from minisys.bench.serve_workload import BenchRequest, make_requests

EVENTS = ['{"a": 1}', '{"b": "h\u00e9llo \u4e16\u754c \U0001f600"}', "line one\nline two", "[DONE]"]
WIRE = ('data: {"a": 1}\r\n\r\n'
        ': a comment line\n'
        'event: message\nid: 7\n'
        'data:{"b": "h\u00e9llo \u4e16\u754c \U0001f600"}\n\n'
        'data: line one\rdata: line two\r\r'
        'data: [DONE]\n\n').encode("utf-8")


def test_sse_decoder_whole_and_split_everywhere():
    assert sse_client.SSEDecoder().feed(WIRE) == EVENTS
    for cut in range(1, len(WIRE)):                       # inside CRLF, inside UTF-8 characters, everywhere
        d = sse_client.SSEDecoder()
        assert d.feed(WIRE[:cut]) + d.feed(WIRE[cut:]) == EVENTS, cut
    d = sse_client.SSEDecoder()
    assert [e for i in range(len(WIRE)) for e in d.feed(WIRE[i:i + 1])] == EVENTS


def chunk(text=None, usage=None, chat=False):
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}} if chat else
                                        {"index": 0, "text": text, "finish_reason": None}]
    return ("data: " + json.dumps({"choices": choices, "usage": usage}) + "\n\n").encode()


async def scripted(items):
    for item in items:
        yield item


def run_scripted(times_and_bytes, arrival=10.0):
    """consume_stream over chunks that 'arrive' at the given clock values."""
    clock_values = iter([t for t, _ in times_and_bytes])
    trace = RequestTrace(arrival=arrival)
    text = asyncio.run(sse_client.consume_stream(scripted([b for _, b in times_and_bytes]), trace,
                                            clock=lambda: next(clock_values)))
    return trace, text


def test_stream_metrics_by_hand():
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    trace, text = run_scripted([
        (10.05, chunk("", chat=True)),                   # role header, no text: not an arrival
        (10.20, chunk("He")),
        (10.30, chunk("llo")),
        (10.45, chunk(" wor") + chunk("ld")),             # two events, one read: two arrivals, one time
        (10.60, chunk("!")),
        (10.61, chunk(None, usage) + b"data: [DONE]\n\n"),
    ])
    assert text == "Hello world!" and trace.ok
    assert trace.token_times == [10.20, 10.30, 10.45, 10.45, 10.60]     # as vLLM's client counts them
    assert (trace.output_tokens, trace.prompt_tokens) == (5, 7)
    assert math.isclose(trace.ttft, 0.20) and math.isclose(trace.e2el, 0.60)
    assert math.isclose(trace.tpot, (0.60 - 0.20) / 4)
    assert all(math.isclose(a, b) for a, b in zip(trace.itls, [0.10, 0.15, 0.0, 0.15]))


def test_stream_without_usage_counts_chunks_and_errors_fail():
    trace, text = run_scripted([(1.0, chunk("a")), (1.5, chunk("b", chat=False)), (2.0, b"data: [DONE]\n\n")],
                               arrival=0.5)
    assert trace.output_tokens == 2 and text == "ab" and math.isclose(trace.ttft, 0.5)
    trace, _ = run_scripted([(1.0, chunk("a")), (1.1, b'data: {"error": {"message": "boom"}}\n\n')], arrival=0.5)
    assert trace.error == "boom" and not trace.ok
    trace, _ = run_scripted([(1.0, chunk("a"))], arrival=0.5)
    assert "without [DONE]" in trace.error


def test_request_body_follows_the_openai_api():
    cfg = sse_client.ClientConfig("http://x", model="m")
    body = sse_client.request_body(cfg, BenchRequest("hi", 9))
    assert body == {"model": "m", "prompt": "hi", "max_tokens": 9, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat_cfg = sse_client.ClientConfig("http://x", "m", "/v1/chat/completions", ignore_eos=False)
    chat = sse_client.request_body(chat_cfg, BenchRequest("hi", 9))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["max_completion_tokens"] == 9
    assert "max_tokens" not in chat and "ignore_eos" not in chat


def test_workload_is_seeded_and_within_ranges():
    a = make_requests(50, (3, 6), (10, 20), seed=4)
    assert a == make_requests(50, (3, 6), (10, 20), seed=4) != make_requests(50, (3, 6), (10, 20), 5)
    assert all(3 <= len(r.prompt.split()) <= 6 and 10 <= r.max_tokens <= 20 for r in a)
    assert serve.parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError):
        serve.parse_rates("0,1")
    assert serve.parse_slo(["ttft:100", "tpot:50"]) == SLO(ttft_ms=100, tpot_ms=50)


# ----------------------------------------------------------------------------- a fake server

# Scripted stream: (delay after the request was received, text); usage says 5 tokens
# (the 0.45 s chunk carries two). Expected: TTFT 200 ms, E2EL 600 ms,
# TPOT (600 - 200) / 4 = 100 ms, ITLs 100, 150, 150 ms.
SCRIPT = [(0.0, ""), (0.20, "He"), (0.30, "llo"), (0.45, " world"), (0.60, "!")]
TOL = 0.08


class FakeServer:
    """A minimal HTTP/1.1 server (asyncio streams) that streams SCRIPT as OpenAI-style SSE chunks.

    It records every request body and its receive time (time.perf_counter, the client's clock);
    a prompt "bad" gets a 400 in OpenAI's error shape.
    """

    def __init__(self):
        self.bodies, self.received = [], []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        t0 = time.perf_counter()
        method, path, _ = head.split("\r\n")[0].split(" ")
        length = next((int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length")), 0)
        body = json.loads(await reader.readexactly(length)) if length else None
        if method == "GET":
            payload = {"status": "ok"} if path == "/health" else {"object": "list", "data": [{"id": "fake"}]}
            data = json.dumps(payload).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(data), data))
        elif body["prompt"] == "bad":
            data = json.dumps({"error": {"message": "bad prompt", "type": "BadRequestError", "param": "prompt",
                                         "code": 400}}).encode()
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(data), data))
        else:
            self.bodies.append(body)
            self.received.append(t0)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n")
            for delay, text in SCRIPT:
                await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
                self._chunk(writer, chunk(text))
                await writer.drain()
            usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": 5, "total_tokens": 0}
            self._chunk(writer, chunk(None, usage) + b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    @staticmethod
    def _chunk(writer, data: bytes):
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def test_client_against_fake_server_reports_scripted_latencies(fake):
    reqs = [BenchRequest("one two three", 5) for _ in range(4)]
    cfg = sse_client.ClientConfig(fake.url)
    [summary] = serve.bench_url(cfg, reqs, [math.inf], seed=0, slo=SLO(ttft_ms=1000, tpot_ms=1000))
    assert cfg.model == "fake" and fake.bodies[-1]["model"] == "fake"     # taken from /v1/models
    assert fake.bodies[-1]["stream"] is True and fake.bodies[-1]["stream_options"] == {"include_usage": True}
    assert (summary["completed"], summary["failed"], summary["output_tokens"], summary["input_tokens"]) == (4, 0, 20, 12)
    assert abs(summary["p50_ttft_ms"] - 200) < TOL * 1000
    assert abs(summary["p50_e2el_ms"] - 600) < TOL * 1000
    assert abs(summary["mean_tpot_ms"] - 100) < TOL * 1000 / 4
    assert abs(summary["p50_itl_ms"] - 150) < TOL * 1000 and abs(summary["mean_itl_ms"] - 400 / 3) < TOL * 1000
    # all four ran concurrently: the run lasts about one request, not four
    assert summary["duration_s"] < 0.6 + 2 * TOL + 0.3
    assert math.isclose(summary["output_throughput"], 20 / summary["duration_s"])
    assert math.isclose(summary["goodput"], 4 / summary["duration_s"])


def test_poisson_send_times_and_failed_requests(fake):
    reqs = [BenchRequest("a b", 5) for _ in range(6)] + [BenchRequest("bad", 5)]
    cfg = sse_client.ClientConfig(fake.url, model="fake")
    traces, texts, duration = asyncio.run(sse_client.run_workload(cfg, reqs, rate=8.0, seed=3))
    offsets = poisson_arrivals(7, 8.0, seed=3)
    sent = sorted(t.arrival for t in traces)
    start = sent[0] - offsets[0]
    assert all(abs((s - start) - o) < TOL for s, o in zip(sent, offsets))
    assert texts[:6] == ["Hello world!"] * 6 and texts[6] == ""
    assert traces[6].error.startswith("HTTP 400") and "bad prompt" in traces[6].error
    s = summarize(traces, duration)
    assert (s["completed"], s["failed"]) == (6, 1)
    assert duration >= offsets[5] + 0.6 - TOL


def test_bench_url_sends_at_the_given_arrival_times(fake):
    """Lab 07 passes its own arrival generator: the sends must follow it, not the built-in Poisson one."""
    wanted = [0.0, 0.35, 0.7]
    calls = []

    def arrivals(num, rate, seed):
        calls.append((num, rate, seed))
        return wanted[:num]

    cfg = sse_client.ClientConfig(fake.url)
    [summary] = serve.bench_url(cfg, [BenchRequest("a b", 5)] * 3, [2.0], seed=7, slo=None, arrivals=arrivals)
    assert calls == [(3, 2.0, 7)] and summary["completed"] == 3
    sent = sorted(fake.received[-3:])
    assert all(abs((s - sent[0]) - w) < TOL for s, w in zip(sent, wanted))


def test_wait_healthy_reports_a_dead_server():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match="code 3"):
        server_process.wait_healthy(f"http://127.0.0.1:{server_process.free_port()}", proc, timeout=20)


def test_table_and_json_handle_inf_and_nan():
    s = {"rate": math.inf, "completed": 2, "output_throughput": 10.0, "p50_tpot_ms": math.nan}
    b = {"rate": math.inf, "completed": 2, "output_throughput": 2.0}
    text = serve_report.table({"minisys": [s], "eager": [b]}, baseline="eager")
    assert "minisys@inf" in text and "5.00x" in text
    strict = json.dumps(serve_report.jsonable({"r": [math.inf, math.nan, 1.0]}))
    assert json.loads(strict) == {"r": ["inf", "nan", 1.0]}


def test_run_async_works_inside_a_running_loop(fake):
    """A Jupyter kernel runs an event loop: bench_url must still work from there."""
    async def inside():
        return serve.bench_url(sse_client.ClientConfig(fake.url), [BenchRequest("x y", 5)], [math.inf], 0, None)
    [summary] = asyncio.run(inside())
    assert summary["completed"] == 1 and summary["output_tokens"] == 5
