"""Attention backends behind one interface (see `base.AttentionBackend`).

`get_backend(name)` returns a backend by name; ``"auto"`` picks the fastest
correct one for the device.
"""
from __future__ import annotations

from .base import AttentionBackend, AttentionMetadata, causal_mask, expand_kv_heads
from .paged import PagedAttention
from .reference import ReferenceAttention
from .sdpa import SDPAAttention

BACKENDS: dict[str, type[AttentionBackend]] = {
    "reference": ReferenceAttention,
    "sdpa": SDPAAttention,
    "paged": PagedAttention,
}


def get_backend(name: str = "auto", device: str = "cpu") -> AttentionBackend:
    """Return an attention backend instance. ``auto`` -> sdpa on every device."""
    if name == "auto":
        name = "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of "
                         f"{', '.join(['auto', *BACKENDS])}")
    return BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "get_backend",
           "causal_mask", "expand_kv_heads"]
