"""Online serving benchmark: streaming requests to an OpenAI-compatible server.

    python -m minisys bench serve --url http://127.0.0.1:8000 --rate 4 --num-prompts 64
    python -m minisys bench serve --url http://127.0.0.1:8000 --rates 1,2,4,inf   # sweep + plot
    python -m minisys bench serve --compare              # minisys vs eager vs transformers, one run

Default workload: 64 requests, prompts of 8-32 random words, 32-64 output
tokens, greedy, ``ignore_eos``, seed 0 (``MINISYS_QUICK=1``: 8 requests,
4-16 words, 8-16 tokens); default rate inf (saturation).

The client works against ANY OpenAI-compatible server (minisys, vLLM, ...):
it POSTs ``/v1/completions`` with ``stream=true`` and
``stream_options={"include_usage": true}`` and reads the server-sent events
as they arrive. Requests are sent at Poisson arrival times
(`metrics.poisson_arrivals`; ``rate=inf`` sends them all at once, which
measures throughput at saturation). Each request becomes a
`metrics.RequestTrace`: its send time and the arrival time of every SSE chunk
that carries text; ``output_tokens`` comes from the server's ``usage``
(``completion_tokens``), as in vLLM's ``benchmark_serving``. `metrics.summarize`
turns the traces into TTFT, TPOT, ITL, E2EL (mean/p50/p90/p99), output
throughput and goodput under ``--goodput`` SLOs: vLLM's definitions.

``--compare`` launches the servers itself, one after another, as
subprocesses on free ports (``python -m minisys serve --engine llm`` and
``--engine eager``), runs the same seeded workload on each, and then
transformers' own continuous batching (``generate_batch``'s manager, driven
in-process with the same arrivals, same weights; no HTTP in that path), and
prints a table with ratios against the eager server.

Invariants: the workload (prompts, output lengths, arrival times) depends
only on the seed and sizes; every request asks for ``ignore_eos`` so each
system produces exactly the requested number of tokens (a server that does
not know the field must ignore it; minisys and vLLM honour it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

from .common import quick_mode, save_result
from .metrics import SLO, RequestTrace, poisson_arrivals, summarize

Clock = Callable[[], float]

# A fixed word list: prompts are random words, so any tokenizer can encode them.
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be had it not "
         "or have one first new their after but who they has been two its time her year during city may "
         "river house music system model light water small early world power story field heavy green").split()


# ----------------------------------------------------------------------------- workload

@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: a text prompt and the exact number of tokens to generate."""

    prompt: str
    max_tokens: int


def make_requests(num: int, input_words: tuple[int, int], output_tokens: tuple[int, int],
                  seed: int = 0) -> list[BenchRequest]:
    """``num`` requests with uniform random prompt lengths (in words) and output lengths, seeded."""
    rng = random.Random(seed)
    return [BenchRequest(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*input_words))),
                         rng.randint(*output_tokens)) for _ in range(num)]


def parse_rates(text: str) -> list[float]:
    """'1,2,inf' -> [1.0, 2.0, inf]."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise ValueError(f"rates must be > 0 (inf allowed): {text!r}")
    return rates


# ----------------------------------------------------------------------------- SSE parsing

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


def chunk_text(payload: dict) -> str:
    """The text a completion or chat-completion chunk carries (all choices)."""
    parts = []
    for choice in payload.get("choices") or []:
        parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def record_chunk(trace: RequestTrace, payload: dict, now: float) -> str:
    """Apply one JSON chunk to ``trace``; returns its text.

    An event with text is one arrival (``token_times``), stamped with the
    time of the network read that completed it (two events in one read are
    two arrivals at one time: vLLM's client counts them the same way); an
    event with empty text (a role header, a UTF-8 character not yet
    complete) is not an arrival.
    ``usage`` sets the token counts; an ``error`` object fails the request.
    """
    if isinstance(payload.get("error"), dict):
        trace.error = payload["error"].get("message") or "error"
        return ""
    text = chunk_text(payload)
    if text:
        trace.token_times.append(now)
    usage = payload.get("usage")
    if usage:
        trace.output_tokens = int(usage.get("completion_tokens") or 0)
        trace.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return text


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


# ----------------------------------------------------------------------------- the client

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
                       clock: Clock = time.perf_counter) -> tuple[list[RequestTrace], list[str], float]:
    """Send ``requests`` at Poisson times; returns (traces, texts, duration from first send to last end)."""
    import httpx
    offsets = poisson_arrivals(len(requests), rate, seed)
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


def bench_url(cfg: ClientConfig, requests: list[BenchRequest], rates: list[float], seed: int,
              slo: SLO | None, warmup: bool = True) -> list[dict]:
    """One summary per rate (after one short warm-up request), against the server at ``cfg.url``."""
    if cfg.model is None:
        cfg.model = served_model(cfg.url)
    if warmup:
        traces, _, _ = run_async(run_workload(cfg, [BenchRequest("warm up", 4)], math.inf))
        if not traces[0].ok:
            raise RuntimeError(f"warm-up request failed: {traces[0].error}")
    out = []
    for rate in rates:
        traces, _, duration = run_async(run_workload(cfg, requests, rate, seed))
        summary = summarize(traces, duration, slo)
        summary["rate"] = rate
        errors = sorted({t.error for t in traces if t.error})
        if errors:
            summary["errors"] = errors[:5]
        out.append(summary)
    return out


# ----------------------------------------------------------------------------- servers as subprocesses

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Poll ``GET /health`` until 200; raise if the process dies or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy:\n{tail}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout:.0f} s")


@contextmanager
def launched_server(args: list[str], timeout: float = 300.0, log_dir: str | None = None) -> Iterator[str]:
    """Start ``python -m minisys serve ARGS --port P`` on a free loopback port; yield its URL; stop it.

    The server's output goes to a log file (a pipe nobody reads could fill and
    block it). On exit the process gets SIGTERM, then SIGKILL after 10 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(log_dir or tempfile.mkdtemp(prefix="minisys-serve-")) / f"server-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "minisys", "serve", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, timeout, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- transformers' continuous batching

