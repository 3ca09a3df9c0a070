# %% [markdown]
# # Lab 07: Serving
#
# Companion to `lessons/07-serving.md`. A server promises its clients a
# stream: the first token soon (TTFT), the next ones at a steady pace (TPOT,
# ITL), and the whole answer in bounded time (E2EL) while many clients share
# one engine. You will write the measuring side of that promise, the parts of
# an online benchmark client that do not need a server to be tested:
#
# 1. **`parse_sse`**: server-sent events off the wire, with the time each
#    event arrived;
# 2. **`trace_from_events`**: one request's trace (token arrival times and
#    token counts) from an OpenAI `/v1/completions` stream;
# 3. **`latency_metrics`**: TTFT, TPOT, ITL and E2EL of a trace, with vLLM's
#    definitions;
# 4. **`poisson_arrivals`**: when to send each request of an open-loop
#    workload;
# 5. **`goodput`**: requests per second that met every latency target.
#
# The last cells start the minisys server from this notebook (a subprocess),
# stream one request through your parser, then drive the server with the
# benchmark client (`minisys/bench/sse_client.py`, with *your* arrival generator)
# at increasing request rates, and do the same against the eager baseline
# behind the same API. The plot shows latency against load for both.
#
#     python -m minisys labs start 07     # once: copies this notebook to work/07-serving.ipynb
#     python -m minisys grade work/07-serving.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import json
import math
import os
import random

from minisys.bench.metrics import RequestTrace

# %% [markdown]
# ## 1. Server-sent events
#
# A streaming response is `Content-Type: text/event-stream`. Its body is a
# sequence of **events**, each a few lines ended by a blank line:
#
# ```
# data: {"choices": [{"index": 0, "text": " Paris"}]}
#
# : a comment line starts with a colon
# data: [DONE]
#
# ```
#
# Rules (a subset of the WHATWG spec that servers use): a line ends with
# `\n`, possibly preceded by `\r`; a `data:` line contributes its value (one
# space after the colon is dropped); an event with several `data:` lines
# joins their values with `\n`; lines starting with `:` and other fields
# (`event:`, `id:`, `retry:`) are ignored; a blank line ends the event (an
# event with no data is not reported).
#
# The network delivers the body in **reads** of arbitrary size: a read may
# hold three events, or half a line, or half of a UTF-8 character (an emoji
# is 4 bytes). Write `parse_sse(reads)`: given `[(time, bytes), ...]` in
# arrival order, return `[(time, data), ...]`, one per complete event, where
# `time` is the time of the read that **completed** the event. Decode UTF-8
# only once a line is complete.

# %%
def parse_sse(reads: list) -> list:
    """[(time, bytes)] network reads -> [(time, data str)] complete events."""
    events = []
    ### BEGIN SOLUTION
    buf, data = b"", []
    for t, chunk in reads:
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("utf-8").removesuffix("\r")
            if line == "":
                if data:
                    events.append((t, "\n".join(data)))
                data = []
            elif line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
    ### END SOLUTION
    return events


# %% tags=["benchmark"]
wire = 'data: {"choices": [{"text": "caf\u00e9 \U0001f600"}]}\n\n: keep-alive\n\ndata: [DONE]\n\n'.encode()
print(parse_sse([(0.1, wire[:30]), (0.2, wire[30:41]), (0.3, wire[41:])]))

# %% [markdown]
# ## 2. A request's trace
#
# With `"stream": true` an OpenAI `/v1/completions` server sends one JSON
# chunk per event, `{"choices": [{"index": 0, "text": "...", ...}], ...}`,
# then (with `"stream_options": {"include_usage": true}`) a chunk whose
# `usage` holds `prompt_tokens` and `completion_tokens`, then `data: [DONE]`.
#
# Write `trace_from_events(arrival, events)` returning a `RequestTrace`
# (`minisys/bench/metrics.py`) with `arrival` as given and:
#
# * `token_times`: the time of every event whose choices carry non-empty
#   text (concatenate `choice["text"]` over the choices; a chunk with empty
#   text, e.g. a UTF-8 character that is not complete yet, is no arrival);
# * `output_tokens` / `prompt_tokens` from the `usage` chunk; without one,
#   `output_tokens` is the number of text events;
# * an event whose JSON has an `"error"` object sets `trace.error` to its
#   `"message"` and ends the trace; `[DONE]` ends it too (ignore what follows).

