"""Attention backends behind one interface (see `base.AttentionBackend`).

| name            | what it is                                                | use it for            |
|-----------------|-----------------------------------------------------------|-----------------------|
| ``reference``   | the textbook formula, full score matrix (the test oracle) | checking the others   |
| ``sdpa``        | torch's fused ``scaled_dot_product_attention``            | prefill, GPU          |
| ``tiled``       | FlashAttention's online softmax in plain torch            | reading the algorithm |
| ``decode``      | one query per sequence vs its cache; prefill -> sdpa      | decode steps          |
| ``decode-splitk`` | FlashDecoding: KV chunks + log-sum-exp merge            | few long sequences    |
| ``auto``        | per call: ``decode`` for fp32 on CPU, else ``sdpa``        | the default           |

`get_backend(name)` returns a backend by name; ``"auto"`` picks the fastest
correct one for the device (see `get_backend`).
"""
from __future__ import annotations

from .auto import AutoAttention
from .base import AttentionBackend, AttentionMetadata, causal_mask, expand_kv_heads
from .decode import DecodeAttention, SplitKDecodeAttention, merge_partials
from .paged import PagedAttention
from .reference import ReferenceAttention
from .sdpa import SDPAAttention
from .tiled import TiledAttention, online_softmax_update

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

    ``auto`` -> `AutoAttention`, which picks per call from the tensors'
    device and dtype (``decode`` for fp32 on CPU, ``sdpa`` otherwise; see
    ``minisys/attention/auto.py`` for the measurements). ``device`` is kept for
    callers that pass it; the choice does not need it.
    """
    if name == "auto":
        return AutoAttention()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(['auto', *BACKENDS])}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "get_backend",
           "causal_mask", "expand_kv_heads", "online_softmax_update", "merge_partials",
           "AutoAttention", "ReferenceAttention", "SDPAAttention", "TiledAttention", "DecodeAttention",
           "SplitKDecodeAttention"]