def transformers_available() -> str | None:
    """None if transformers has continuous batching (``generate_batch``), else why not."""
    try:
        from transformers import GenerationMixin
    except Exception as exc:                               # pragma: no cover - transformers is a test dependency
        return f"transformers not importable: {exc}"
    if not hasattr(GenerationMixin, "init_continuous_batching"):
        import transformers
        return f"transformers {transformers.__version__} has no continuous batching (generate_batch)"
    return None


def bench_transformers(requests: list[BenchRequest], rates: list[float], seed: int, slo: SLO | None) -> list[dict]:
    """The same workload on transformers' ContinuousBatchingManager (in-process, greedy, EOS off).

    The manager behind ``generate_batch`` runs its own loop in a thread; we add
    each request at its Poisson time and read ``record_timestamps``'s per-token
    times (one arrival per token: no HTTP and no SSE in this path).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    from ..model.store import fetch_gguf
    from .throughput import load_hf
    os.environ.setdefault("TQDM_DISABLE", "1")             # the GGUF de-quantization progress bar
    path = fetch_gguf(quiet=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = load_hf("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    ids = [tok(r.prompt)["input_ids"] for r in requests]
    max_new = max(r.max_tokens for r in requests)
    hints = WorkloadHints(max_prompt_length=max(map(len, ids)), max_generated_length=max_new,
                          num_requests=len(ids))            # as generate_batch sizes its cache
    manager = hf.init_continuous_batching(generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=max_new, eos_token_id=-1), workload_hints=hints)
    if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()
    manager.start()
    try:
        _hf_run(manager, [[1, 2, 3]], [4], [0.0], "warm")
        out = []
        for rate in rates:
            offsets = poisson_arrivals(len(requests), rate, seed)
            traces, duration = _hf_run(manager, ids, [r.max_tokens for r in requests], offsets, f"r{rate}")
            out.append({**summarize(traces, duration, slo), "rate": rate})
        return out
    finally:
        manager.stop(block=True, timeout=30)


def _hf_run(manager, ids: list[list[int]], max_tokens: list[int], offsets: list[float], tag: str):
    """(traces, duration): add requests at ``offsets`` from a thread, collect the finished outputs."""
    traces = {f"{tag}-{i}": RequestTrace(arrival=math.nan) for i in range(len(ids))}
    start = time.perf_counter()

    def feed():
        for i, (p, n, off) in enumerate(zip(ids, max_tokens, offsets)):
            time.sleep(max(0.0, start + off - time.perf_counter()))
            traces[f"{tag}-{i}"].arrival = time.perf_counter()
            manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=n, record_timestamps=True,
                                eos_token_id=-1)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    pending = set(traces)
    while pending:
        res = manager.get_result(timeout=1)
        if res is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped")
            continue
        if res.request_id in pending and res.is_finished():
            t = traces[res.request_id]
            t.token_times, t.output_tokens = list(res.timestamps or []), len(res.generated_tokens)
            t.prompt_tokens, t.error = len(res.prompt_ids), res.error or ""
            pending.discard(res.request_id)
    feeder.join()
    return list(traces.values()), time.perf_counter() - start


# ----------------------------------------------------------------------------- reporting

ROWS = [("completed", "completed requests", "{:.0f}"), ("duration_s", "duration (s)", "{:.1f}"),
        ("output_throughput", "output throughput (tok/s)", "{:.1f}"),
        ("request_throughput", "request throughput (req/s)", "{:.2f}"), ("goodput", "goodput (req/s)", "{:.2f}"),
        ("mean_ttft_ms", "mean TTFT (ms)", "{:.0f}"), ("p50_ttft_ms", "p50 TTFT (ms)", "{:.0f}"),
        ("p99_ttft_ms", "p99 TTFT (ms)", "{:.0f}"), ("mean_tpot_ms", "mean TPOT (ms)", "{:.1f}"),
        ("p50_tpot_ms", "p50 TPOT (ms)", "{:.1f}"), ("p99_tpot_ms", "p99 TPOT (ms)", "{:.1f}"),
        ("mean_itl_ms", "mean ITL (ms)", "{:.1f}"), ("p50_itl_ms", "p50 ITL (ms)", "{:.1f}"),
        ("p99_itl_ms", "p99 ITL (ms)", "{:.1f}"), ("mean_e2el_ms", "mean E2EL (ms)", "{:.0f}"),
        ("p50_e2el_ms", "p50 E2EL (ms)", "{:.0f}"), ("p99_e2el_ms", "p99 E2EL (ms)", "{:.0f}")]


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def table(results: dict[str, list[dict]], baseline: str | None = None) -> str:
    """One column per (system, rate); with ``baseline``, a ratio row of output throughput."""
    cols = [(name, s) for name, runs in results.items() for s in runs]
    head = ["metric"] + [f"{name}@{fmt_rate(s['rate'])}" for name, s in cols]
    lines = [head]
    for key, label, fmt in ROWS:
        if any(key in s for _, s in cols):
            lines.append([label] + [fmt.format(s[key]) if key in s else "-" for _, s in cols])
    if baseline in results:
        base = {s["rate"]: s["output_throughput"] for s in results[baseline]}
        lines.append([f"throughput / {baseline}"] +
                     [f"{s['output_throughput'] / base[s['rate']]:.2f}x" if base.get(s["rate"]) else "-"
                      for _, s in cols])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


def jsonable(obj):
    """``obj`` with non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity/NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def plot(results: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Latency (p50 solid, p99 dashed) and throughput against request rate, one line per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = sorted({s["rate"] for runs in results.values() for s in runs})
    pos = {r: i for i, r in enumerate(rates)}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, metric, label in zip(axes, ["ttft", "tpot", "e2el"], ["TTFT (ms)", "TPOT (ms)", "E2EL (ms)"]):
        for name, runs in results.items():
            xs = [pos[s["rate"]] for s in runs]
            line, = ax.plot(xs, [s[f"p50_{metric}_ms"] for s in runs], "o-", label=f"{name} p50")
            ax.plot(xs, [s[f"p99_{metric}_ms"] for s in runs], "x--", color=line.get_color(), label=f"{name} p99")
        ax.set(ylabel=label, yscale="log")
    for name, runs in results.items():
        axes[3].plot([pos[s["rate"]] for s in runs], [s["output_throughput"] for s in runs], "o-", label=name)
    axes[3].set(ylabel="output tokens/s")
    for ax in axes:
        ax.set_xticks(range(len(rates)), [fmt_rate(r) for r in rates])
        ax.set_xlabel("request rate (req/s)")
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m minisys bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="server root, e.g. http://127.0.0.1:8000 (not with --compare)")
    p.add_argument("--compare", action="store_true", help="launch minisys (llm), eager, and run transformers")
    p.add_argument("--systems", default="minisys,eager,transformers", help="with --compare: which ones")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--rate", type=float, default=None, help="requests per second (inf = all at once)")
    p.add_argument("--rates", default=None, help="comma-separated sweep, e.g. 1,2,4,inf")
    p.add_argument("--num-prompts", type=int, default=None, help="default 64 (quick: 8)")
    p.add_argument("--input-words", default=None, help="prompt length range in words (default 8,32; quick 4,16)")
    p.add_argument("--output-tokens", default=None, help="output length range (default 32,64; quick 8,16)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--goodput", nargs="*", default=["ttft:2000", "tpot:200"], help="SLOs, ms: ttft:X tpot:Y e2el:Z")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-args", default="", help="with --compare: extra args for both servers")
    p.add_argument("--name", default=None, help="result name under bench/results/")
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def parse_slo(items: list[str]) -> SLO | None:
    if not items:
        return None
    kw = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        kw[f"{key}_ms"] = float(value)
    return SLO(**kw)