# %%
def trace_from_events(arrival: float, events: list) -> RequestTrace:
    """A RequestTrace from [(time, data)] events of one /v1/completions stream."""
    trace = RequestTrace(arrival=arrival)
    ### BEGIN SOLUTION
    saw_usage = False
    for t, data in events:
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if isinstance(chunk.get("error"), dict):
            trace.error = chunk["error"].get("message", "error")
            break
        if "".join(c.get("text") or "" for c in chunk.get("choices") or []):
            trace.token_times.append(t)
        if chunk.get("usage"):
            saw_usage = True
            trace.output_tokens = chunk["usage"]["completion_tokens"]
            trace.prompt_tokens = chunk["usage"]["prompt_tokens"]
    if not saw_usage:
        trace.output_tokens = len(trace.token_times)
    ### END SOLUTION
    return trace


# %% [markdown]
# ## 3. Latency metrics (vLLM's definitions)
#
# For one successful trace (times in seconds):
#
# * **TTFT** = first token time − arrival: queueing + prefill, what a user
#   waits before anything appears;
# * **E2EL** = last token time − arrival;
# * **TPOT** = (E2EL − TTFT) / (output_tokens − 1): the mean pace after the
#   first token, per *token* (a chunk may carry several); `None` when
#   `output_tokens <= 1`;
# * **ITL** = the gaps between consecutive arrivals, a list (one gap per
#   arrival after the first). Pooled over requests, its p99 shows stalls (a
#   long prefill of someone else's request, lesson 05) that the mean TPOT hides.
#
# Write `latency_metrics(trace)` returning `{"ttft": ..., "e2el": ...,
# "tpot": ..., "itls": [...]}`.

# %%
def latency_metrics(trace: RequestTrace) -> dict:
    """TTFT, E2EL, TPOT (None for a single token) and the ITL gaps of one trace, in seconds."""
    ### BEGIN SOLUTION
    t = trace.token_times
    ttft, e2el = t[0] - trace.arrival, t[-1] - trace.arrival
    tpot = (e2el - ttft) / (trace.output_tokens - 1) if trace.output_tokens > 1 else None
    return {"ttft": ttft, "e2el": e2el, "tpot": tpot, "itls": [b - a for a, b in zip(t, t[1:])]}
    ### END SOLUTION


# %% tags=["benchmark"]
demo_events = [(0.05, '{"choices": [{"text": ""}]}'), (0.25, '{"choices": [{"text": "The"}]}'),
               (0.30, '{"choices": [{"text": " sky"}]}'), (0.42, '{"choices": [{"text": " is blue"}]}'),
               (0.43, '{"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 4}}'), (0.43, "[DONE]")]
demo_trace = trace_from_events(0.0, demo_events)
print(demo_trace)
print(latency_metrics(demo_trace))    # ttft 0.25, e2el 0.42, tpot (0.42-0.25)/3, itls [0.05, 0.12]

# %% [markdown]
# ## 4. Open-loop arrivals
#
# A benchmark that waits for each answer before sending the next question
# (closed loop) can never overload the server, so it never shows what users
# see at peak. Serving benchmarks send **open loop**: requests arrive at
# times drawn from a **Poisson process** of rate λ requests/s, whatever the
# server is doing. The gaps between arrivals are independent exponentials
# with mean 1/λ.
#
# Write `poisson_arrivals(num, rate, seed)`: `num` send times in seconds from
# 0, the first at 0, each next one a seeded exponential gap later
# (`random.Random(seed).expovariate(rate)`); `rate = inf` sends everything at
# 0 (the saturation test); `rate <= 0` raises `ValueError`.

# %%
def poisson_arrivals(num: int, rate: float, seed: int = 0) -> list:
    """Send times (s) of num requests at rate per second (Poisson); inf -> all at 0."""
    ### BEGIN SOLUTION
    if not rate > 0:
        raise ValueError("rate must be > 0")
    if math.isinf(rate):
        return [0.0] * num
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out
    ### END SOLUTION


