"""Tiled attention: the FlashAttention algorithm written in plain torch.

The naive form builds the whole (Hq, T, T) score matrix, writes it to memory,
reads it back for the softmax, writes the probabilities, reads them again for
the product with V. FlashAttention never builds it. It walks over blocks of
``block_q`` queries; for each, it streams blocks of ``block_k`` keys/values and
keeps three running quantities per query row (the *online softmax*):

    m    running max of the scores seen so far               (Hkv, G, Bq)
    l    running sum of exp(score - m)                        (Hkv, G, Bq)
    acc  running sum of exp(score - m) * v                    (Hkv, G, Bq, D)

For each new tile of scores S = q k^T / sqrt(D) (masked entries = -inf):

    m_new = max(m, rowmax(S))
    alpha = exp(m - m_new)                # rescales what was summed under the old max
    P     = exp(S - m_new)
    l     = alpha * l + rowsum(P)
    acc   = alpha * acc + P @ v

and after the last tile ``O = acc / l``. This is *exact*, not an approximation:
every term of the sums is multiplied by exp(old max - new max) whenever the max
changes, so at the end each sum is the one computed with the global row max.
``m + log(l)`` is the row's log-sum-exp (the split-K decode merge uses it).

Properties this module keeps (and tests check):
  * no tensor with T x T entries per head is ever allocated: the largest
    temporaries are (Hkv, G * block_q, block_k) score tiles;
  * grouped-query attention without copying KV heads: queries are viewed as
    (Hkv, G, ...) with G = Hq // Hkv so each KV head serves its G query heads;
  * key blocks entirely above the causal diagonal are skipped, not masked
    (FlashAttention-2's causal saving: about half the work of a prefill);
  * accumulation in fp32 whatever the input dtype; output in q's dtype.
"""
from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata


def online_softmax_update(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor,
                          scores: torch.Tensor, v: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of scores into the running (max, sum, accumulator).

    m, l: (..., Bq) running max and running sum of exp(score - m);
    acc: (..., Bq, D) running sum of exp(score - m) * v;
    scores: (..., Bq, Bk) scaled scores of this tile, -inf where masked;
    v: (..., Bk, D) values of this tile.  Returns the new (m, l, acc).

    Start from m = -inf, l = 0, acc = 0. A row may have no allowed key in a
    tile (all -inf): while its running max is still -inf, exp(-inf - -inf)
    would be nan, so the max is replaced by 0 for the exponentials of such rows
    (every term is then exp(-inf) = 0, which is right).
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))                       # (..., Bq)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)                                       # (..., Bq) rescale old sums
    p = torch.exp(scores - m_safe.unsqueeze(-1))                        # (..., Bq, Bk)
    l_new = alpha * l + p.sum(dim=-1)
    acc_new = alpha.unsqueeze(-1) * acc + p @ v                         # (..., Bq, D)
    return m_new, l_new, acc_new


class TiledAttention(AttentionBackend):
    """FlashAttention-2 loop order: queries blocks outside, key blocks inside.

    block_q (default 128) and block_k (default 256) trade Python loop overhead
    against the size of the per-tile temporaries: a tile is
    Hq * block_q * block_k fp32 scores (128 KiB per head at the defaults),
    independent of the sequence length. On a GPU the blocks would be sized to
    fit in on-chip SRAM; here they are sized so that torch's per-op overhead
    stays small next to each tile's matmuls.
    """

    name = "tiled"

    def __init__(self, block_q: int = 128, block_k: int = 256) -> None:
        if block_q <= 0 or block_k <= 0:
            raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")
        self.block_q, self.block_k = block_q, block_k

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        cq, ck = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
        for i in range(meta.num_seqs):
            out[cq[i]:cq[i + 1]] = self.attend_one(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]],
                                                   v[ck[i]:ck[i + 1]])
        return out

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence: q (q_len, Hq, D), k/v (k_len, Hkv, D) -> (q_len, Hq, D), causal."""
        q_len, num_q_heads, head_dim = q.shape
        k_len, num_kv_heads, _ = k.shape
        group = num_q_heads // num_kv_heads
        offset = k_len - q_len                     # query j sits at position offset + j
        scale = self.scale(head_dim)
        kh = k.permute(1, 0, 2)                    # (Hkv, k_len, D), a view
        vh = v.permute(1, 0, 2)                    # (Hkv, k_len, D), a view
        out = torch.empty_like(q)
        for q0 in range(0, q_len, self.block_q):
            q1 = min(q0 + self.block_q, q_len)
            bq = q1 - q0
            # (bq, Hq, D) -> (Hkv, G * bq, D): the G query heads of a KV head stacked as rows
            qt = (q[q0:q1].float() * scale).view(bq, num_kv_heads, group, head_dim) \
                .permute(1, 2, 0, 3).reshape(num_kv_heads, group * bq, head_dim)
            m = torch.full((num_kv_heads, group * bq), float("-inf"), device=q.device)
            l = torch.zeros(num_kv_heads, group * bq, device=q.device)
            acc = torch.zeros(num_kv_heads, group * bq, head_dim, device=q.device)
            last_key = offset + q1                 # keys >= last_key are masked for every row
            for k0 in range(0, last_key, self.block_k):
                k1 = min(k0 + self.block_k, last_key)
                scores = qt @ kh[:, k0:k1].float().transpose(1, 2)          # (Hkv, G*bq, bk)
                if k1 > offset + q0 + 1:           # tile crosses the diagonal: mask part of it
                    scores = scores.masked_fill(
                        ~_tile_mask(q0, q1, k0, k1, offset, group, q.device), float("-inf"))
                m, l, acc = online_softmax_update(m, l, acc, scores, vh[:, k0:k1].float())
            o = acc / l.unsqueeze(-1)                                         # (Hkv, G*bq, D)
            out[q0:q1] = o.view(num_kv_heads, group, bq, head_dim).permute(2, 0, 1, 3) \
                .reshape(bq, num_q_heads, head_dim).to(q.dtype)               # (bq, Hq, D)
        return out


def _tile_mask(q0: int, q1: int, k0: int, k1: int, offset: int, group: int,
               device) -> torch.Tensor:
    """(G * bq, bk) bool, True where a query row of the tile may see the key column."""
    qpos = torch.arange(q0, q1, device=device) + offset                  # (bq,)
    kpos = torch.arange(k0, k1, device=device)                           # (bk,)
    allowed = kpos.unsqueeze(0) <= qpos.unsqueeze(1)                     # (bq, bk)
    return allowed.repeat(group, 1)                                      # rows ordered (G, bq)
