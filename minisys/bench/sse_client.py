"""The SSE client of the online benchmark: streaming requests to any OpenAI-compatible server.

It POSTs ``/v1/completions`` (or ``/v1/chat/completions``) with
``stream=true`` and ``stream_options={"include_usage": true}``, reads the
server-sent events as the network delivers them (`SSEDecoder`, the WHATWG
event-stream format) and hands each JSON chunk to the recorder
(`recorder.record_chunk`) with the time of the read that completed it.
Requests are sent open loop at the times of an arrival process
(`metrics.poisson_arrivals` unless told otherwise).

Invariants: a request's trace ``arrival`` is the moment it was sent; a
request that fails (HTTP status, network error, an ``error`` event, a
stream without ``[DONE]``) has ``trace.error`` set and is never retried.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .metrics import RequestTrace, poisson_arrivals
from .recorder import record_chunk
from .serve_workload import BenchRequest

Clock = Callable[[], float]
Arrivals = Callable[[int, float, int], list]     # (num, rate, seed) -> send times in s from 0


class SSEDecoder:
    """Incremental server-sent-events parser (the WHATWG event-stream format).

    ``feed(bytes)`` returns the ``data`` of every event completed by those
    bytes. An event is a run of lines ended by a blank line; ``data:`` lines
    (one optional space after the colon is dropped) are joined with ``\\n``;
    comment lines (``:``) and other fields (``event``, ``id``, ``retry``) are
    ignored. Lines may end in ``\\n``, ``\\r\\n`` or ``\\r``, and a chunk may
    end anywhere (inside a line, inside a UTF-8 character): the rest is kept
    for the next ``feed``.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while True:
            cut = self._line_end()
            if cut is None:
                return events
            end, skip = cut
            line, self._buf = self._buf[:end].decode("utf-8"), self._buf[end + skip:]
            if line == "":
                if self._data:
                    events.append("\n".join(self._data))
                self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)

    def _line_end(self) -> tuple[int, int] | None:
        """(index, terminator length) of the first complete line, or None."""
        for i, b in enumerate(self._buf):
            if b == 0x0A:
                return i, 1
            if b == 0x0D:
                if i + 1 == len(self._buf):
                    return None                       # a lone \r at the end may be half of \r\n
                return i, 2 if self._buf[i + 1] == 0x0A else 1
        return None


async def consume_stream(chunks: AsyncIterator[bytes], trace: RequestTrace, clock: Clock = time.perf_counter) -> str:
    """Read an SSE byte stream into ``trace`` until ``[DONE]``; returns the generated text.

    Without a ``usage`` chunk, ``output_tokens`` falls back to the number of
    text chunks (exact for servers that send one token per chunk).
    """
    decoder, text, saw_usage, done = SSEDecoder(), [], False, False
    async for raw in chunks:
        now = clock()
        for data in decoder.feed(raw):
            if data.strip() == "[DONE]":
                done = True
                break
            payload = json.loads(data)
            saw_usage |= bool(payload.get("usage"))
            text.append(record_chunk(trace, payload, now))
        if done or trace.error:
            break
    if not done and not trace.error:
        trace.error = "stream ended without [DONE]"
    if not saw_usage:
        trace.output_tokens = len(trace.token_times)
    return "".join(text)



@dataclass
class ClientConfig:
    """Where and how to send: ``url`` is the server root (``http://host:port``)."""

    url: str
    model: str | None = None
    endpoint: str = "/v1/completions"
    temperature: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    max_concurrency: int | None = None


def request_body(cfg: ClientConfig, req: BenchRequest) -> dict:
    body = {"model": cfg.model, "max_tokens": req.max_tokens, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if cfg.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = body.pop("max_tokens")
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_one(client, cfg: ClientConfig, req: BenchRequest, clock: Clock = time.perf_counter
                   ) -> tuple[RequestTrace, str]:
    """Send one streaming request; the trace's arrival is the moment it was sent."""
    trace = RequestTrace(arrival=clock())
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        async with client.stream("POST", cfg.url.rstrip("/") + cfg.endpoint, json=request_body(cfg, req),
                                 headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                trace.error = f"HTTP {resp.status_code}: {body[:300]}"
                return trace, ""
            return trace, await consume_stream(resp.aiter_raw(), trace, clock)
    except Exception as exc:                               # network errors count as failed requests
        trace.error = f"{type(exc).__name__}: {exc}"
        return trace, ""


async def run_workload(cfg: ClientConfig, requests: list[BenchRequest], rate: float, seed: int = 0,
                       clock: Clock = time.perf_counter, arrivals: Arrivals = poisson_arrivals
                       ) -> tuple[list[RequestTrace], list[str], float]:
    """Send ``requests`` at ``arrivals(n, rate, seed)`` (Poisson by default) from the first send.

    Returns (traces, texts, duration from the first send to the last end).
    """
    import httpx
    offsets = arrivals(len(requests), rate, seed)
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = clock()

        async def fire(req: BenchRequest, offset: float):
            await asyncio.sleep(max(0.0, start + offset - clock()))
            if gate is None:
                return await send_one(client, cfg, req, clock)
            async with gate:
                return await send_one(client, cfg, req, clock)

        results = await asyncio.gather(*(fire(r, o) for r, o in zip(requests, offsets)))
        duration = clock() - start
    return [t for t, _ in results], [x for _, x in results], duration


def run_async(coro):
    """``asyncio.run(coro)``, also from inside a running event loop (a Jupyter kernel): then on a new thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:                       # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="minisys-bench-client")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def served_model(url: str) -> str:
    """The first model id of ``GET /v1/models``."""
    return get_json(url.rstrip("/") + "/v1/models")["data"][0]["id"]
