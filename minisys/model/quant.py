"""Dequantization of the GGUF block formats the default model uses.

llama.cpp stores weights in blocks of 32 values along a row:

* ``Q8_0``  (34 bytes/block): fp16 scale d, then 32 int8 q.      x = d * q
* ``Q4_1``  (20 bytes/block): fp16 scale d, fp16 min m, then 16 bytes of
  4-bit q: byte j holds q[j] in its low nibble and q[j + 16] in its high one.
                                                                  x = d * q + m

`dequantize` takes the raw uint8 array the `gguf` reader gives, shaped
(rows, bytes_per_row), and returns float32 (rows, cols). Tests compare it
with ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 34)                              # (rows, nblocks, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # (rows, nblocks, 1)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)     # (rows, nblocks, 32)
    return (d * q).reshape(rows, -1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 20)                              # (rows, nblocks, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # (rows, nblocks, 1)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)  # (rows, nblocks, 1)
    qs = blocks[..., 4:]                                            # (rows, nblocks, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # (rows, nblocks, 32)
    return (d * q + m).reshape(rows, -1)


DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_1": dequantize_q4_1}


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Return float32 values for a GGUF tensor's data of type ``type_name``."""
    if type_name in ("F32", "F16", "BF16"):
        return np.asarray(raw, dtype=np.float32) if type_name != "BF16" else _bf16(raw)
    if type_name not in DEQUANTIZERS:
        raise NotImplementedError(f"GGUF tensor type {type_name} is not supported "
                                  f"(minisys reads F32, F16, BF16, {', '.join(DEQUANTIZERS)})")
    return DEQUANTIZERS[type_name](np.ascontiguousarray(raw))


def _bf16(raw: np.ndarray) -> np.ndarray:
    u16 = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16
    return u16.view(np.float32)
