"""Lesson 14's KV-transfer benchmarks: transfer cost, disaggregation's goodput, migration's tail.

    python -m minisys bench cluster --part transfer   # bytes per token x bandwidth of the gloo transport
    python -m minisys bench cluster --part b          # colocated vs disaggregated goodput over request rates
    python -m minisys bench cluster --part c          # p99 latency with and without migration
    python -m minisys.bench.cluster_kv --part all     # all three, with every knob; MINISYS_QUICK=1: small sizes

(`run_part_b(args)` / `run_part_c(args)` / `run_transfer(args)` are what
``python -m minisys bench cluster`` calls.) Two replica servers (SmolLM2,
``--threads 1`` each, so one core each on a 2-core machine) on one gloo KV
group; no router: this program orchestrates what a router would.

* transfer: two processes, rank 0 sends a request's K and V (SmolLM2's shape,
  (L, nb, 16, 3, 64) fp32 each) to rank 1 over `GlooConnector`, rank 1
  answers one byte; median round trip per size. Beside it the formula,
  ``bytes/token = 2 * L * Hkv * D * bytes(dtype)``, and the achieved GB/s.
* b: Poisson arrivals of prompts of ``--prompt-tokens`` token ids and
  ``--output-tokens`` outputs. *Colocated*: requests alternate between the two
  replicas, each does prefill and decode (chunked prefill off: the engine's
  default). *Disaggregated*: replica 0 only prefills (``do_remote_decode``),
  replica 1 pulls the KV and decodes, streamed to the client. TTFT is when the
  client gets the first token (disaggregated: from the decode stream, as
  vLLM's proxy delivers it). Goodput = requests meeting BOTH SLOs per second
  (DistServe's metric).
* c: an adversarial pattern: the long-output requests all land on replica 0,
  short ones on replica 1. With migration, a rebalancer (what a router would
  run) polls both replicas' ``/minisys/kv`` every ``--poll-s`` and migrates
  the newest request of the busier one while they differ by >= 2 requests;
  the client follows the stream (``minisys_migrated`` -> ``/minisys/attach``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .common import quick_mode, save_result
from .metrics import SLO, RequestTrace, poisson_arrivals, summarize
from .recorder import record_chunk
from .sse_client import SSEDecoder

SMOL_SHAPE = (30, 3, 64)          # layers, KV heads, head dim of SmolLM2-135M


# ------------------------------------------------------------ transfer cost
def _bw_worker(conn, rank: int, port: int, sizes: list[int], repeats: int, block_size: int) -> None:
    from ..cluster.kv_transfer import GlooConnector
    from ..parallel.workers import report_ready
    torch.set_num_threads(1)
    report_ready(conn, rank)
    c = GlooConnector(rank, 2, port)
    L, H, D = SMOL_SHAPE
    rows = []
    for tokens in sizes:
        nb = -(-tokens // block_size)
        k = torch.randn(L, nb, block_size, H, D)
        v = torch.randn_like(k)
        times = []
        for _ in range(repeats + 1):                      # the first is warm-up
            if rank == 0:
                t = time.perf_counter()
                c.send_request_kv(1, {"tokens": tokens}, k, v)
                c.recv(1)                                 # the one-byte answer
                times.append(time.perf_counter() - t)
            else:
                _, _, rk, rv = c.recv_request_kv(0)
                assert rk.shape == k.shape
                c.send(0, {"ok": True}, (torch.zeros(1, dtype=torch.uint8),))
        if rank == 0:
            copy = min(_timed(lambda: (k.index_select(1, torch.arange(nb)), v.index_select(1, torch.arange(nb))))
                       for _ in range(3))
            rows.append({"tokens": tokens, "blocks": nb, "bytes": 2 * k.numel() * 4,
                         "seconds": statistics.median(times[1:]), "local_copy_s": copy})
    conn.send(("rows", rows))
    c.close()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def with_defaults(args: argparse.Namespace | None = None) -> argparse.Namespace:
    """``args`` with every option of this program it lacks at its default (so another command line, such as
    ``python -m minisys bench cluster``, can pass its own namespace to `run_part_b` / `run_part_c`)."""
    out = parser().parse_args([])
    for k, v in vars(args or argparse.Namespace()).items():
        setattr(out, k, v)
    return out


def run_transfer(args) -> dict:
    """Bytes per token (formula and measured) and the transport's achieved bandwidth, per request size."""
    args = with_defaults(args)
    from ..cluster.kv_transfer import kv_bytes_per_token
    from ..parallel.comm import pick_free_port
    from ..parallel.workers import WorkerGroup
    sizes = [16, 128, 512] if args.quick else [16, 128, 512, 2048]
    port = pick_free_port()
    group = WorkerGroup(_bw_worker, [(r, port, sizes, args.repeats, 16) for r in range(2)], name="minisys-kv-bw")
    group.start()
    try:
        group.wait_ready(120)
        kind, rows = group.conns[0].recv()
    finally:
        group.stop()
    per_token = kv_bytes_per_token(*SMOL_SHAPE, torch.float32)
    for r in rows:
        r["bytes_per_token_formula"] = per_token
        r["bytes_per_token_padded"] = r["bytes"] / r["tokens"]        # whole blocks move
        r["GB_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["ms_per_token"] = r["seconds"] * 1000 / r["tokens"]
    out = {"transport": "gloo (torch.distributed send/recv over TCP loopback)", "dtype": "float32",
           "bytes_per_token_formula": per_token, "rows": rows}
    _print_transfer(out)
    return out


def _print_transfer(out: dict) -> None:
    print(f"KV bytes per token (SmolLM2, fp32): 2 x 30 layers x 3 KV heads x 64 x 4 B = "
          f"{out['bytes_per_token_formula']:,} B")
    print(f"{'tokens':>7} {'MB':>8} {'transfer ms':>12} {'GB/s':>7} {'ms/token':>9} {'local copy ms':>14}")
    for r in out["rows"]:
        print(f"{r['tokens']:>7} {r['bytes'] / 1e6:>8.2f} {r['seconds'] * 1000:>12.2f} {r['GB_per_s']:>7.2f} "
              f"{r['ms_per_token']:>9.4f} {r['local_copy_s'] * 1000:>14.2f}")


# ------------------------------------------------------------ streaming clients (what a router does)
async def _read_stream(resp, trace: RequestTrace) -> dict | None:
    """Read one SSE response into ``trace``; the ``minisys_migrated`` event if the stream ends with one."""
    decoder, moved = SSEDecoder(), None
    async for raw in resp.aiter_raw():
        now = time.perf_counter()
        for data in decoder.feed(raw):
            if data.strip() == "[DONE]":
                return moved
            payload = json.loads(data)
            if "minisys_migrated" in payload:
                moved = payload["minisys_migrated"]
                continue
            record_chunk(trace, payload, now)
    trace.error = trace.error or "stream ended without [DONE]"
    return moved


async def follow_stream(client, urls: list[str], replica: int, body: dict, rid: str, trace: RequestTrace,
                            where: dict) -> None:
    """Stream a completion from ``urls[replica]``, following it across migrations (``where[rid]``: its replica)."""
    headers = {"X-Request-Id": rid}
    async with client.stream("POST", urls[replica] + "/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            trace.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        moved = await _read_stream(resp, trace)
    while moved is not None and not trace.error:
        where[rid] = moved["dst_rank"]
        async with client.stream("GET", f"{urls[moved['dst_rank']]}/minisys/attach/{rid}") as resp:
            if resp.status_code != 200:
                trace.error = f"attach HTTP {resp.status_code}"
                return
            moved = await _read_stream(resp, trace)
    where.pop(rid, None)


async def _disaggregated(client, urls: list[str], body: dict, rid: str, trace: RequestTrace) -> None:
    """Prefill on replica 0 (not streamed), then decode on replica 1 (streamed) from the pulled KV."""
    pre_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    r = await client.post(urls[0] + "/v1/completions", json={**pre_body, "kv_transfer_params": {"do_remote_decode": True}},
                          headers={"X-Request-Id": rid})
    if r.status_code != 200:
        trace.error = f"prefill HTTP {r.status_code}"
        return
    kvp = r.json().get("kv_transfer_params")
    if kvp is None:                     # finished at its first token: the prefill's answer is the whole answer
        trace.token_times.append(time.perf_counter())
        trace.output_tokens = 1
        return
    await follow_stream(client, urls, 1, {**body, "kv_transfer_params": kvp}, rid + "-d", trace, {})


def _prompts(n: int, tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 20000) for _ in range(tokens)] for _ in range(n)]


