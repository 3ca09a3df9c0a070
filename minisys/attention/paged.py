"""Paged attention: read K/V straight out of the block pool through block tables.

With a paged cache in ``return_pools`` mode (see `minisys.kv.paged`), the
model hands this backend the layer's pools, k_pool / v_pool of shape
(num_blocks, block_size, Hkv, D), instead of packed context K/V. For the
whole batch at once:

1. gather each sequence's blocks: ``k_pool[block_tables]`` ->
   (B, max_blocks, block_size, Hkv, D) -> (B, K, Hkv, D), K = max_blocks * block_size;
2. pad the packed queries to (B, Qmax, Hq, D) (a decode step: Qmax = 1, no copy);
3. one batched attention, grouped-query heads folded into the query axis
   (no repeat of K/V), with a mask that hides keys past each sequence's
   length and applies the bottom-right causal rule;
4. unpad back to the packed (T, Hq, D) layout.

Given packed K/V (a contiguous cache, no cache at all) it falls back to
`SDPAAttention`, so it is a drop-in backend either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata
from .sdpa import SDPAAttention


class PagedAttention(AttentionBackend):
    name = "paged"
    reads_block_tables = True        # PagedKVCache returns its pools to this backend

    def __call__(self, q, k, v, meta):
        if k.dim() == 4:
            if meta.block_tables is None:
                raise ValueError("paged attention over a block pool needs meta.block_tables")
            return paged_attention(q, k, v, meta)
        return SDPAAttention()(q, k, v, meta)

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self(q, k, v, meta)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q (T, Hq, D); k_pool, v_pool (num_blocks, block_size, Hkv, D) -> (T, Hq, D)."""
    device = q.device
    B, T, Hq, D = meta.num_seqs, q.shape[0], q.shape[1], q.shape[2]
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    G = Hq // Hkv
    qmax, kmax = max(meta.seqlens_q), max(meta.seqlens_k)
    nb = -(-kmax // bs)
    bt = meta.block_tables[:, :nb].to(device)                               # (B, nb)
    K = nb * bs
    k = k_pool[bt].reshape(B, K, Hkv, D).transpose(1, 2)                    # (B, Hkv, K, D)
    v = v_pool[bt].reshape(B, K, Hkv, D).transpose(1, 2)

    if qmax == 1:                                                           # decode: one query each
        qp = q.view(B, 1, Hq, D)
        rows = cols = None
    else:
        rows = torch.repeat_interleave(torch.arange(B, device=device),
                                       torch.tensor(meta.seqlens_q, device=device))   # (T,) sequence
        cols = torch.arange(T, device=device) - meta.cu_seqlens_q.to(device)[rows]    # (T,) query index
        qp = q.new_zeros(B, qmax, Hq, D)
        qp[rows, cols] = q
    qh = qp.view(B, qmax, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * qmax, D)

    lens_k = torch.tensor(meta.seqlens_k, device=device)
    ctx = lens_k - torch.tensor(meta.seqlens_q, device=device)             # (B,) cached tokens
    i = torch.arange(qmax, device=device).view(1, qmax, 1)
    j = torch.arange(K, device=device).view(1, 1, K)
    allowed = (j <= ctx.view(B, 1, 1) + i) & (j < lens_k.view(B, 1, 1))     # (B, Qmax, K)
    mask = allowed.unsqueeze(1).expand(B, G, qmax, K).reshape(B, 1, G * qmax, K)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask)            # (B, Hkv, G*Qmax, D)
    o = o.view(B, Hkv, G, qmax, D).permute(0, 3, 1, 2, 4).reshape(B, qmax, Hq, D)
    if rows is None:
        return o.reshape(T, Hq, D)
    return o[rows, cols]                                                    # (T, Hq, D)
