"""The paged KV cache: one preallocated pool of blocks per layer, addressed by slot.

Layout: ``k[layer]`` and ``v[layer]`` are (num_blocks, block_size, Hkv, D).
Viewed flat, (num_blocks * block_size, Hkv, D), row ``slot = block_id *
block_size + offset`` holds one token's key/value. Which blocks belong to
which sequence is the business of `minisys.kv.block_allocator` (pure Python);
this module only moves tensors.

The model calls ``update(layer, k, v, meta)`` as with any `KVCache`. The step's
`AttentionMetadata` carries two extra tensors (built by
`minisys.engine.paged_runner.PagedRunner`, later by the engine's scheduler):

- ``slot_mapping`` (T,): the slot each new token's K/V is written to;
- ``block_tables`` (B, max_blocks): each sequence's block ids, padded with 0.

What ``update`` returns depends on the attention backend reading it:

- default (``return_pools=False``): the gather-based reference path. The
  context K/V of every sequence is gathered through its block table into the
  packed (S, Hkv, D) layout of ``meta.cu_seqlens_k``, so every existing
  backend (reference, sdpa, ...) runs unchanged on a paged cache.
- ``return_pools=True``: the layer's pools themselves, (num_blocks,
  block_size, Hkv, D), for a backend that reads K/V through the block tables
  directly (`minisys.attention.paged.PagedAttention`, which declares
  ``reads_block_tables = True``; the runner sets this flag from the model's
  backend). No packed copy of the context is made.
"""
from __future__ import annotations

import torch

from ..attention.base import AttentionMetadata
from ..model.config import ModelConfig
from .base import KVCache


class PagedKVCache(KVCache):
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 fill: str = "zeros", return_pools: bool = False) -> None:
        """``fill="garbage"`` fills the pools with large random values (tests: an unwritten slot shows)."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.return_pools = return_pools
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

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        if meta.slot_mapping is None or meta.block_tables is None:
            raise ValueError("a paged KV cache needs meta.slot_mapping and meta.block_tables "
                             "(build the step with minisys.engine.paged_runner.PagedRunner)")
        k_flat = self.k[layer].view(self.num_slots, *self.k.shape[-2:])     # (slots, Hkv, D), a view
        v_flat = self.v[layer].view(self.num_slots, *self.v.shape[-2:])
        slots = meta.slot_mapping.to(k_flat.device)
        k_flat[slots] = k.to(k_flat.dtype)                                  # scatter the new tokens
        v_flat[slots] = v.to(v_flat.dtype)
        if self.return_pools:
            return self.k[layer], self.v[layer]                             # (num_blocks, bs, Hkv, D)
        idx = context_slots(meta.block_tables, meta.seqlens_k, self.block_size).to(k_flat.device)
        return k_flat[idx], v_flat[idx]                                     # (S, Hkv, D) packed

    def copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: block ``dst`` becomes a copy of ``src`` in every layer."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


def context_slots(block_tables: torch.Tensor, seqlens_k: list[int], block_size: int) -> torch.Tensor:
    """(S,) flat pool slot of every context token, packed in cu_seqlens_k order.

    Token ``pos`` of sequence b is at ``block_tables[b, pos // block_size] *
    block_size + pos % block_size``.
    """
    kmax = max(seqlens_k)
    pos = torch.arange(kmax, device=block_tables.device)                    # (K,)
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size   # (B, K)
    lens = torch.tensor(seqlens_k, device=block_tables.device)
    return slots[pos.unsqueeze(0) < lens.unsqueeze(1)]                      # (S,) row-major: b then pos


def block_table_tensor(tables: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, max_blocks) int64 from lists of block ids, padded with 0 (reads past a sequence are masked)."""
    width = max(len(t) for t in tables)
    out = torch.zeros(len(tables), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        out[i, :len(t)] = torch.tensor(t, dtype=torch.int64)
    return out.to(device)
