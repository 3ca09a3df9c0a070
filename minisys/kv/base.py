"""The KV cache interface the model's attention layers call: ``write``, then ``read``.

Each attention layer hands the cache the keys and values of this step's new
tokens (``write``), then asks for everything the step's queries may attend
to (``read``). What ``read`` returns is a named view from
`minisys.attention.views`, and the view says which backend method reads it:

* `PackedKV` (S, Hkv, D), packed as ``AttentionMetadata.cu_seqlens_k`` says
  (per sequence: its cached context followed by its new tokens)
  -> ``backend.forward_packed``; the contiguous cache hands this;
* `PagedKV`, the layer's block pools read through ``meta.block_tables``
  -> ``backend.forward_paged``; the paged cache hands this.

Invariant: after ``write(layer, k, v, meta)``, ``read(layer, meta)`` covers
positions ``0 .. seqlens_k[i] - 1`` of every sequence i of the step.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..attention.base import AttentionMetadata
from ..attention.views import KVView


class KVCache(ABC):
    @abstractmethod
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store k, v (T, Hkv, D) of the step's new tokens for ``layer``."""

    @abstractmethod
    def read(self, layer: int, meta: AttentionMetadata) -> KVView:
        """Every key and value the step's queries may attend to in ``layer`` (after `write`)."""

    # The batch-1 decode path (`minisys.model.flat_decode`) reads and writes the cache directly:
    def decode_run(self, meta: AttentionMetadata) -> tuple[int, int] | None:
        """For a step of ONE sequence decoding ONE token: (start, length) such that its keys, this
        token's included, are slots ``start .. start + length - 1`` of ``slots(layer)`` in every layer,
        this token's slot last. None when they are not (the modular path then runs)."""
        return None

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s K and V storage as (num_slots, Hkv, D) views (see `decode_run`)."""
        raise NotImplementedError(f"{type(self).__name__} has no flat slot view")
