"""The paged KV cache: one preallocated pool of blocks per layer, addressed by slot.

Layout: ``k[layer]`` and ``v[layer]`` are (num_blocks, block_size, Hkv, D).
Viewed flat, (num_blocks * block_size, Hkv, D), row ``slot = block_id *
block_size + offset`` holds one token's key/value. Which blocks belong to
which sequence is the business of `minisys.kv.block_allocator` (pure Python);
this module only moves tensors.

The model calls ``write(layer, k, v, meta)`` then ``read(layer, meta)`` as
with any `KVCache`. The step's `AttentionMetadata` carries two extra tensors
(built by `minisys.engine.paged_runner.PagedRunner`, later by the engine's
model runner):

- ``slot_mapping`` (T,): the slot each new token's K/V is written to (``write``);
- ``block_tables`` (B, max_blocks): each sequence's block ids, padded with 0 (``read``).

``write`` scatters the new tokens' K/V into their slots. ``read`` returns the
layer's pools as a `PagedKV`, so attention runs ``backend.forward_paged``:
`PagedAttention` reads the blocks through the block tables; every other
backend takes the gather path (`PagedKV.gather`: each sequence's context
copied into the packed (S, Hkv, D) layout of ``meta.cu_seqlens_k``), so the
backends of lesson 02 run unchanged on a paged cache.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention.base import AttentionMetadata
from ..attention.paged import run_start
from ..attention.views import PagedKV, context_slots
from .base import KVCache

if TYPE_CHECKING:                       # kv/ imports nothing from model/ at run time
    from ..model.config import ModelConfig

__all__ = ["PagedKVCache", "block_table_tensor", "context_slots"]


class PagedKVCache(KVCache):
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 fill: str = "zeros") -> None:
        """``fill="garbage"`` fills the pools with large random values (tests: an unwritten slot shows)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        if fill == "zeros":
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        elif fill == "garbage":
            g = torch.Generator().manual_seed(1234)
            self.k = (torch.randn(shape, generator=g) * 100).to(dtype=dtype, device=device)
            self.v = (torch.randn(shape, generator=g) * 100).to(dtype=dtype, device=device)
        else:
            raise ValueError(f"fill must be 'zeros' or 'garbage', got {fill!r}")

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """k, v (T, Hkv, D): token t's K/V go to pool slot ``meta.slot_mapping[t]``."""
        if meta.slot_mapping is None:
            raise ValueError("a paged KV cache needs meta.slot_mapping and meta.block_tables "
                             "(build the step with minisys.engine.paged_runner.PagedRunner)")
        k_flat, v_flat = self.slots(layer)                                  # (slots, Hkv, D) views
        slots = meta.memo(("slot_mapping", k_flat.device), lambda: meta.slot_mapping.to(k_flat.device))
        if k.dtype != k_flat.dtype:
            k, v = k.to(k_flat.dtype), v.to(v_flat.dtype)
        k_flat[slots] = k                                                   # scatter the new tokens
        v_flat[slots] = v

    def decode_run(self, meta: AttentionMetadata) -> tuple[int, int] | None:
        """When the sequence's blocks are consecutive in the pool (`run_start`; a fresh pool hands them
        out in order) and this token's slot is the run's last, its keys are one slice of the flat pool."""
        if meta.seqlens_q != [1] or meta.block_tables is None or meta.slot_mapping is None:
            return None
        length = meta.seqlens_k[0]
        start = run_start(meta.block_tables[0], length, self.block_size)
        if start is None or int(meta.slot_mapping[0]) != start + length - 1:
            return None
        return start, length

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_slots, *self.k.shape[-2:])
        return self.k[layer].view(shape), self.v[layer].view(shape)       # (num_blocks * block_size, Hkv, D)

    def read(self, layer: int, meta: AttentionMetadata) -> PagedKV:
        """The layer's pools (num_blocks, block_size, Hkv, D), to be read through ``meta.block_tables``."""
        if meta.block_tables is None:
            raise ValueError("a paged KV cache needs meta.slot_mapping and meta.block_tables "
                             "(build the step with minisys.engine.paged_runner.PagedRunner)")
        return PagedKV(self.k[layer], self.v[layer])

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block ``dst`` becomes a copy of ``src`` in every layer."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def block_table_tensor(tables: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, max_blocks) int64 from lists of block ids, padded with 0 (reads past a sequence are masked)."""
    width = max(len(t) for t in tables)
    out = torch.zeros(len(tables), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        out[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
    return out.to(device)
