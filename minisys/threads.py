"""How many CPU threads torch should use: one per physical core this process may run on.

A batch-1 decode step is a chain of matrix-vector products bound by memory bandwidth; each
physical core has its own load units and L2, while two hyper-threads of one core share them.
torch's default is one thread per *logical* CPU, so on an SMT machine half its threads fight
their siblings for the same core (and every parallel region waits for the slowest). We count
the cores the process's affinity mask allows (containers and ``taskset`` restrict it), SMT
siblings once, from Linux's ``/sys/devices/system/cpu/cpu*/topology``; elsewhere, or when that
is unreadable, every logical CPU counts as a core.

On a machine shared with other busy processes fewer threads can be faster still: a parallel
region ends when its slowest thread does, and a thread that lost its core makes everyone wait.
``--threads`` (server, benchmarks) overrides the choice.
"""
from __future__ import annotations

import os
from pathlib import Path

_TOPOLOGY = Path("/sys/devices/system/cpu")


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, topology: Path = _TOPOLOGY) -> int:
    """Distinct (package, core) pairs among ``cpus`` (default: `allowed_cpus`); >= 1."""
    cores = set()
    for cpu in allowed_cpus() if cpus is None else cpus:
        base = topology / f"cpu{cpu}" / "topology"
        try:
            cores.add((int((base / "physical_package_id").read_text()), int((base / "core_id").read_text())))
        except (OSError, ValueError):
            cores.add(("cpu", cpu))                     # no topology: count the logical CPU as a core
    return max(1, len(cores))


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``num_threads``, or to `physical_cores` when None; returns it.

    numpy's BLAS gets the same number (it runs the batch-1 matrix-vector products,
    `minisys.parallel.linear.linear`), through ``threadpoolctl`` (requirements.txt). Without it
    numpy's thread count cannot be set, so those products go back to torch (``BLAS_GEMV`` off, with
    a warning) rather than run on a number of threads nobody chose.
    """
    import torch
    n = physical_cores() if num_threads is None else num_threads
    if n < 1:
        raise ValueError(f"the number of threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import warnings

        from .parallel import linear
        if linear.BLAS_GEMV:
            linear.BLAS_GEMV = False
            warnings.warn("threadpoolctl is not installed: numpy's BLAS threads cannot be set, so batch-1 "
                          "matrix-vector products run on torch (pip install threadpoolctl)", RuntimeWarning)
        return n
    import numpy  # noqa: F401  (its BLAS must be loaded for threadpoolctl to find it)
    threadpool_limits(limits=n, user_api="blas")
    return n