def _body(prompt: list[int], max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


# ------------------------------------------------------------ part (b)
async def _run_b_mode(urls, mode: str, prompts, out_tokens: int, rate: float, seed: int):
    import httpx
    offsets = poisson_arrivals(len(prompts), rate, seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        start = time.perf_counter()

        async def one(i: int, prompt):
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            trace = RequestTrace(arrival=time.perf_counter())
            rid = f"b-{mode}-{rate}-{i}"
            if mode == "colocated":
                await follow_stream(client, urls, i % 2, _body(prompt, out_tokens), rid, trace, {})
            else:
                await _disaggregated(client, urls, _body(prompt, out_tokens), rid, trace)
            return trace
        traces = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return list(traces), time.perf_counter() - start


def _lone_request(urls: list[str], args) -> dict:
    """TTFT and TPOT of one request alone on replica 0 (median of 3): what the SLOs are scaled from."""
    traces = []
    for i in range(3):
        trace = RequestTrace(arrival=time.perf_counter())

        async def go():
            import httpx
            async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
                await follow_stream(client, urls, 0, _body(_prompts(1, args.prompt_tokens, 99 + i)[0],
                                                               args.output_tokens), f"lone-{i}", trace, {})
        asyncio.run(go())
        traces.append(trace)
    return {"ttft_ms": statistics.median(t.ttft for t in traces) * 1000,
            "tpot_ms": statistics.median(t.tpot for t in traces) * 1000}


def run_part_b(args) -> dict:
    """Colocated vs disaggregated goodput under TTFT and TPOT SLOs, at each request rate.

    The SLOs are DistServe's way: a multiple (``--slo-scale``) of one request's TTFT and TPOT
    measured alone at the start of the run, unless ``--ttft-slo-ms`` / ``--tpot-slo-ms`` are given.
    Every request's TTFT and TPOT are kept, so goodput can be recomputed under other SLOs."""
    args = with_defaults(args)
    rates = args.rates or ([0.1, 0.2, 0.4] if args.quick else [0.1, 0.2, 0.4, 0.8])
    n = args.num_requests or (8 if args.quick else 32)
    rows = []
    with _replicas(args) as urls:
        _warm(urls)
        lone = _lone_request(urls, args)
        slo = SLO(ttft_ms=args.ttft_slo_ms or args.slo_scale * lone["ttft_ms"],
                  tpot_ms=args.tpot_slo_ms or args.slo_scale * lone["tpot_ms"])
        print(f"one request alone: TTFT {lone['ttft_ms']:.0f} ms, TPOT {lone['tpot_ms']:.0f} ms -> SLO TTFT "
              f"{slo.ttft_ms:.0f} ms, TPOT {slo.tpot_ms:.0f} ms", flush=True)
        for rate in rates:
            prompts = _prompts(n, args.prompt_tokens, seed=int(rate * 1000))
            for mode in ("colocated", "disaggregated"):
                traces, duration = asyncio.run(_run_b_mode(urls, mode, prompts, args.output_tokens, rate, 0))
                s = summarize(traces, duration, slo)
                rows.append({"rate": rate, "mode": mode, **{k: s[k] for k in (
                    "completed", "failed", "goodput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
                    "p50_tpot_ms", "p99_tpot_ms", "p99_e2el_ms")},
                    "slo_met": sum(slo.met_by(t) for t in traces), "requests": len(traces),
                    "errors": sorted({t.error[:160] for t in traces if t.error}),
                    "per_request": [{"ttft_ms": t.ttft * 1000 if t.ok else None,
                                     "tpot_ms": t.tpot * 1000 if t.ok and t.tpot is not None else None}
                                    for t in traces]})
                print(_row_b(rows[-1]), flush=True)
            _check_idle(urls)
    return {"slo": asdict(slo), "lone_request": lone, "slo_scale": args.slo_scale, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
            "requests_per_rate": n, "rows": rows}


def _row_b(r: dict) -> str:
    return (f"rate {r['rate']:>5} req/s {r['mode']:>13}: goodput {r['goodput']:.3f} req/s "
            f"({r['slo_met']}/{r['requests']} within SLO), TTFT p50/p99 {r['p50_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} ms, "
            f"TPOT p50/p99 {r['p50_tpot_ms']:.0f}/{r['p99_tpot_ms']:.0f} ms, failed {r['failed']}")


# ------------------------------------------------------------ part (c)
async def _rebalance(client, urls, where: dict, stats: dict, poll_s: float, stop: asyncio.Event) -> None:
    """Llumnix's rebalancing, minimal: migrate the newest request of the busier replica to the idler one."""
    while not stop.is_set():
        await asyncio.sleep(poll_s)
        loads = [len((await client.get(u + "/minisys/kv")).json()["requests"]) for u in urls]
        src = 0 if loads[0] >= loads[1] else 1
        if loads[src] - loads[1 - src] < 2:
            continue
        mine = [rid for rid, r in where.items() if r == src]
        if not mine:
            continue
        rid = mine[-1]
        r = await client.post(urls[src] + "/minisys/migrate", json={"request_id": rid, "dst_rank": 1 - src})
        if r.status_code == 200:
            res = r.json()
            stats["migrations"] += 1
            stats["downtime_ms"].append(res["downtime_s"] * 1000)
            stats["bytes"] += res["bytes"]
        else:
            stats["refused"] += 1


async def _run_c_mode(urls, migrate: bool, long_n: int, short_n: int, args):
    import httpx
    prompts = _prompts(long_n + short_n, 64, seed=5)
    plan = [(0, args.long_tokens, 0.05 * i) for i in range(long_n)] + \
           [(1, args.short_tokens, 0.05 * i + 0.5 * (i // 2)) for i in range(short_n)]
    where: dict[str, int] = {}
    stats: dict[str, Any] = {"migrations": 0, "refused": 0, "downtime_ms": [], "bytes": 0}
    async with httpx.AsyncClient(timeout=httpx.Timeout(None),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        stop = asyncio.Event()
        balancer = asyncio.create_task(_rebalance(client, urls, where, stats, args.poll_s, stop)) if migrate else None
        start = time.perf_counter()

        async def one(i: int):
            replica, out_tokens, at = plan[i]
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            trace = RequestTrace(arrival=time.perf_counter())
            rid = f"c-{int(migrate)}-{i}"
            where[rid] = replica
            await follow_stream(client, urls, replica, _body(prompts[i], out_tokens), rid, trace, where)
            return trace
        traces = await asyncio.gather(*(one(i) for i in range(len(plan))))
        duration = time.perf_counter() - start
        stop.set()
        if balancer is not None:
            balancer.cancel()
    return list(traces), duration, stats


def run_part_c(args) -> dict:
    """p50/p99 latency on an adversarial arrival pattern, without and with migration (side by side)."""
    args = with_defaults(args)
    long_n, short_n = (6, 6) if args.quick else (12, 12)
    rows = []
    with _replicas(args) as urls:
        _warm(urls)
        for migrate in (False, True):
            traces, duration, stats = asyncio.run(_run_c_mode(urls, migrate, long_n, short_n, args))
            s = summarize(traces, duration)
            downtime = stats.pop("downtime_ms")
            rows.append({"migration": migrate, **{k: s[k] for k in (
                "completed", "failed", "duration_s", "p50_e2el_ms", "p99_e2el_ms", "p50_tpot_ms", "p99_tpot_ms",
                "p99_ttft_ms")}, **stats, "median_downtime_ms": statistics.median(downtime) if downtime else None})
            r = rows[-1]
            r["errors"] = sorted({t.error[:160] for t in traces if t.error})
            print(f"migration {'on ' if migrate else 'off'}: E2EL p50/p99 {r['p50_e2el_ms']:.0f}/{r['p99_e2el_ms']:.0f} ms, "
                  f"TPOT p50/p99 {r['p50_tpot_ms']:.0f}/{r['p99_tpot_ms']:.0f} ms, makespan {r['duration_s']:.1f} s, "
                  f"{r['migrations']} migrations ({r['bytes'] / 1e6:.1f} MB, median downtime "
                  f"{r['median_downtime_ms'] or 0:.0f} ms), failed {r['failed']}", flush=True)
            _check_idle(urls)
    return {"pattern": f"{long_n} requests of {args.long_tokens} output tokens sent to replica 0 within "
                       f"{0.05 * long_n:.1f} s; {short_n} of {args.short_tokens} to replica 1, in pairs 0.5 s apart",
            "poll_s": args.poll_s, "rows": rows}


# ------------------------------------------------------------ replicas
def _replicas(args):
    from contextlib import contextmanager

    from ..bench.server_process import free_port, wait_healthy

    @contextmanager
    def run():
        import subprocess
        import tempfile
        from pathlib import Path
        master, ports = free_port(), [free_port(), free_port()]
        logdir = Path(tempfile.mkdtemp(prefix="minisys-cluster-kv-"))
        procs = [subprocess.Popen(
            [sys.executable, "-m", "minisys", "serve", "--threads", "1", "--device", "cpu", "--port", str(ports[r]),
             "--kv-connector", "gloo", "--kv-rank", str(r), "--kv-world-size", "2", "--kv-master-port", str(master),
             *(["--model", args.model] if args.model else []), *args.serve_args],
            stdout=open(logdir / f"replica{r}.log", "wb"), stderr=subprocess.STDOUT) for r in range(2)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        try:
            for r in range(2):
                wait_healthy(urls[r], procs[r], 300, logdir / f"replica{r}.log")
            yield urls
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(15)
    return run()


def _warm(urls: list[str]) -> None:
    import httpx
    for u in urls:
        httpx.post(u + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120)


def _check_idle(urls: list[str]) -> None:
    """Between runs: every block free, nothing held, staged or waiting to be attached (a leak would show)."""
    import httpx
    for u in urls:
        c = httpx.get(u + "/minisys/kv", timeout=30).json()
        if c["kv_blocks_free"] != c["kv_blocks_total"] or c["held"] or c["staged"] or c["attachable"]:
            print(f"warning: replica {c['rank']} not idle after the run: {c}", file=sys.stderr)


# ------------------------------------------------------------ the plot
def plot(result: dict, path) -> None:
    """Goodput vs rate (part b) and p99 latencies without/with migration (part c), one PNG."""
    from matplotlib.figure import Figure        # no pyplot: no global backend switch
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    b, c = result.get("part_b"), result.get("part_c")
    if b:
        for mode, marker in (("colocated", "o"), ("disaggregated", "s")):
            rows = [r for r in b["rows"] if r["mode"] == mode]
            axes[0].plot([r["rate"] for r in rows], [r["goodput"] for r in rows], marker=marker, label=mode)
        slo = b["slo"]
        axes[0].set(xlabel="request rate (req/s)", ylabel="goodput (req/s within both SLOs)",
                    title=f"(b) SLO: TTFT {slo['ttft_ms'] / 1000:.1f} s, TPOT {slo['tpot_ms']:.0f} ms")
        axes[0].legend()
    if c:
        keys = ["p50_tpot_ms", "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms"]
        base = next(r for r in c["rows"] if not r["migration"])
        for k, r in enumerate(c["rows"]):
            xs = [i + 0.38 * k for i in range(len(keys))]
            bars = axes[1].bar(xs, [r[key] / base[key] for key in keys], width=0.36,
                               label=f"migration {'on' if r['migration'] else 'off'}")
            axes[1].bar_label(bars, [f"{r[key] / 1000:.1f}s" for key in keys], fontsize=7)
        axes[1].set_xticks([i + 0.19 for i in range(len(keys))], ["p50 TPOT", "p99 TPOT", "p50 E2EL", "p99 E2EL"])
        axes[1].set(title="(c) long outputs all sent to one replica", ylabel="relative to migration off")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisys.bench.cluster_kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="all", choices=["transfer", "b", "c", "all"])
    p.add_argument("--model", default=None, help="model of the replicas (default: SmolLM2-135M-Instruct)")
    p.add_argument("--quick", action="store_true", default=quick_mode(), help="small sizes (also MINISYS_QUICK=1)")
    p.add_argument("--repeats", type=int, default=5, help="transfer: timed round trips per size")
    p.add_argument("--rates", type=float, nargs="*", default=None, help="b: request rates (req/s)")
    p.add_argument("--num-requests", type=int, default=None, help="b: requests per rate")
    p.add_argument("--prompt-tokens", type=int, default=256, help="b: prompt length")
    p.add_argument("--output-tokens", type=int, default=24, help="b: output length")
    p.add_argument("--slo-scale", type=float, default=3.0,
                   help="b: SLOs = this x one request's TTFT and TPOT measured alone (default: 3)")
    p.add_argument("--ttft-slo-ms", type=float, default=None, help="b: a fixed TTFT SLO (ms) instead")
    p.add_argument("--tpot-slo-ms", type=float, default=None, help="b: a fixed TPOT SLO (ms) instead")
    p.add_argument("--long-tokens", type=int, default=64, help="c: output tokens of a long request")
    p.add_argument("--short-tokens", type=int, default=16, help="c: output tokens of a short request")
    p.add_argument("--poll-s", type=float, default=0.5, help="c: the rebalancer's period")
    p.add_argument("--serve-args", nargs="*", default=[], help="extra flags for both replicas")
    p.add_argument("--out", default="bench/results", help="results directory")
    p.add_argument("--plot", default=None, metavar="JSON", help="only redraw the plot of a results file")
    return p


def main(argv: list[str] | None = None) -> int:
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # a kill stops the replicas too (finally)
    args = parser().parse_args(argv)
    if args.plot:
        from pathlib import Path
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    result: dict[str, Any] = {"quick": args.quick, "threads_per_replica": 1}
    if args.part in ("transfer", "all"):
        result["transfer"] = run_transfer(args)
    if args.part in ("b", "all"):
        result["part_b"] = run_part_b(args)
    if args.part in ("c", "all"):
        result["part_c"] = run_part_c(args)
    name = "cluster_kv" + ("_quick" if args.quick else "") + ("" if args.part == "all" else f"_{args.part}")
    path = save_result(name, result, args.out)
    if "part_b" in result or "part_c" in result:
        plot(result, path.with_suffix(".png"))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
