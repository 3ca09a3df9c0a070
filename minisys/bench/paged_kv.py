"""Lesson 03's benchmark: how much KV memory holds real tokens, paged vs contiguous.

Workload: chat-like requests, seeded. Prompt and output lengths are
lognormal (ShareGPT-like: a few hundred tokens each, a long tail), the
client asks for ``max_tokens`` (the output is cut there) and the server
runs with ``max_model_len`` positions per sequence.

Three layouts hold every request at its final length (prompt + output):

- contiguous, ``max_model_len`` per request (a static cache, as HF's
  StaticCache or a server that cannot know the output length reserves);
- contiguous, ``prompt + max_tokens`` per request (minisys's eager baseline
  and HF's default generate: the reservation the request asks for);
- paged: blocks of ``block_size`` tokens from `BlockAllocator`, taken as the
  sequence grows; waste is at most ``block_size - 1`` slots per sequence.

Reported: the fraction of allocated KV slots holding real tokens, how many
requests fit in a fixed KV budget, and the time of one decode step of
attention over a batch: contiguous cache + sdpa (per sequence), paged cache
gathered + sdpa, and paged attention reading blocks directly.

    python -m minisys bench paged-kv               # full sizes
    MINISYS_QUICK=1 python -m minisys bench paged-kv
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .common import median_time, quick_mode, save_result


@dataclass
class Request:
    prompt_len: int
    output_len: int

    @property
    def total(self) -> int:
        return self.prompt_len + self.output_len


def chat_workload(n: int, seed: int = 0, max_model_len: int = 2048, max_tokens: int = 512,
                  prompt_median: float = 250, output_median: float = 180) -> list[Request]:
    """``n`` chat-like requests: lognormal prompt/output lengths (sigma 0.9 / 0.8), seeded."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(math.log(prompt_median), 0.9, n), 4, max_model_len - max_tokens)
    outputs = np.clip(rng.lognormal(math.log(output_median), 0.8, n), 1, max_tokens)
    return [Request(int(p), int(o)) for p, o in zip(prompts, outputs)]


