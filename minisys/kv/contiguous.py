"""A contiguous KV cache: one max-length buffer per sequence slot.

This is the cache of the eager baseline (and of Hugging Face's default
generate): every sequence slot reserves ``max_len`` positions up front, used
or not. Lesson 03 measures how much of it holds real tokens, and replaces it
with a paged cache.

Layout: ``k[layer]`` and ``v[layer]`` are (max_batch, max_len, Hkv, D).
Invariant: after `update` for sequence i, positions
``[0, context_lens[i] + seqlens_q[i])`` of its slot hold valid keys/values.
"""
from __future__ import annotations

import torch

from ..attention.base import AttentionMetadata
from ..model.config import ModelConfig
from .base import KVCache


class ContiguousKVCache(KVCache):
    def __init__(self, config: ModelConfig, max_len: int, max_batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if max_len <= 0 or max_batch <= 0:
            raise ValueError("max_len and max_batch must be positive")
        self.max_len, self.max_batch = max_len, max_batch
        shape = (config.num_layers, max_batch, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer, k, v, meta: AttentionMetadata):
        cq = meta.cu_seqlens_q.tolist()
        ks, vs = [], []
        for i, (slot, ctx, q_len) in enumerate(zip(meta.cache_slots, meta.context_lens, meta.seqlens_q)):
            if ctx + q_len > self.max_len:
                raise ValueError(f"sequence needs {ctx + q_len} positions; the cache holds {self.max_len}")
            self.k[layer, slot, ctx:ctx + q_len] = k[cq[i]:cq[i + 1]]
            self.v[layer, slot, ctx:ctx + q_len] = v[cq[i]:cq[i + 1]]
            ks.append(self.k[layer, slot, :ctx + q_len])    # (ctx + q_len, Hkv, D), a view
            vs.append(self.v[layer, slot, :ctx + q_len])
        if len(ks) == 1:                                     # one sequence: no copy
            return ks[0], vs[0]
        return torch.cat(ks), torch.cat(vs)
