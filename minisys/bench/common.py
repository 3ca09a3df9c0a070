"""Helpers every benchmark shares: quick vs full size, the machine's name, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def quick_mode() -> bool:
    """True when MINISYS_QUICK=1 (CI and notebook runs): benchmarks use their small sizes."""
    return os.environ.get("MINISYS_QUICK", "0") not in ("", "0", "false", "False")


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The CPU's vector-math flags that change torch's speed (bf16 is slow without avx512_bf16/amx)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in SIMD_FLAGS if f in have]
    return []


def machine_info() -> dict:
    info = {
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def save_result(name: str, payload: dict, out_dir: str | Path = "bench/results") -> Path:
    """Write a benchmark result as JSON with the machine and the command that produced it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), "command": " ".join(sys.argv), **payload}
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
