"""Reference attention: the textbook formula, one sequence at a time.

    O = softmax(Q K^T / sqrt(D) + M) V,   M = 0 where allowed, -inf where masked

It materialises the full (Hq, q_len, k_len) score matrix in fp32. It is slow
and memory hungry on purpose: it is the oracle every other backend is tested
against, so it must be obviously correct.
"""
from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata, causal_mask, expand_kv_heads


class ReferenceAttention(AttentionBackend):
    name = "reference"

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        scale = self.scale(q.shape[-1])
        cq, ck = meta.cu_seqlens_q.tolist(), meta.cu_seqlens_k.tolist()
        for i in range(meta.num_seqs):
            qi = q[cq[i]:cq[i + 1]].float().transpose(0, 1)                        # (Hq, q_len, D)
            ki = expand_kv_heads(k[ck[i]:ck[i + 1]], q.shape[1]).float().transpose(0, 1)  # (Hq, k_len, D)
            vi = expand_kv_heads(v[ck[i]:ck[i + 1]], q.shape[1]).float().transpose(0, 1)  # (Hq, k_len, D)
            scores = qi @ ki.transpose(1, 2) * scale                                # (Hq, q_len, k_len)
            mask = causal_mask(qi.shape[1], ki.shape[1], device=q.device)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[cq[i]:cq[i + 1]] = (probs @ vi).transpose(0, 1).to(q.dtype)         # (q_len, Hq, D)
        return out
