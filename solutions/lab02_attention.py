# %% [markdown]
# # Lab 02: Attention, from the formula to tiles
#
# Companion to `lessons/02-attention.md`. Attention is
# `softmax(Q K^T / sqrt(D) + causal mask) V`; how you *compute* it decides how
# much memory a long prompt needs and how fast a decode step runs. You will write
#
# 1. **the textbook formula with grouped-query attention** — several query heads
#    share one key/value head (`naive_attention`);
# 2. **the online-softmax tile update** at the heart of FlashAttention — fold one
#    tile of scores into a running max, running sum and running output
#    (`online_softmax_update`), so the T x T score matrix never exists;
# 3. **the split-K merge** of FlashDecoding — combine partial attentions over
#    chunks of the KV cache with their log-sum-exps (`merge_partials`).
#
# Fill in every `raise NotImplementedError` and grade yourself with
#
#     python -m minisys labs start 02     # once: copies this notebook to work/02-attention.ipynb
#     python -m minisys grade work/02-attention.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).
#
# The tests compare your code with torch's own `softmax`, `logsumexp` and
# `scaled_dot_product_attention`. The last cells time and measure the memory of
# the naive, fused and tiled forms as the sequence grows, and of decode
# attention with and without split-K, and plot them.

# %%
import math

import torch

from minisys.attention import AttentionMetadata
from minisys.attention.decode import partial_attention
from minisys.bench.memory import AllocationTracker

torch.manual_seed(0)

# %% [markdown]
# ## 1. The formula, with grouped-query attention
#
# One sequence: `q` is `(T, Hq, D)` (T new tokens), `k` and `v` are `(S, Hkv, D)`
# (its S keys: `S - T` cached ones, then the T new ones). Query `i` sits at
# position `S - T + i` and may attend to keys `0 .. S - T + i` (the causal mask
# is aligned to the **bottom-right** corner; with no cache S == T and it is the
# usual lower triangle).
#
# **Grouped-query attention (GQA).** There are fewer KV heads than query heads:
# `G = Hq // Hkv` consecutive query heads share one KV head, so query head `h`
# reads KV head `h // G`. (SmolLM2: 9 query heads, 3 KV heads, G = 3.) With
# `Hkv == Hq` this is ordinary multi-head attention; with `Hkv == 1` it is
# multi-query attention.
#
# Write `naive_attention`: compute the full `(Hq, T, S)` score matrix in fp32,
# scaled by `1 / sqrt(D)`, set the masked entries to `-inf`, softmax over the
# keys, multiply by V. Return `(T, Hq, D)` in `q`'s dtype.