# %% [markdown]
# ## 5. Goodput
#
# Throughput counts every token, even those that came too late to be useful.
# DistServe's **goodput** counts only requests that met their service-level
# objectives: the number of requests with TTFT ≤ `ttft_ms` **and** TPOT ≤
# `tpot_ms`, per second of the run (a target that is `None` is not checked;
# a request with a single token has no TPOT and meets any TPOT target; a
# failed request — `trace.error` set or no tokens — never counts).
#
# Write `goodput(traces, duration, ttft_ms, tpot_ms)` in requests/s.

# %%
def goodput(traces: list, duration: float, ttft_ms=None, tpot_ms=None) -> float:
    """Requests per second that met every given SLO (milliseconds)."""
    ### BEGIN SOLUTION
    good = 0
    for tr in traces:
        if tr.error or not tr.token_times:
            continue
        m = latency_metrics(tr)
        if ttft_ms is not None and m["ttft"] * 1000 > ttft_ms:
            continue
        if tpot_ms is not None and m["tpot"] is not None and m["tpot"] * 1000 > tpot_ms:
            continue
        good += 1
    return good / duration
    ### END SOLUTION


# %% [markdown]
# ## 6. A real server, a real stream
#
# Now the server: `python -m minisys serve --engine llm` (continuous
# batching, paged KV cache) in a subprocess on a free port.
# `minisys.bench.server_process.launched_server` starts it, waits until `GET /health`
# answers, and stops it when the `with` block ends, even on an error. First
# one request, read with `httpx` exactly as the benchmark reads it: every
# network read stamped with the clock, then your three functions.

# %% tags=["benchmark"]
import time

import httpx

from minisys.bench.metrics import SLO
from minisys.bench.serve import bench_url
from minisys.bench.serve_report import plot, table
from minisys.bench.serve_workload import make_requests
from minisys.bench.server_process import launched_server
from minisys.bench.sse_client import ClientConfig, run_async, served_model

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
requests = make_requests(4 if quick else 16, (4, 16), (8, 16) if quick else (32, 64), seed=0)
rates = [2.0, math.inf] if quick else [0.25, 0.5, 1.0, 2.0, math.inf]


async def one_stream(url, prompt, max_tokens):
    body = {"model": served_model(url), "prompt": prompt, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    reads = []
    async with httpx.AsyncClient(timeout=None) as client:
        arrival = time.perf_counter()
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            async for raw in resp.aiter_raw():
                reads.append((time.perf_counter(), raw))
    return arrival, reads


results = {}
for name, engine in [("minisys", "llm"), ("eager", "eager")]:
    with launched_server(["--engine", engine]) as url:
        if name == "minisys":
            arrival, reads = run_async(one_stream(url, "The three primary colors are", 12))
            events = parse_sse(reads)
            trace = trace_from_events(arrival, events)
            text = "".join(c["text"] for _, d in events if d != "[DONE]" for c in json.loads(d)["choices"])
            print(f"{len(reads)} reads, {len(events)} events, text {text!r}")
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in latency_metrics(trace).items()
                   if k != "itls"}, f"{len(trace.token_times)} arrivals, {trace.output_tokens} tokens")
        results[name] = bench_url(ClientConfig(url), requests, rates, seed=0, slo=SLO(2000, 200),
                                  arrivals=poisson_arrivals)    # the benchmark sends at YOUR arrival times
    print(table({name: results[name]}))

# %% [markdown]
# ## 7. Latency against load
#
# Each point is one run of the same seeded workload at one request rate
# (`inf`: all at once). Below the server's capacity latency stays flat;
# past it the queue grows for as long as requests keep coming, and TTFT
# grows with it. The eager server runs one request at a time, so its
# capacity is one request's decode speed; continuous batching shares each
# step among all running requests, so its capacity is many times higher
# while each request's TPOT grows only a little.

# %% tags=["benchmark"]
from pathlib import Path

from IPython.display import Image, display

path = plot(results, Path("lab_outputs/lab07_latency_vs_rate.png"),
            f"{len(requests)} requests: minisys vs eager server")
print(table(results, baseline="eager"))
print("plot:", path)
display(Image(str(path)))               # inline in Jupyter; the file stays in lab_outputs/
