"""Paged attention: read K/V straight out of the block pool through block tables.

A paged cache (`minisys.kv.paged`) hands attention the layer's pools, a
`PagedKV` view: k_pool / v_pool of shape (num_blocks, block_size, Hkv, D).
Other backends copy each sequence's context out of them first (the gather
path, `AttentionBackend.forward_paged`); this one overrides `forward_paged`
to read the blocks through the block tables without building the packed
(S, Hkv, D) copy. A step mixes two kinds of sequences, and they are served
differently:

* **decode** sequences (one new query each) are batched: gather each one's
  blocks, ``k_pool[block_tables]`` -> (B, nb, block_size, Hkv, D) -> (B, K, Hkv, D),
  fold the query heads sharing a KV head into one axis (no repeat of K/V),
  and run one attention with a mask that hides the keys past each sequence's
  length. Padding to the longest sequence of the batch is paid for in memory
  traffic, so the decode sequences are first sorted by length and cut into
  a few groups (`length_groups`): each group pads only to its own longest.
* **prefill** chunks (several new queries) run one sequence at a time on its
  gathered K/V with the bottom-right causal mask (`sdpa_one`); padding a
  256-token prompt and 63 one-token decodes to a (64, 256) query block would
  do 64x the work.

A GPU kernel (vLLM's PagedAttention) reads the blocks in place instead of
gathering them; in plain torch the gather is the price of paging.
Given packed K/V (a contiguous cache, no cache at all), ``forward_packed``
runs `SDPAAttention`, so it is a drop-in backend either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata
from .sdpa import SDPAAttention, sdpa_one

GROUP_SIZE = 16


class PagedAttention(AttentionBackend):
    """Paged K/V: read through the block tables (`paged_attention`); packed K/V: SDPA."""

    name = "paged"

    def __init__(self) -> None:
        self.packed = SDPAAttention()

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.packed.forward(q, k, v, meta)

    def forward_paged(self, q, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        return paged_attention(q, k_pool, v_pool, meta)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q (T, Hq, D); k_pool, v_pool (num_blocks, block_size, Hkv, D) -> (T, Hq, D)."""
    if meta.block_tables is None:
        raise ValueError("paged attention over a block pool needs meta.block_tables")
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"expected q (T,Hq,D), pools (num_blocks,block_size,Hkv,D); got "
                         f"{tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    out = torch.empty_like(q)
    lens_k, cu_q = meta.seqlens_k, meta.cu_seqlens_q.tolist()
    bs = k_pool.shape[1]
    decode = [i for i, n in enumerate(meta.seqlens_q) if n == 1]
    for group in length_groups(decode, lens_k, GROUP_SIZE):
        rows = torch.tensor([cu_q[i] for i in group], device=q.device)        # (b,) query row of each
        tables = meta.block_tables[group].to(q.device)                         # (b, max_blocks)
        out[rows] = decode_group(q[rows], k_pool, v_pool, tables, [lens_k[i] for i in group])
    for i, n in enumerate(meta.seqlens_q):
        if n > 1:
            nb = -(-lens_k[i] // bs)
            blocks = meta.block_tables[i, :nb].to(q.device)                   # (nb,)
            k = k_pool.index_select(0, blocks).flatten(0, 1)[:lens_k[i]]      # (k_len, Hkv, D)
            v = v_pool.index_select(0, blocks).flatten(0, 1)[:lens_k[i]]
            out[cu_q[i]:cu_q[i + 1]] = sdpa_one(q[cu_q[i]:cu_q[i + 1]], k, v)
    return out


def length_groups(seqs: list[int], lengths: list[int], group_size: int) -> list[list[int]]:
    """``seqs`` sorted by ``lengths[seq]`` and cut into groups of at most ``group_size``."""
    order = sorted(seqs, key=lambda i: lengths[i])
    return [order[j:j + group_size] for j in range(0, len(order), group_size)]


def decode_group(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 block_tables: torch.Tensor, lens_k: list[int]) -> torch.Tensor:
    """One query per sequence: q (b, Hq, D), block_tables (b, >= nb) -> (b, Hq, D)."""
    b, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    G = Hq // Hkv
    nb = -(-max(lens_k) // bs)
    K = nb * bs
    bt = block_tables[:, :nb].reshape(-1)                                      # (b * nb,)
    # index_select is the same gather as k_pool[bt] but several times faster on a CPU
    k = k_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)          # (b, Hkv, K, D)
    v = v_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)
    qh = q.view(b, Hkv, G, D)                                                  # heads sharing a KV head
    valid = torch.arange(K, device=q.device) < torch.tensor(lens_k, device=q.device).view(b, 1)  # (b, K)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid.view(b, 1, 1, K))  # (b, Hkv, G, D)
    return o.reshape(b, Hq, D)


def decode_static(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """`decode_group` with the lengths in a device tensor: q (b, Hq, D), block_tables (b, W), seq_lens (b,)
    -> (b, Hq, D). It reads all W blocks of every row and masks the keys past each length, so its shapes
    depend on W only (CUDA-graph safe, no host sync); the plain-torch twin of the Triton decode kernel.
    Every entry of ``block_tables`` must be a valid block id (padding included)."""
    b, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    G = Hq // Hkv
    K = block_tables.shape[1] * bs
    bt = block_tables.reshape(-1)                                              # (b * W,)
    k = k_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)          # (b, Hkv, K, D)
    v = v_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)
    qh = q.view(b, Hkv, G, D)                                                  # heads sharing a KV head
    valid = torch.arange(K, device=q.device) < seq_lens.view(b, 1)             # (b, K)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid.view(b, 1, 1, K))  # (b, Hkv, G, D)
    return o.reshape(b, Hq, D)