def paged_utilisation(requests: list[Request], block_size: int, allocator_cls=None) -> float:
    """Real tokens / allocated slots with every request grown to its final length in one pool.

    ``allocator_cls(num_blocks, block_size)`` needs ``allocate(seq_id, token_ids)``,
    ``append_slot(seq_id, token_id)`` and ``num_free`` (the lab passes the student's class).
    """
    if allocator_cls is None:
        from ..kv.block_allocator import BlockAllocator
        allocator_cls = BlockAllocator
    num_blocks = sum(-(-r.total // block_size) for r in requests)
    alloc = allocator_cls(num_blocks, block_size)
    for i, r in enumerate(requests):
        assert alloc.allocate(i, [i] * r.prompt_len), "the pool is sized to hold every request"
        for _ in range(r.output_len):
            assert alloc.append_slot(i, i)
    used_slots = (num_blocks - alloc.num_free) * block_size
    return sum(r.total for r in requests) / used_slots


def contiguous_utilisation(requests: list[Request], reserve_per_request) -> float:
    return sum(r.total for r in requests) / sum(reserve_per_request(r) for r in requests)


def fits_contiguous(requests: list[Request], budget_tokens: int, reserve_per_request) -> int:
    """How many requests, admitted in order, fit when each reserves its contiguous region."""
    used = n = 0
    for r in requests:
        used += reserve_per_request(r)
        if used > budget_tokens:
            break
        n += 1
    return n


def fits_paged(requests: list[Request], budget_tokens: int, block_size: int) -> int:
    """How many requests, admitted in order at their final length, fit in the block pool."""
    from ..kv.block_allocator import BlockAllocator
    alloc = BlockAllocator(budget_tokens // block_size, block_size, enable_prefix_caching=False)
    n = 0
    for i, r in enumerate(requests):
        if not alloc.allocate(i, [0] * r.total):
            break
        n += 1
    return n


@dataclass
class AttentionTimes:
    batch: int
    mean_context: float
    contiguous_sdpa_ms: float
    paged_gather_sdpa_ms: float
    paged_attention_ms: float


def decode_attention_times(requests: list[Request], block_size: int = 16, device: str = "cpu",
                           dtype: torch.dtype = torch.float32, repeats: int = 15) -> AttentionTimes:
    """One decode step of cache update + attention, SmolLM2's head shapes (9 q heads, 3 KV heads, D=64)."""
    from ..attention import AttentionMetadata
    from ..attention.paged import PagedAttention
    from ..attention.sdpa import SDPAAttention
    from ..kv.block_allocator import BlockAllocator
    from ..kv.contiguous import ContiguousKVCache
    from ..kv.paged import PagedKVCache, block_table_tensor
    from ..model.config import ModelConfig

    cfg = ModelConfig(vocab_size=16, hidden_size=576, intermediate_size=16, num_layers=1, num_heads=9,
                      num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
    ctx = [r.total - 1 for r in requests]
    B = len(requests)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 9, 64, generator=g).to(device, dtype)
    k = torch.randn(B, 3, 64, generator=g).to(device, dtype)
    v = torch.randn(B, 3, 64, generator=g).to(device, dtype)

    contiguous = ContiguousKVCache(cfg, max(ctx) + 1, B, dtype, device)
    meta_c = AttentionMetadata(seqlens_q=[1] * B, context_lens=ctx)
    sdpa = SDPAAttention()

    num_blocks = sum(-(-(c + 1) // block_size) for c in ctx)
    alloc = BlockAllocator(num_blocks, block_size, enable_prefix_caching=False, seed=0)
    tables = [alloc.allocate(i, [0] * (c + 1)).table for i, c in enumerate(ctx)]
    meta_p = AttentionMetadata(seqlens_q=[1] * B, context_lens=ctx,
                               slot_mapping=torch.tensor([t.slot(c) for t, c in zip(tables, ctx)], device=device),
                               block_tables=block_table_tensor([t.block_ids for t in tables], device))
    pools = PagedKVCache(cfg, num_blocks, block_size, dtype, device)
    paged = PagedAttention()

    def run_contiguous():
        contiguous.write(0, k, v, meta_c)
        return contiguous.read(0, meta_c).attend(sdpa, q, meta_c)      # sdpa.forward_packed

    def run_gather():
        pools.write(0, k, v, meta_p)
        kv = pools.read(0, meta_p).gather(meta_p)                        # the packed (S, Hkv, D) copy
        return sdpa.forward_packed(q, kv.k, kv.v, meta_p)

    def run_paged():
        pools.write(0, k, v, meta_p)
        return pools.read(0, meta_p).attend(paged, q, meta_p)           # paged.forward_paged

    with torch.no_grad():
        times = interleaved_median_ms([run_contiguous, run_gather, run_paged], repeats)
    return AttentionTimes(B, float(np.mean(ctx)), *times)


def interleaved_median_ms(fns, repeats: int) -> list[float]:
    """Median ms of each fn, timed round-robin so a noisy neighbour slows all of them alike."""
    samples = [[] for _ in fns]
    for f in fns:
        f()                                                      # warm-up
    for _ in range(repeats):
        for s, f in zip(samples, fns):
            s.append(median_time(f, repeats=1, warmup=0) * 1e3)
    return [float(np.median(s)) for s in samples]


def run(n_requests: int, budget_tokens: int, max_model_len: int, max_tokens: int,
        block_sizes: list[int], attn_batch: int, seed: int = 0) -> dict:
    reqs = chat_workload(n_requests, seed, max_model_len, max_tokens)
    static = lambda r: max_model_len                    # noqa: E731
    eager = lambda r: r.prompt_len + max_tokens         # noqa: E731
    util = {"contiguous max_model_len": contiguous_utilisation(reqs, static),
            "contiguous prompt+max_tokens": contiguous_utilisation(reqs, eager)}
    fits = {"contiguous max_model_len": fits_contiguous(reqs, budget_tokens, static),
            "contiguous prompt+max_tokens": fits_contiguous(reqs, budget_tokens, eager)}
    for bs in block_sizes:
        util[f"paged block {bs}"] = paged_utilisation(reqs, bs)
        fits[f"paged block {bs}"] = fits_paged(reqs, budget_tokens, bs)
    times = decode_attention_times(reqs[:attn_batch], block_size=16)
    return {"requests": [asdict(r) for r in reqs], "utilisation": util, "fits": fits,
            "attention": asdict(times), "budget_tokens": budget_tokens, "max_model_len": max_model_len,
            "max_tokens": max_tokens}


def print_report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    reqs = res["requests"]
    t = Table(title=f"KV memory on {len(reqs)} chat-like requests (max_model_len {res['max_model_len']}, "
                    f"max_tokens {res['max_tokens']}); budget {res['budget_tokens']} token slots")
    for col in ("layout", "slots holding real tokens", "requests that fit in the budget"):
        t.add_column(col, justify="right")
    for name, u in res["utilisation"].items():
        t.add_row(name, f"{100 * u:.1f}%", str(res["fits"][name]))
    Console().print(t)
    a = res["attention"]
    t = Table(title=f"one decode step, cache update + attention: batch {a['batch']}, "
                    f"mean context {a['mean_context']:.0f} tokens")
    for col in ("path", "ms / step", "vs contiguous"):
        t.add_column(col, justify="right")
    for name, key in [("contiguous cache + sdpa", "contiguous_sdpa_ms"),
                      ("paged, gather + sdpa", "paged_gather_sdpa_ms"),
                      ("paged attention (block tables)", "paged_attention_ms")]:
        t.add_row(name, f"{a[key]:.3f}", f"{a['contiguous_sdpa_ms'] / a[key]:.2f}x")
    Console().print(t)


def plot(res: dict, path: str) -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook

    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    reqs = res["requests"]
    axes[0].hist([r["prompt_len"] for r in reqs], bins=30, alpha=0.6, label="prompt")
    axes[0].hist([r["prompt_len"] + r["output_len"] for r in reqs], bins=30, alpha=0.6, label="prompt + output")
    axes[0].set_xlabel("tokens"), axes[0].set_ylabel("requests"), axes[0].legend()
    axes[0].set_title("workload lengths")
    names = list(res["utilisation"])
    short = [n.replace("contiguous max_model_len", "contig.\nmax len").replace(
        "contiguous prompt+max_tokens", "contig.\nprompt+max").replace("paged ", "paged\n") for n in names]
    axes[1].bar(short, [100 * res["utilisation"][n] for n in names],
                color=["tab:red", "tab:orange"] + ["tab:green"] * (len(names) - 2))
    axes[1].axhline(95, ls="--", c="k", lw=0.8)
    axes[1].set_ylabel("% of allocated KV slots holding tokens")
    axes[1].set_title("KV memory utilisation")
    axes[2].bar(short, [res["fits"][n] for n in names],
                color=["tab:red", "tab:orange"] + ["tab:green"] * (len(names) - 2))
    axes[2].set_ylabel(f"requests fitting in {res['budget_tokens']} slots")
    axes[2].set_title("capacity at a fixed KV budget")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench paged-kv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--budget-tokens", type=int, default=65536)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--block-sizes", type=int, nargs="*", default=[8, 16, 32])
    p.add_argument("--attn-batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="bench/results/paged_kv.png")
    args = p.parse_args(argv)
    quick = quick_mode()
    n = args.requests or (200 if quick else 1000)
    batch = args.attn_batch or (8 if quick else 32)
    res = run(n, args.budget_tokens, args.max_model_len, args.max_tokens, args.block_sizes, batch, args.seed)
    print_report(res)
    plot(res, args.plot)
    res.pop("requests")
    path = save_result("paged_kv" + ("_quick" if quick else ""), res)
    print(f"wrote {path} and {args.plot}")
    return 0