# %%
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (T, Hq, D), k/v (S, Hkv, D), S >= T -> (T, Hq, D): causal, bottom-right aligned, GQA."""
    ### BEGIN SOLUTION
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)        # query head h reads KV head h // G
    qh = q.float().transpose(0, 1)                                     # (Hq, T, D)
    kh = k[:, kv_head].float().transpose(0, 1)                         # (Hq, S, D)
    vh = v[:, kv_head].float().transpose(0, 1)                         # (Hq, S, D)
    scores = qh @ kh.transpose(1, 2) / math.sqrt(D)                    # (Hq, T, S)
    allowed = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh).transpose(0, 1).to(q.dtype)   # (T, Hq, D)
    ### END SOLUTION


# %% [markdown]
# The score matrix is the problem: it has `Hq * T * S` entries. Run the next
# cell to watch the allocations (`AllocationTracker` records every tensor torch
# allocates inside the `with` block).

# %% tags=["benchmark"]
T = 1024
q, k, v = torch.randn(T, 9, 64), torch.randn(T, 3, 64), torch.randn(T, 3, 64)
with AllocationTracker() as mem:
    naive_attention(q, k, v)
print(f"T={T}: largest tensor {mem.largest_shape}, peak {mem.peak_bytes / 2**20:.1f} MiB "
      f"(Q, K and V together are {(q.numel() + k.numel() + v.numel()) * 4 / 2**20:.1f} MiB)")

# %% [markdown]
# ## 2. Online softmax: one tile at a time
#
# FlashAttention never builds the `T x S` scores. It walks over **tiles**: a
# block of query rows against a block of keys. For each query row it keeps
#
# * `m`   — the largest score seen so far,
# * `l`   — the sum of `exp(score - m)` over the keys seen so far,
# * `acc` — the sum of `exp(score - m) * v` over the keys seen so far.
#
# When a new tile of scores `s` arrives:
#
#     m_new = max(m, rowmax(s))
#     alpha = exp(m - m_new)          # what the old sums are worth under the new max
#     p     = exp(s - m_new)
#     l     = alpha * l + rowsum(p)
#     acc   = alpha * acc + p @ v
#
# and after the last tile the output is `acc / l` — exactly `softmax(s) @ v`,
# because every term ends up multiplied by `exp(-final max)`. Start from
# `m = -inf`, `l = 0`, `acc = 0`.
#
# One trap: a row can have *no* allowed key in a tile (all `-inf`, e.g. a
# diagonal tile under the causal mask). While its running max is still `-inf`,
# `exp(-inf - (-inf))` is `nan`. Use `0` instead of `m_new` in the exponentials
# of such rows (every term is then `exp(-inf) = 0`, as it should be).
#
# Shapes: `m`, `l` are `(..., Bq)`; `acc` is `(..., Bq, D)`; `scores` is
# `(..., Bq, Bk)` (already scaled and masked); `v` is `(..., Bk, D)`. Return the
# new `(m, l, acc)`; do not modify the inputs in place.

# %%
def online_softmax_update(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor,
                          scores: torch.Tensor, v: torch.Tensor):
    """Fold one tile of scores (..., Bq, Bk) and values (..., Bk, D) into the running (m, l, acc)."""
    ### BEGIN SOLUTION
    m_new = torch.maximum(m, scores.amax(dim=-1))                      # (..., Bq)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)                                      # (..., Bq)
    p = torch.exp(scores - m_safe.unsqueeze(-1))                       # (..., Bq, Bk)
    l_new = alpha * l + p.sum(dim=-1)
    acc_new = alpha.unsqueeze(-1) * acc + p @ v                        # (..., Bq, D)
    return m_new, l_new, acc_new
    ### END SOLUTION


# %% [markdown]
# With your update, this is the whole FlashAttention-2 forward pass for one
# sequence (given, read it): query blocks outside, key blocks inside; key blocks
# entirely above the causal diagonal are skipped; the `G` query heads of a KV
# head are stacked as rows, so K and V are never copied per query head. The
# biggest temporary is one `(Hkv, G * block_q, block_k)` tile, whatever T is.

# %%
def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    block_q: int = 128, block_k: int = 256) -> torch.Tensor:
    """q (T, Hq, D), k/v (S, Hkv, D) -> (T, Hq, D), like naive_attention, tile by tile."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    G, offset = Hq // Hkv, S - T
    kh, vh = k.float().permute(1, 0, 2), v.float().permute(1, 0, 2)    # (Hkv, S, D)
    out = torch.empty_like(q)
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        bq = q1 - q0
        qt = (q[q0:q1].float() / math.sqrt(D)).view(bq, Hkv, G, D) \
            .permute(1, 2, 0, 3).reshape(Hkv, G * bq, D)                 # (Hkv, G*bq, D)
        qpos = (torch.arange(q0, q1) + offset).repeat(G)                  # (G*bq,) position of each row
        m = torch.full((Hkv, G * bq), float("-inf"))
        l, acc = torch.zeros(Hkv, G * bq), torch.zeros(Hkv, G * bq, D)
        for k0 in range(0, offset + q1, block_k):                         # skip tiles above the diagonal
            k1 = min(k0 + block_k, offset + q1)
            scores = qt @ kh[:, k0:k1].transpose(1, 2)                    # (Hkv, G*bq, bk)
            scores = scores.masked_fill(torch.arange(k0, k1)[None, :] > qpos[:, None], float("-inf"))
            m, l, acc = online_softmax_update(m, l, acc, scores, vh[:, k0:k1])
        out[q0:q1] = (acc / l.unsqueeze(-1)).view(Hkv, G, bq, D).permute(2, 0, 1, 3) \
            .reshape(bq, Hq, D).to(q.dtype)
    return out


# %% tags=["benchmark"]
with AllocationTracker() as mem:
    out = tiled_attention(q, k, v)
print(f"T={T}: largest tensor {mem.largest_shape}, peak {mem.peak_bytes / 2**20:.1f} MiB")
print("max |tiled - naive| =", float((out - naive_attention(q, k, v)).abs().max()))

# %% [markdown]
# ## 3. Decode attention and the split-K merge
#
# A decode step brings **one** query per sequence, against S cached keys. Per KV
# head that is a matrix-vector product: each cached key is read once for a
# handful of multiply-adds, so a decode step is bound by memory bandwidth, and
# with few sequences a GPU has too little parallel work. FlashDecoding splits
# the cache into `N` chunks, computes a **partial** attention per chunk in
# parallel — its output `o_c`, normalised within the chunk, and the log-sum-exp
# of its scores `lse_c = log(sum_j exp(s_j))` — then merges:
#
#     w_c = exp(lse_c - max_c lse_c)
#     out = sum_c w_c * o_c / sum_c w_c
#
# This is exact: `exp(lse_c)` is chunk c's softmax denominator, so `w_c * o_c`
# is chunk c's un-normalised sum up to one common factor.
#
# Write `merge_partials`: `outs` is `(N, ..., D)`, `lses` is `(N, ...)`; return
# `(..., D)`. A chunk with no keys has `lse = -inf`; it must get weight 0 (and if
# *every* chunk is empty for a row, avoid `nan` in `lse - max` the same way as
# above; that row's output is then `0 / 0`, which no caller asks for).

