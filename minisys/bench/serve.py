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

Pieces, one job each: `serve_workload` (the seeded requests),
`sse_client` (streaming HTTP requests, the SSE parser), `recorder` (stream
chunks -> `metrics.RequestTrace`), `metrics` (vLLM's definitions),
`server_process` (servers as subprocesses), `transformers_baseline`,
`serve_report` (table, JSON, plot). This file is the command line and
`bench_url`, which ties them together for one server.

Invariants: the workload (prompts, output lengths, arrival times) depends
only on the seed and sizes; every request asks for ``ignore_eos`` so each
system produces exactly the requested number of tokens (a server that does
not know the field must ignore it; minisys and vLLM honour it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .common import quick_mode, save_result
from .metrics import SLO, poisson_arrivals, summarize
from .serve_report import fmt_rate, jsonable, plot, table
from .serve_workload import BenchRequest, make_requests
from .server_process import launched_server
from .sse_client import Arrivals, ClientConfig, run_async, run_workload, served_model
from .transformers_baseline import bench_transformers, transformers_available


def parse_rates(text: str) -> list[float]:
    """'1,2,inf' -> [1.0, 2.0, inf]."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise ValueError(f"rates must be > 0 (inf allowed): {text!r}")
    return rates


def bench_url(cfg: ClientConfig, requests: list[BenchRequest], rates: list[float], seed: int,
              slo: SLO | None, warmup: bool = True, arrivals: Arrivals = poisson_arrivals) -> list[dict]:
    """One summary per rate (after one short warm-up request), against the server at ``cfg.url``.

    ``arrivals(n, rate, seed)`` gives the send times (lab 07 passes the student's own).
    """
    if cfg.model is None:
        cfg.model = served_model(cfg.url)
    if warmup:
        traces, _, _ = run_async(run_workload(cfg, [BenchRequest("warm up", 4)], math.inf))
        if not traces[0].ok:
            raise RuntimeError(f"warm-up request failed: {traces[0].error}")
    out = []
    for rate in rates:
        traces, _, duration = run_async(run_workload(cfg, requests, rate, seed, arrivals=arrivals))
        summary = summarize(traces, duration, slo)
        summary["rate"] = rate
        errors = sorted({t.error for t in traces if t.error})
        if errors:
            summary["errors"] = errors[:5]
        out.append(summary)
    return out


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
    p.add_argument("--server-args", default="", help="with --compare: extra args for both servers, e.g. "
                   "--threads 1 (engine flags such as --max-num-seqs are refused by --engine eager)")
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
