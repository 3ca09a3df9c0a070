"""Soak: thousands of short and streaming requests with random disconnects; does the server stay flat?

    python -m minisys bench soak                       # launches a server (default model), 2,000 requests
    python -m minisys bench soak --url http://127.0.0.1:8000 --api-key KEY
    MINISYS_QUICK=1 python -m minisys bench soak       # 200 requests

A bounded loop of ``--requests`` requests from ``--concurrency`` workers on
loopback: plain and chat completions, half of them streamed (a few tokens
each); a fraction ``--disconnect`` of the clients leave early (a stream
after its first event, a non-streamed request after a random wait). Every
``--sample-every`` requests the server's /metrics is scraped: its RSS
(``process_resident_memory_bytes``) and the engine's counters.

Printed at the end (and saved as JSON with ``--name``): RSS after warm-up
(the first ``--warmup`` fraction of the requests) and at the end, the growth
in between, the status counts, and the leak check once the server is idle:
requests left in the engine (running, waiting) and KV blocks not free. The
exit status is 1 when something leaked, a request got a 5xx, or the RSS
grew more than ``--max-growth``.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from ..server.metrics import parse_metrics
from .common import quick_mode, save_result
from .server_process import launched_server

PROMPTS = ["The capital of France is", "Water boils at", "Once upon a time", "The quick brown fox",
           "In the beginning", "My favourite colour is", "Two plus two is", "The moon is"]


@dataclass
class SoakResult:
    """What a soak run saw; ``ok`` when nothing leaked, nothing got a 5xx and RSS stayed within bounds."""

    requests: int
    disconnects: int
    statuses: dict[str, int]
    seconds: float
    rss_samples: list[tuple[int, float]]          # (requests done, RSS in MiB)
    rss_warm_mib: float
    rss_end_mib: float
    leaks: dict[str, float] = field(default_factory=dict)      # counter -> value when idle (all should be 0)
    max_growth: float = 0.10

    @property
    def growth(self) -> float:
        return (self.rss_end_mib - self.rss_warm_mib) / self.rss_warm_mib

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code.startswith("5"))

    @property
    def ok(self) -> bool:
        return not any(self.leaks.values()) and self.server_errors == 0 and self.growth <= self.max_growth

    def report(self) -> str:
        leaks = ", ".join(f"{k} {v:g}" for k, v in self.leaks.items())
        return "\n".join([
            f"soak: {self.requests} requests ({self.disconnects} client disconnects) in {self.seconds:.1f} s; "
            f"statuses {dict(sorted(self.statuses.items()))}",
            f"server RSS: {self.rss_warm_mib:.1f} MiB after warm-up -> {self.rss_end_mib:.1f} MiB at the end "
            f"({100 * self.growth:+.2f}%; limit {100 * self.max_growth:.0f}%), max "
            f"{max(r for _, r in self.rss_samples):.1f} MiB over {len(self.rss_samples)} samples",
            f"idle after the run: {leaks}",
            "OK: flat memory, nothing leaked, no 5xx" if self.ok else "FAIL"])


async def _scrape(c: httpx.AsyncClient) -> dict[str, float]:
    r = await c.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


def _leaks(m: dict[str, float]) -> dict[str, float]:
    """The counters that must be 0 on an idle server."""
    return {"running": m.get("minisys:num_requests_running", 0.0),
            "waiting": m.get("minisys:num_requests_waiting", 0.0),
            "in engine": m.get("minisys:num_requests_in_engine", 0.0),
            "kv blocks not free": m.get("minisys:kv_blocks_total", 0.0) - m.get("minisys:kv_blocks_free", 0.0)}


async def _one(c: httpx.AsyncClient, rng: random.Random, model: Optional[str], max_tokens: int,
               disconnect: bool) -> str:
    """One request; its status ("200", "400", ...), or "left" when the client disconnected on purpose."""
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    prompt = rng.choice(PROMPTS)
    body: dict = {"max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]), "stream": stream}
    if model:
        body["model"] = model
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        if disconnect:                          # leave while the server is working on it
            try:
                await asyncio.wait_for(c.post(path, json=body), timeout=rng.uniform(0.01, 0.3))
            except asyncio.TimeoutError:
                return "left"
            return "left"                       # it was faster than the client's patience
        return str((await c.post(path, json=body)).status_code)
    async with c.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return str(r.status_code)
        async for line in r.aiter_lines():
            if disconnect and line.startswith("data: "):
                return "left"                   # the `async with` closes the connection mid-stream
            if line == "data: [DONE]":
                return "200"
    return "cut"                                # the server ended a stream without [DONE]: counted as 5xx-like


async def soak(url: str, requests: int, concurrency: int = 16, disconnect: float = 0.1, max_tokens: int = 8,
               sample_every: int = 50, warmup: float = 0.2, api_key: Optional[str] = None,
               model: Optional[str] = None, seed: int = 0, max_growth: float = 0.10,
               idle_timeout: float = 30.0) -> SoakResult:
    """Run the soak against the server at ``url``; see the module docstring."""
    rng = random.Random(seed)
    plan = [rng.random() < disconnect for _ in range(requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    statuses: dict[str, int] = {}
    samples: list[tuple[int, float]] = []
    done = 0
    warm_at = max(1, int(requests * warmup))
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as c:
        async def sample() -> None:
            samples.append((done, (await _scrape(c))["process_resident_memory_bytes"] / 2 ** 20))

        next_index = iter(range(requests))

        async def worker(wid: int) -> None:
            nonlocal done
            wrng = random.Random(seed * 1000 + wid)
            for i in next_index:
                try:
                    status = await _one(c, wrng, model, max_tokens, plan[i])
                except httpx.HTTPError as e:
                    status = f"error {type(e).__name__}"
                statuses[status] = statuses.get(status, 0) + 1
                done += 1
                if done % sample_every == 0 or done == warm_at:
                    await sample()

        t0 = time.perf_counter()
        await sample()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        seconds = time.perf_counter() - t0
        deadline, m = time.monotonic() + idle_timeout, {}
        while time.monotonic() < deadline:          # aborts are applied between engine steps: give it a moment
            m = await _scrape(c)
            if not any(_leaks(m).values()):
                break
            await asyncio.sleep(0.2)
        await sample()
    warm = next(r for n, r in samples if n >= warm_at)
    if "cut" in statuses:                           # a stream without [DONE] is a server failure
        statuses["5xx (stream cut)"] = statuses.pop("cut")
    return SoakResult(requests=requests, disconnects=sum(plan), statuses=statuses, seconds=seconds,
                      rss_samples=samples, rss_warm_mib=warm, rss_end_mib=samples[-1][1], leaks=_leaks(m),
                      max_growth=max_growth)


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode()
    p = argparse.ArgumentParser(prog="python -m minisys bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: launch one with --server-args)")
    p.add_argument("--server-args", default="--threads 1", help="flags for the launched server")
    p.add_argument("--requests", type=int, default=200 if quick else 2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--disconnect", type=float, default=0.1, help="fraction of clients that leave early")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--sample-every", type=int, default=50, help="scrape the server's RSS every N requests")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the requests before the RSS baseline")
    p.add_argument("--max-growth", type=float, default=0.10, help="RSS growth after warm-up that fails the run")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name to send (default: none, the server's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="save the result as bench/results/NAME.json")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    kw = dict(requests=args.requests, concurrency=args.concurrency, disconnect=args.disconnect,
              max_tokens=args.max_tokens, sample_every=args.sample_every, warmup=args.warmup,
              api_key=args.api_key, model=args.model, seed=args.seed, max_growth=args.max_growth)
    if args.url:
        result = asyncio.run(soak(args.url, **kw))
    else:
        with launched_server(args.server_args.split()) as url:
            result = asyncio.run(soak(url, **kw))
    print(result.report())
    if args.name:
        path = save_result(args.name, {
            "requests": result.requests, "disconnects": result.disconnects, "statuses": result.statuses,
            "seconds": round(result.seconds, 2), "rss_warm_mib": round(result.rss_warm_mib, 1),
            "rss_end_mib": round(result.rss_end_mib, 1), "rss_growth": round(result.growth, 4),
            "rss_samples": [(n, round(r, 1)) for n, r in result.rss_samples], "idle_leaks": result.leaks,
            "ok": result.ok, "report": result.report().splitlines()}, args.out)
        print(f"saved {path}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
