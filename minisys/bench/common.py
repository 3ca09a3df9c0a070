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


_CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "asimd")


def cpu_description() -> dict:
    """The CPU's model name and the vector-ISA flags that change torch's CPU speed (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith(("model name", "Model"))), "")
    flag_line = next((ln.split(":", 1)[1] for ln in text.splitlines()
                      if ln.startswith(("flags", "Features"))), "")
    flags = set(flag_line.split())
    return {"cpu_model": model, "cpu_flags": [f for f in _CPU_FLAGS_OF_INTEREST if f in flags]}


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        **cpu_description(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
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
