"""Lesson 02's benchmark: attention backends as the sequence grows.

Two measurements, each side by side in one run, on SmolLM2's attention shape
(9 query heads sharing 3 KV heads, head dim 64, one layer, fp32 on CPU):

* prefill: one causal sequence of T tokens attending to itself, with
  ``reference`` (full T x T scores), ``sdpa`` (torch's fused kernel) and
  ``tiled`` (online softmax in plain torch);
* decode: ``batch`` sequences with one new token each against S cached keys,
  with ``sdpa``, ``decode`` (one pass over the cache) and ``decode-splitk``
  (FlashDecoding: KV chunks, then a log-sum-exp merge).

For each we report the median wall time and the peak memory allocated inside
the call (`minisys.bench.memory.AllocationTracker`; it includes the (T, Hq, D)
output, which every backend allocates), and the ratio against the baseline
(reference for prefill, single-pass decode for decode).

    python -m minisys bench attention                  # full sizes
    MINISYS_QUICK=1 python -m minisys bench attention  # quick sizes (CI, notebook)
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from typing import Callable, Union

import torch

from ..attention import BACKENDS, AttentionBackend, AttentionMetadata
from .common import median_time, quick_mode, save_result
from .memory import AllocationTracker

SHAPE = dict(num_q_heads=9, num_kv_heads=3, head_dim=64)     # SmolLM2-135M
QUICK_PREFILL = [128, 256, 512, 1024, 2048]
FULL_PREFILL = [128, 256, 512, 1024, 2048, 4096, 8192]
QUICK_DECODE = [1024, 4096, 16384, 65536]
FULL_DECODE = [1024, 4096, 16384, 65536, 262144]
REFERENCE_MAX = 4096            # the reference's scores at T = 8192 are 2.4 GB per copy

# a backend (timed through its forward_packed), or any function of packed (q, k, v, meta)
Attention = Union[AttentionBackend, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata],
                                             torch.Tensor]]


@dataclass
class Row:
    phase: str          # "prefill" or "decode"
    length: int         # T (prefill) or cached keys per sequence S (decode)
    backend: str
    ms: float           # median wall time of one call
    peak_mib: float     # most MiB allocated inside the call alive at once
    largest: list[int]  # shape of the largest single allocation


def make_inputs(seqlens_q: list[int], context_lens: list[int], dtype=torch.float32, seed: int = 0):
    """Random (q, k, v, meta) of SHAPE for a packed batch."""
    meta = AttentionMetadata(seqlens_q=seqlens_q, context_lens=context_lens)
    g = torch.Generator().manual_seed(seed)
    T, S = meta.num_tokens, int(meta.cu_seqlens_k[-1])
    q = torch.randn(T, SHAPE["num_q_heads"], SHAPE["head_dim"], generator=g, dtype=dtype)
    k = torch.randn(S, SHAPE["num_kv_heads"], SHAPE["head_dim"], generator=g, dtype=dtype)
    v = torch.randn(S, SHAPE["num_kv_heads"], SHAPE["head_dim"], generator=g, dtype=dtype)
    return q, k, v, meta


def measure(phase: str, length: int, name: str, fn: Attention, inputs, repeats: int) -> Row:
    """Median time of fn(*inputs) (untracked), then one tracked call for memory."""
    if isinstance(fn, AttentionBackend):
        fn = fn.forward_packed
    seconds = median_time(lambda: fn(*inputs), repeats=repeats)
    with AllocationTracker() as mem:
        fn(*inputs)
    return Row(phase, length, name, seconds * 1e3, mem.peak_bytes / 2**20, list(mem.largest_shape))


def run_prefill(backends: dict[str, Attention], lengths: list[int], repeats: int = 3,
                reference_max: int = REFERENCE_MAX) -> list[Row]:
    rows = []
    for T in lengths:
        inputs = make_inputs([T], [0])
        for name, fn in backends.items():
            if name == "reference" and T > reference_max:
                continue
            rows.append(measure("prefill", T, name, fn, inputs, repeats))
    return rows


def run_decode(backends: dict[str, Attention], lengths: list[int], batch: int = 1,
               repeats: int = 9) -> list[Row]:
    rows = []
    for S in lengths:
        inputs = make_inputs([1] * batch, [S - 1] * batch)
        for name, fn in backends.items():
            rows.append(measure("decode", S, name, fn, inputs, repeats))
    return rows


def run_model_decode(names: list[str], context: int, steps: int = 10, model=None) -> dict[str, float]:
    """Median ms of one whole SmolLM2 decode step (fp32, 1 sequence, `context` cached tokens) per backend.

    Backends take turns step by step (A, B, C, A, B, C, ...) so that a change
    in the machine's load hits them alike.
    """
    import statistics
    import time

    from ..kv import ContiguousKVCache
    from ..model import load

    if model is None:
        model, _ = load(None, device="cpu", dtype=torch.float32, quiet=True)
    before = model.attention
    ids = torch.randint(0, model.config.vocab_size, (context + steps,), generator=torch.Generator().manual_seed(0))
    caches, times = {}, {n: [] for n in names}
    try:
        for n in names:                                              # prefill every backend's own cache
            model.set_attention_backend(n)
            caches[n] = ContiguousKVCache(model.config, context + steps)
            meta = AttentionMetadata(seqlens_q=[context], context_lens=[0])
            model(ids[:context], meta.positions(), meta, caches[n])
        for step in range(steps):
            meta = AttentionMetadata(seqlens_q=[1], context_lens=[context + step])
            for n in names:
                model.set_attention_backend(n)
                t = time.perf_counter()
                model(ids[context + step:context + step + 1], meta.positions(), meta, caches[n])
                times[n].append((time.perf_counter() - t) * 1e3)
    finally:
        model.attention = before
    return {n: statistics.median(ts) for n, ts in times.items()}


def ratios(rows: list[Row], baseline: str) -> dict[tuple[int, str], float]:
    """{(length, backend): baseline time / backend time} where the baseline ran."""
    base = {r.length: r.ms for r in rows if r.backend == baseline}
    return {(r.length, r.backend): base[r.length] / r.ms for r in rows if r.length in base}


def print_table(rows: list[Row], baseline: str, title: str) -> None:
    """One line per (length, backend): time, peak memory, largest tensor, speedup vs baseline."""
    from rich.console import Console
    from rich.table import Table

    speed = ratios(rows, baseline)
    t = Table(title=title)
    for col in ("length", "backend", "ms", "peak MiB", "largest tensor", f"vs {baseline}"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for i, r in enumerate(rows):
        first = i == 0 or rows[i - 1].length != r.length
        t.add_row(str(r.length) if first else "", r.backend, f"{r.ms:.2f}", f"{r.peak_mib:.1f}",
                  "x".join(map(str, r.largest)),
                  f"{speed[r.length, r.backend]:.2f}x" if (r.length, r.backend) in speed else "-",
                  end_section=i + 1 < len(rows) and rows[i + 1].length != r.length)
    Console(width=100).print(t)


def plot(prefill: list[Row], decode: list[Row], path: str) -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook

    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    panels = [(axes[0], prefill, "ms", "prefill: time per call (ms)"),
              (axes[1], prefill, "peak_mib", "prefill: peak memory (MiB)"),
              (axes[2], decode, "ms", "decode: time per step (ms)")]
    for ax, rows, field, title in panels:
        for name in dict.fromkeys(r.backend for r in rows):
            mine = [r for r in rows if r.backend == name]
            ax.plot([r.length for r in mine], [getattr(r, field) for r in mine], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T" if rows is prefill else "cached keys S")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Attention backends, SmolLM2 shape (9 q heads, 3 kv heads, d=64), one layer")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def default_backends() -> tuple[dict[str, Attention], dict[str, Attention]]:
    prefill = {n: BACKENDS[n]() for n in ("reference", "sdpa", "tiled")}
    decode = {n: BACKENDS[n]() for n in ("sdpa", "decode", "decode-splitk")}
    return prefill, decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=None)
    p.add_argument("--decode-lengths", type=int, nargs="*", default=None)
    p.add_argument("--batch", type=int, default=1, help="sequences per decode step")
    p.add_argument("--model-context", type=int, default=None,
                   help="also time whole SmolLM2 decode steps at this context (default: 2048 full, off quick)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--plot", default=None, help="default: bench/results/<result name>.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = quick_mode()
    load_before = os.getloadavg()[0]
    prefill_lengths = args.prefill_lengths or (QUICK_PREFILL if quick else FULL_PREFILL)
    decode_lengths = args.decode_lengths or (QUICK_DECODE if quick else FULL_DECODE)
    prefill_backends, decode_backends = default_backends()
    prefill = run_prefill(prefill_backends, prefill_lengths)
    decode = run_decode(decode_backends, decode_lengths, batch=args.batch)
    print_table(prefill, "reference", "prefill attention, one causal sequence of T tokens")
    print_table(decode, "decode", f"decode attention, {args.batch} sequence(s) x 1 new token vs S cached keys")
    model_context = args.model_context if args.model_context is not None else (0 if quick else 2048)
    model_step = {}
    if model_context:
        model_step = run_model_decode(["sdpa", "decode", "decode-splitk", "auto"], model_context)
        print(f"whole SmolLM2 decode step, 1 sequence, {model_context} cached tokens (median ms): "
              + ", ".join(f"{n} {ms:.1f}" for n, ms in model_step.items()))
    name = "attention" + (f"_threads{args.threads}" if args.threads else "") \
        + (f"_batch{args.batch}" if args.batch != 1 else "") + ("_quick" if quick else "")
    plot_path = args.plot or f"bench/results/{name}.png"
    plot(prefill, decode, plot_path)
    path = save_result(name, {
        "shape": SHAPE, "dtype": "float32", "decode_batch": args.batch,
        "load_average_1m": [load_before, os.getloadavg()[0]],   # before, after: other jobs on the machine
        "rows": [asdict(r) for r in prefill + decode],
        "model_decode_step_ms": {"context": model_context, **model_step},
        "speedup_vs_reference": {f"{k[0]}/{k[1]}": v for k, v in ratios(prefill, "reference").items()},
        "speedup_vs_decode": {f"{k[0]}/{k[1]}": v for k, v in ratios(decode, "decode").items()},
    })
    print(f"wrote {path} and {plot_path}")
    return 0
