"""Attention through torch's fused ``scaled_dot_product_attention``.

torch picks a fused kernel (flash / memory-efficient / math) for the device.
We call it once per sequence of the packed batch. Its ``is_causal`` flag
aligns the mask to the top-left corner, which is only right when
q_len == k_len (a prefill); with a cached context we pass the bottom-right
aligned mask explicitly, and a single decode query needs no mask at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata, causal_mask, expand_kv_heads


class SDPAAttention(AttentionBackend):
    name = "sdpa"

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        cq, ck = meta.cu_q, meta.cu_k
        for i in range(meta.num_seqs):
            out[cq[i]:cq[i + 1]] = sdpa_one(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]])
        return out


def sdpa_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence: q (q_len, Hq, D), k/v (k_len, Hkv, D) -> (q_len, Hq, D), bottom-right causal."""
    qi = q.transpose(0, 1).unsqueeze(0)                                          # (1, Hq, q_len, D)
    ki = expand_kv_heads(k, q.shape[1]).transpose(0, 1).unsqueeze(0)             # (1, Hq, k_len, D)
    vi = expand_kv_heads(v, q.shape[1]).transpose(0, 1).unsqueeze(0)
    q_len, k_len = qi.shape[2], ki.shape[2]
    if q_len == 1:
        oi = F.scaled_dot_product_attention(qi, ki, vi)
    elif q_len == k_len:
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
    else:
        mask = causal_mask(q_len, k_len, device=q.device)
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
    return oi.squeeze(0).transpose(0, 1)                                         # (q_len, Hq, D)
