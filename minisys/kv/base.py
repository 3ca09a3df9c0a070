"""The KV cache interface the model's attention layers call.

Each attention layer hands the cache the keys and values of this step's new
tokens; the cache stores them and returns every key and value the step's
queries may attend to, packed as `AttentionMetadata.cu_seqlens_k` describes
(per sequence: its cached context followed by its new tokens).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..attention.base import AttentionMetadata


class KVCache(ABC):
    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (T, Hkv, D) of the new tokens; return packed (S, Hkv, D) context K, V."""
