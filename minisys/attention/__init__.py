"""Attention backends behind one interface (see `base.AttentionBackend`).

Every backend reads K/V two ways, by name (`views` is the contract with the
KV cache): ``forward_packed(q, k, v, meta)`` for packed (S, Hkv, D) K/V, and
``forward_paged(q, k_pool, v_pool, meta)`` for block pools read through
``meta.block_tables`` (by default: gather the context into packed K/V, then
``forward_packed``; ``paged`` reads the blocks in place).

| name            | what it is                                                | use it for            |
|-----------------|-----------------------------------------------------------|-----------------------|
| ``reference``   | the textbook formula, full score matrix (the test oracle) | checking the others   |
| ``sdpa``        | torch's fused ``scaled_dot_product_attention``            | prefill, GPU          |
| ``tiled``       | FlashAttention's online softmax in plain torch            | reading the algorithm |
| ``decode``      | one query per sequence vs its cache; prefill -> sdpa      | decode steps          |
| ``decode-splitk`` | FlashDecoding: KV chunks + log-sum-exp merge            | few long sequences    |
| ``paged``       | reads a paged cache through its block tables; packed: sdpa | the engine          |
| ``triton``      | paged decode steps: one Triton kernel per step; else paged | GPU decode            |
| ``auto``        | per call: paged K/V -> ``paged`` (decode on CUDA with      | the default           |
|                 | triton -> ``triton``); packed fp32 on CPU -> ``decode``;   |                       |
|                 | packed otherwise -> ``sdpa``                               |                       |

`get_backend(name)` returns a backend by name; ``"auto"`` is `AutoAttention`,
whose rule (and the measurements behind it) is in ``auto.py``.
"""
from __future__ import annotations

from .auto import AutoAttention
from .base import AttentionBackend, AttentionMetadata, causal_mask, expand_kv_heads
from .decode import DecodeAttention, SplitKDecodeAttention, merge_partials
from .paged import PagedAttention
from .reference import ReferenceAttention
from .sdpa import SDPAAttention
from .tiled import TiledAttention, online_softmax_update
from .views import KVView, PackedKV, PagedKV, context_slots

BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": ReferenceAttention,
    "sdpa": SDPAAttention,
    "paged": PagedAttention,
    "tiled": TiledAttention,
    "decode": DecodeAttention,
    "decode-splitk": SplitKDecodeAttention,
}


def get_backend(name: str = "auto", device: str = "cpu") -> AttentionBackend:
    """Return an attention backend instance by name.

    ``auto`` -> `AutoAttention`, which picks per call: a paged cache's pools
    go to ``paged``; packed K/V to ``decode`` for fp32 on CPU, ``sdpa``
    otherwise (see ``minisys/attention/auto.py``). ``device`` is kept for
    callers that pass it; the choice does not need it.
    """
    if name == "auto":
        return AutoAttention()
    if name == "triton":                          # imported only when asked for: the CPU path never needs triton
        from .triton_decode import TritonDecodeAttention
        return TritonDecodeAttention()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(['auto', *BACKENDS, 'triton'])}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "get_backend",
           "causal_mask", "expand_kv_heads", "online_softmax_update", "merge_partials",
           "AutoAttention", "ReferenceAttention", "SDPAAttention", "TiledAttention", "DecodeAttention",
           "SplitKDecodeAttention", "PagedAttention", "KVView", "PackedKV", "PagedKV", "context_slots"]
