"""A contiguous KV cache: one max-length buffer per sequence slot.

This is the cache of the eager baseline (and of Hugging Face's default
generate): every sequence slot reserves ``max_len`` positions up front, used
or not. Lesson 03 measures how much of it holds real tokens, and replaces it
with a paged cache.

Layout: ``k[layer]`` and ``v[layer]`` are (max_batch, max_len, Hkv, D).
Invariant: after `write` for sequence i, positions
``[0, context_lens[i] + seqlens_q[i])`` of its slot hold valid keys/values;
`read` hands them back packed, a `PackedKV`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention.base import AttentionMetadata
from ..attention.views import PackedKV
from .base import KVCache

if TYPE_CHECKING:                       # kv/ imports nothing from model/ at run time
    from ..model.config import ModelConfig


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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """k, v (T, Hkv, D): sequence i's rows go to positions ctx .. ctx + q_len - 1 of its slot."""
        cq = meta.cu_q
        for i, (slot, ctx, q_len) in enumerate(zip(meta.cache_slots, meta.context_lens, meta.seqlens_q)):
            if ctx + q_len > self.max_len:
                raise ValueError(f"sequence needs {ctx + q_len} positions; the cache holds {self.max_len}")
            self.k[layer, slot, ctx:ctx + q_len] = k[cq[i]:cq[i + 1]]
            self.v[layer, slot, ctx:ctx + q_len] = v[cq[i]:cq[i + 1]]

    def decode_run(self, meta: AttentionMetadata) -> tuple[int, int] | None:
        """Slot s's row holds its positions in order: its n keys are flat slots s*max_len .. s*max_len+n-1."""
        if meta.seqlens_q != [1] or meta.context_lens[0] + 1 > self.max_len:
            return None                                  # the modular write refuses the overflow by name
        return meta.cache_slots[0] * self.max_len, meta.context_lens[0] + 1

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.max_batch * self.max_len, *self.k.shape[-2:])
        return self.k[layer].view(shape), self.v[layer].view(shape)       # (max_batch * max_len, Hkv, D)

    def read(self, layer: int, meta: AttentionMetadata) -> PackedKV:
        """Every sequence's first ``seqlens_k[i]`` positions, packed (S, Hkv, D)."""
        ks = [self.k[layer, slot, :n] for slot, n in zip(meta.cache_slots, meta.seqlens_k)]  # (n, Hkv, D) views
        vs = [self.v[layer, slot, :n] for slot, n in zip(meta.cache_slots, meta.seqlens_k)]
        if len(ks) == 1:                                     # one sequence: no copy
            return PackedKV(ks[0], vs[0])
        return PackedKV(torch.cat(ks), torch.cat(vs))
