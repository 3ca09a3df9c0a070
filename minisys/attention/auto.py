"""``auto``: the fastest correct backend for the K/V at hand, decided per call.

The rule, stated once (the package docstring and `get_backend` point here).
It follows ``python -m minisys bench attention``, ``python -m minisys bench
paged-kv`` and an A/B of whole-model decode steps on the course's 2-core
CPU (lessons 02 and 03):

* **paged K/V** (the cache hands its block pools: the engine, `PagedRunner`)
  -> `PagedAttention`: it reads the blocks through the block tables, batching
  the decode sequences, instead of first copying every context out of the pool.
* **paged K/V, a decode-only step on CUDA with triton installed, or any
  decode step whose lengths are on the device** (``meta.seq_lens_tensor``: a
  CUDA-graph step, `minisys.engine.cuda_graph`) -> the static decode path:
  the Triton kernel (`minisys.attention.triton_decode`, one program per
  (sequence, KV head)) on CUDA, `paged.decode_static` (the same computation in
  plain torch, shapes fixed by the block-table width) elsewhere. Neither syncs
  with the host, so both can be captured in a CUDA graph. Triton is imported
  only on CUDA: the CPU path never needs it.
* **packed K/V, fp32 on CPU** -> `DecodeAttention`: its one-token path is a
  strided matrix-vector product per KV head, with no copy of the cache, and
  was 1.3-5x faster than SDPA's decode (which repeats every KV head G times
  first); sequences with more than one new token go to SDPA, so prefills
  cost the same.
* **packed K/V, anything else** (CUDA, bf16/fp16) -> `SDPAAttention`: torch's
  fused flash / memory-efficient kernels. The decode path computes in fp32
  and would upcast a bf16 cache on every step; not measured on a GPU here.

The packed choice is made from ``q.device`` and ``q.dtype`` at call time,
because the model builds its backend before its weights reach their device
(the loader constructs it on the meta device).
"""
from __future__ import annotations

import functools

import torch

from .base import AttentionBackend, AttentionMetadata
from .decode import DecodeAttention
from .paged import PagedAttention, decode_static
from .sdpa import SDPAAttention


class AutoAttention(AttentionBackend):
    name = "auto"

    def __init__(self) -> None:
        self.sdpa = SDPAAttention()
        self.decode = DecodeAttention(prefill=self.sdpa)
        self.paged = PagedAttention()

    def pick(self, q: torch.Tensor) -> AttentionBackend:
        """The backend ``auto`` uses for packed K/V and queries like ``q``."""
        if q.device.type == "cpu" and q.dtype == torch.float32:
            return self.decode
        return self.sdpa

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.pick(q).forward(q, k, v, meta)

    def forward_paged(self, q, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        kernel = triton_decode_module() if q.is_cuda and kernel_fits(q.shape[-1], k_pool.shape[1]) else None
        if meta.seq_lens_tensor is None and (kernel is None or not meta.is_decode_only):
            return self.paged.forward_paged(q, k_pool, v_pool, meta)
        tables = meta.block_tables.to(q.device)                                  # (B, W)
        if kernel is not None:
            return kernel.paged_decode_attention(q, k_pool, v_pool, tables, kernel.device_seq_lens(meta, q.device))
        lens = meta.seq_lens_tensor                                               # (B,) on q's device
        return decode_static(q, k_pool, v_pool, tables, lens)


def kernel_fits(head_dim: int, block_size: int) -> bool:
    """The Triton kernel's shape rule: a power-of-two head_dim and block_size (its tile sizes)."""
    return head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0


@functools.lru_cache(maxsize=1)
def triton_decode_module():
    """`minisys.attention.triton_decode` if triton imports here, else None (asked once per process)."""
    try:
        from . import triton_decode
    except Exception:                           # ImportError, or a triton that cannot initialise
        return None
    return triton_decode