# %%
def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """outs (N, ..., D), lses (N, ...) of N disjoint KV chunks -> attention over all of them (..., D)."""
    ### BEGIN SOLUTION
    lse_max = lses.amax(dim=0)                                         # (...)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(lses - lse_max)                                      # (N, ...)
    return (w.unsqueeze(-1) * outs).sum(dim=0) / w.sum(dim=0).unsqueeze(-1)
    ### END SOLUTION


# %% [markdown]
# Split-K decode for one sequence (given): cut the cache into `num_splits`
# nearly equal chunks, compute every chunk's partial attention at once with
# `minisys.attention.decode.partial_attention`, merge with your function.

# %%
def splitk_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_splits: int) -> torch.Tensor:
    """One new token: q (Hq, D), k/v (S, Hkv, D) -> (Hq, D), via num_splits KV chunks."""
    S, Hkv, D = k.shape
    qg = q.float().view(Hkv, -1, D) / math.sqrt(D)                     # (Hkv, G, D): head h -> KV head h // G
    C = math.ceil(S / num_splits)                                      # keys per chunk
    n_full = S // C
    pieces = [(0, n_full * C, n_full)] if n_full else []               # the full chunks, as views
    if n_full * C < S:
        pieces.append((n_full * C, S, 1))                              # a shorter last chunk
    outs, lses = [], []
    for start, end, n in pieces:
        o, s = partial_attention(qg, k[start:end].unflatten(0, (n, -1)), v[start:end].unflatten(0, (n, -1)))
        outs.append(o)                                                 # (n, Hkv, G, D)
        lses.append(s)                                                 # (n, Hkv, G)
    return merge_partials(torch.cat(outs), torch.cat(lses)).reshape(q.shape).to(q.dtype)


# %% [markdown]
# ## 4. GQA and the size of the KV cache
#
# The cache stores K and V for every layer, KV head and token. GQA shrinks it by
# the group size G. For SmolLM2-135M (30 layers, 9 query heads, 3 KV heads,
# head dim 64) in bf16:

# %%
def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes_per_element: int = 2) -> int:
    return 2 * layers * kv_heads * head_dim * bytes_per_element       # K and V

# %% tags=["benchmark"]
gqa, mha = kv_bytes_per_token(30, 3, 64), kv_bytes_per_token(30, 9, 64)
print(f"GQA (3 KV heads): {gqa / 1024:.2f} KiB/token, {gqa * 8192 / 2**20:.0f} MiB for an 8192-token context")
print(f"MHA (9 KV heads): {mha / 1024:.2f} KiB/token, {mha * 8192 / 2**20:.0f} MiB for an 8192-token context")

# %% [markdown]
# ## 5. Benchmark: naive vs fused vs tiled, and decode with and without split-K
#
# One layer of SmolLM2's attention shape (9 query heads, 3 KV heads, d = 64) in
# fp32, as the sequence grows: median time per call and peak memory allocated
# inside the call. Prefill compares minisys's `reference` (the naive formula),
# `sdpa` (torch's fused kernel) and **your** tiled attention; decode compares
# minisys's single-pass `decode`, its split-K `decode-splitk` and **your**
# split-K (8 chunks), for one sequence against S cached keys.
# `MINISYS_QUICK=1` (CI, the grader) uses short lengths; the full sweep is
# `python -m minisys bench attention`, which also writes JSON and a plot.

# %% tags=["benchmark"]
import os

from minisys.attention import BACKENDS
from minisys.bench import attention as bench

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
prefill_rows = bench.run_prefill({
    "reference": BACKENDS["reference"](),
    "sdpa": BACKENDS["sdpa"](),
    "tiled (yours)": lambda q, k, v, meta: tiled_attention(q, k, v),
}, bench.QUICK_PREFILL if quick else bench.FULL_PREFILL)
bench.print_table(prefill_rows, "reference", "prefill: one causal sequence of T tokens")

# %% tags=["benchmark"]
decode_rows = bench.run_decode({
    "decode": BACKENDS["decode"](),
    "decode-splitk": BACKENDS["decode-splitk"](),
    "split-K (yours)": lambda q, k, v, meta: splitk_decode(q[0], k, v, num_splits=8).unsqueeze(0),
}, bench.QUICK_DECODE if quick else bench.FULL_DECODE)
bench.print_table(decode_rows, "decode", "decode: 1 new token vs S cached keys")

# %% tags=["benchmark"]
os.makedirs("lab_outputs", exist_ok=True)
bench.plot(prefill_rows, decode_rows, "lab_outputs/lab02_attention.png")
from IPython.display import Image, display  # noqa: E402

display(Image("lab_outputs/lab02_attention.png"))
