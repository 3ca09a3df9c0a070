"""Lesson 01's benchmark: generation speed with and without a KV cache.

For each total sequence length L we generate from a short prompt up to L
tokens, greedily, with the eager baseline in both modes, and report decode
tokens/s (the median of --repeats runs, both modes interleaved so that they
share the machine's load of the moment). Without a cache every step re-runs
the whole sequence (step t costs O(t)), so tokens/s falls as L grows; with a
cache each step costs about the same.

    python -m minisys bench kv-cache            # full sizes
    MINISYS_QUICK=1 python -m minisys bench kv-cache
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass

from ..engine.eager import EagerGenerator
from ..engine.sampling_params import SamplingParams
from .common import quick_mode, save_result

QUICK_LENGTHS = [32, 64, 128]
FULL_LENGTHS = [64, 128, 256, 512, 1024]


@dataclass
class KVCacheRow:
    total_len: int
    new_tokens: int
    tok_s_cache: float
    tok_s_no_cache: float

    @property
    def speedup(self) -> float:
        return self.tok_s_cache / self.tok_s_no_cache


def tokens_per_second(gen: EagerGenerator, prompt_ids: list[int], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    out = gen.generate(prompt_ids, params)
    return len(out.token_ids) / (time.perf_counter() - t)


def run(model, tokenizer, lengths: list[int], prompt: str = "Once upon a time",
        repeats: int = 1) -> list[KVCacheRow]:
    """One row per total length: median tokens/s over ``repeats`` interleaved runs of each loop."""
    prompt_ids = tokenizer.encode(prompt)
    cached = EagerGenerator(model, tokenizer, use_kv_cache=True)
    uncached = EagerGenerator(model, tokenizer, use_kv_cache=False)
    tokens_per_second(cached, prompt_ids, 4)     # warm-up
    rows = []
    for total in lengths:
        n = total - len(prompt_ids)
        with_cache, without = [], []
        for _ in range(repeats):
            with_cache.append(tokens_per_second(cached, prompt_ids, n))
            without.append(tokens_per_second(uncached, prompt_ids, n))
        rows.append(KVCacheRow(total, n, statistics.median(with_cache), statistics.median(without)))
    return rows


def print_table(rows: list[KVCacheRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="greedy generation, eager baseline: KV cache vs none")
    for col in ("total length", "new tokens", "tok/s with cache", "tok/s without", "speedup"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r.total_len), str(r.new_tokens), f"{r.tok_s_cache:.1f}",
                  f"{r.tok_s_no_cache:.1f}", f"{r.speedup:.2f}x")
    Console().print(t)


def plot(rows: list[KVCacheRow], path: str) -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r.total_len for r in rows], [r.tok_s_cache for r in rows], "o-", label="with KV cache")
    ax.plot([r.total_len for r in rows], [r.tok_s_no_cache for r in rows], "s--", label="no cache (recompute)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("total sequence length (tokens)")
    ax.set_ylabel("decode tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Why a KV cache: generation speed vs length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from ..model.loader import load

    p = argparse.ArgumentParser(prog="python -m minisys bench kv-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3, help="runs per length and mode; the median is reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 keeps step times stable on a machine shared with other jobs)")
    p.add_argument("--plot", default="bench/results/kv_cache.png")
    args = p.parse_args(argv)
    lengths = args.lengths or (QUICK_LENGTHS if quick_mode() else FULL_LENGTHS)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, device=args.device)
    rows = run(model, tok, lengths, repeats=args.repeats)
    print_table(rows)
    plot(rows, args.plot)
    path = save_result("kv_cache" + ("_quick" if quick_mode() else ""),
                       {"device": str(model.device), "repeats": args.repeats, "rows": [asdict(r) | {"speedup": r.speedup} for r in rows]})
    print(f"wrote {path} and {args.plot}")
    return 0