def _range(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if text is None:
        return default
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def workload_from(args) -> tuple[dict, list[BenchRequest], list[float]]:
    """Sizes (quick ones under MINISYS_QUICK=1), the requests and the rates."""
    quick = quick_mode()
    sizes = {"num_prompts": args.num_prompts or (8 if quick else 64),
             "input_words": _range(args.input_words, (4, 16) if quick else (8, 32)),
             "output_tokens": _range(args.output_tokens, (8, 16) if quick else (32, 64)),
             "seed": args.seed, "ignore_eos": not args.no_ignore_eos, "temperature": args.temperature}
    rates = parse_rates(args.rates) if args.rates else [args.rate if args.rate is not None else math.inf]
    reqs = make_requests(sizes["num_prompts"], sizes["input_words"], sizes["output_tokens"], args.seed)
    return sizes, reqs, rates


def run_compare(args, reqs, rates, slo, save: Callable[[dict, dict], None]) -> tuple[dict, dict]:
    """Each system in turn on the same workload; servers launched and stopped one after another.

    ``save(results, notes)`` runs after every system, so a long run keeps what it measured.
    """
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    results, notes = {}, {}
    extra = args.server_args.split()
    for name in systems:
        if name in ("minisys", "eager"):
            engine = "llm" if name == "minisys" else "eager"
            print(f"[{name}] starting: python -m minisys serve --engine {engine} {' '.join(extra)}", flush=True)
            with launched_server(["--engine", engine, *extra]) as url:
                cfg = ClientConfig(url, args.model, args.endpoint, args.temperature, not args.no_ignore_eos,
                                   args.api_key, args.max_concurrency)
                results[name] = bench_url(cfg, reqs, rates, args.seed, slo)
        elif name == "transformers":
            why = transformers_available()
            if why:
                notes[name] = why
                print(f"[transformers] skipped: {why}")
                continue
            print("[transformers] in-process ContinuousBatchingManager (generate_batch's engine)", flush=True)
            notes[name] = "in-process (no HTTP/SSE), transformers' ContinuousBatchingManager, fp32, per-token timestamps"
            results[name] = bench_transformers(reqs, rates, args.seed, slo)
        else:
            raise ValueError(f"unknown system {name!r} (minisys, eager, transformers)")
        print(table({name: results[name]}), flush=True)
        save(results, notes)
    return results, notes


def write_results(name: str, out: str, sizes: dict, rates: list[float], slo: SLO | None,
                  results: dict, notes: dict) -> tuple[Path, Path]:
    """JSON (with ratios against the eager server when it ran) and the latency-vs-rate plot."""
    payload = {"workload": sizes, "rates": [fmt_rate(r) for r in rates],
               "slo": asdict(slo) if slo else None, "results": results, "notes": notes}
    if "eager" in results:
        payload["speedup_vs_eager"] = {
            system: {fmt_rate(s["rate"]): s["output_throughput"] / b["output_throughput"]
                     for s, b in zip(runs, results["eager"])} for system, runs in results.items()}
    path = save_result(name, jsonable(payload), out)
    png = plot(results, Path(out) / f"{name}.png", f"serving benchmark: {sizes['num_prompts']} requests, "
               f"outputs {sizes['output_tokens'][0]}-{sizes['output_tokens'][1]} tokens")
    return path, png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bool(args.url) == bool(args.compare):
        print("give exactly one of --url URL or --compare", file=sys.stderr)
        return 2
    sizes, reqs, rates = workload_from(args)
    slo = parse_slo(args.goodput)
    name = args.name or ("serve_compare" if args.compare else "serve") + ("_quick" if quick_mode() else "")
    print(f"workload: {json.dumps(sizes)}; rates {[fmt_rate(r) for r in rates]}", flush=True)

    def save(results: dict, notes: dict) -> None:
        write_results(name, args.out, sizes, rates, slo, results, notes)

    if args.compare:
        results, notes = run_compare(args, reqs, rates, slo, save)
    else:
        cfg = ClientConfig(args.url, args.model, args.endpoint, args.temperature, not args.no_ignore_eos,
                           args.api_key, args.max_concurrency)
        results, notes = {cfg.url: bench_url(cfg, reqs, rates, args.seed, slo)}, {}
    print(table(results, "eager" if "eager" in results else None))
    path, png = write_results(name, args.out, sizes, rates, slo, results, notes)
    print(f"wrote {path} and {png}")
    return 0 if all(s["completed"] == s["requests"] for runs in results.values() for s in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
