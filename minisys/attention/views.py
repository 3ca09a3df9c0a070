"""What a KV cache hands attention: the contract between `minisys.kv` and the backends.

A step's attention layer makes two calls on the cache and one on the view it
gets back (see `minisys.model.llama.Attention.forward`):

    kv_cache.write(layer, k, v, meta)          # store the new tokens' K/V, (T, Hkv, D)
    kv = kv_cache.read(layer, meta)            # a PackedKV or a PagedKV
    o = kv.attend(backend, q, meta)            # -> backend.forward_packed or backend.forward_paged

There are two kinds of view, and each names the backend method that reads it:

* `PackedKV`: k, v (S, Hkv, D), every sequence's keys packed one after the
  other as ``meta.cu_seqlens_k`` says (its cached context, then its new
  tokens). A contiguous cache, or no cache at all, hands this.
  -> ``backend.forward_packed(q, k, v, meta)``.
* `PagedKV`: the layer's block pools, k_pool, v_pool (num_blocks,
  block_size, Hkv, D); sequence b's token ``pos`` is at block
  ``meta.block_tables[b, pos // block_size]``, offset ``pos % block_size``.
  The paged cache hands this. -> ``backend.forward_paged(q, k_pool, v_pool, meta)``.

Every backend reads both. A backend written for packed K/V reads a paged
cache by the naive **gather path** (`PagedKV.gather`: copy each sequence's
context out of the pool into the packed layout, the reference for paging);
`minisys.attention.paged.PagedAttention` reads the blocks through the block
tables without building that packed copy.

This module imports no backend and no cache: both sides import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from .base import AttentionBackend, AttentionMetadata


@dataclass(frozen=True)
class PackedKV:
    """k, v (S, Hkv, D), packed in ``meta.cu_seqlens_k`` order."""

    k: torch.Tensor
    v: torch.Tensor

    def attend(self, backend: AttentionBackend, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (T, Hq, D) -> (T, Hq, D) through ``backend.forward_packed``."""
        return backend.forward_packed(q, self.k, self.v, meta)


@dataclass(frozen=True)
class PagedKV:
    """k_pool, v_pool (num_blocks, block_size, Hkv, D), read through ``meta.block_tables``.

    Invariant: for every sequence b of the step, slots ``0 .. seqlens_k[b] - 1``
    of its blocks hold valid K/V (the cache's ``write`` ran for this layer).
    """

    k_pool: torch.Tensor
    v_pool: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.k_pool.shape[1]

    def attend(self, backend: AttentionBackend, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (T, Hq, D) -> (T, Hq, D) through ``backend.forward_paged``."""
        return backend.forward_paged(q, self.k_pool, self.v_pool, meta)

    def gather(self, meta: AttentionMetadata) -> PackedKV:
        """The naive gather path: every sequence's K/V copied out of the pool, packed (S, Hkv, D)."""
        if meta.block_tables is None:
            raise ValueError("reading a paged KV cache needs meta.block_tables")
        idx = context_slots(meta.block_tables, meta.seqlens_k, self.block_size).to(self.k_pool.device)  # (S,)
        k_flat = self.k_pool.view(-1, *self.k_pool.shape[2:])                  # (slots, Hkv, D), a view
        v_flat = self.v_pool.view(-1, *self.v_pool.shape[2:])
        return PackedKV(k_flat[idx], v_flat[idx])                              # (S, Hkv, D) copies


KVView = Union[PackedKV, PagedKV]     # what `KVCache.read` returns


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
