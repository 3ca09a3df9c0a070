"""``auto``: the fastest correct backend for the tensors at hand, decided per call.

The rule, from ``python -m minisys bench attention`` and an A/B of whole-model
decode steps on the course's 2-core CPU (lesson 02, section 7):

* fp32 on CPU -> `DecodeAttention`: its one-token path is a strided
  matrix-vector product per KV head, with no copy of the cache, and was 1.3-5x
  faster than SDPA's decode (which repeats every KV head G times first);
  sequences with more than one new token go to SDPA, so prefills cost the same.
* anything else (CUDA, bf16/fp16) -> `SDPAAttention`: torch's fused
  flash / memory-efficient kernels. The decode path computes in fp32 and would
  upcast a bf16 cache on every step; not measured on a GPU here.

The choice is made from ``q.device`` and ``q.dtype`` at call time, because the
model builds its backend before its weights reach their device (the loader
constructs it on the meta device).
"""
from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata
from .decode import DecodeAttention
from .sdpa import SDPAAttention


class AutoAttention(AttentionBackend):
    name = "auto"

    def __init__(self) -> None:
        self.sdpa = SDPAAttention()
        self.decode = DecodeAttention(prefill=self.sdpa)

    def pick(self, q: torch.Tensor) -> AttentionBackend:
        """The backend ``auto`` uses for queries like ``q``."""
        if q.device.type == "cpu" and q.dtype == torch.float32:
            return self.decode
        return self.sdpa

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.pick(q).forward(q, k, v, meta)
