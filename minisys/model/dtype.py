"""The model's dtype, by name or chosen by the hardware (``auto``): one rule, one place.

``auto`` picks the format the device computes fastest without losing the
model's quality:

* **CUDA** -> bf16 (tensor cores; half the HBM bytes of fp32 per weight read).
* **a CPU with AVX-512-BF16 or AMX** (flags ``avx512_bf16``, ``amx_bf16`` in
  ``/proc/cpuinfo``) -> bf16: oneDNN has native bf16 dot products there.
* **any other CPU** (AVX2-only, AVX-512 without BF16, ARM without the probe) ->
  fp32: bf16 is emulated (convert to fp32, multiply, convert back) and was
  measured more than 10x slower than fp32 for decode on an AVX2-only CPU.

The probe reads the CPU's flags from ``/proc/cpuinfo`` (Linux); where that
file does not exist it asks torch (``torch.backends.cpu.get_cpu_capability()``,
which names AMX only when present). ``python -m minisys bench dtype`` prints
both dtypes' decode speed on the current CPU, so the choice is visible.

``None`` (no dtype given) is not ``auto``: it stays the device's default
(bf16 on CUDA, fp32 on CPU), so a library call without a dtype behaves the
same on every CPU; the command lines offer ``--dtype auto``.
"""
from __future__ import annotations

from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")     # native bf16 dot products (oneDNN uses them)

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
CLI_DTYPES = ("auto", "float32", "bfloat16", "float16")    # the --dtype choices of every command line


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (Linux ``flags`` / ARM ``Features`` line), or None if the file is unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bf16 natively (AVX-512-BF16 or AMX); ``flags=None`` reads this CPU's."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:                                   # no /proc/cpuinfo (macOS, Windows): ask torch
        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()
    return any(f in flags for f in CPU_BF16_FLAGS)


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16, fp32 otherwise (the module docstring's rule)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype when none is given: bf16 on CUDA, fp32 on CPU (independent of the CPU's flags)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A dtype, a name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``), ``"auto"``
    (`auto_dtype`) or None (`default_dtype`) -> the torch dtype; ValueError naming anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return default_dtype(device)
    if dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
