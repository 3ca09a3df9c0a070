"""The process group and the few collectives tensor parallelism needs.

    init_process_group(rank, world_size, master_port=port)   # every rank, once
    all_reduce(t)              # in place: t = sum over ranks (timed, see ALL_REDUCE_TIMER)
    broadcast_object(obj)      # rank 0's Python object to every rank (the step's batch)

Backend: ``gloo`` on CPU, ``nccl`` on CUDA. Rendezvous is ``env://``: rank 0
listens on ``MASTER_ADDR:MASTER_PORT`` and the others connect to it, so the
same code runs on one machine (``127.0.0.1`` and a free port picked by
`pick_free_port`) or on several (``torchrun`` sets the variables; nothing
here changes). Control messages (`broadcast_object`) always go over a gloo
group of their own, also on CUDA, so the batch never has to be copied to a
GPU first, and with no practical timeout: a worker waits there between steps
for as long as the engine is idle. The collectives inside a step keep the
default group's ``timeout_s``. A peer that DIES is seen at once (its socket
closes, gloo raises; the parent's watcher sees the process exit), so the
timeouts only matter for a peer that hangs while alive.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0     # bounds one collective inside a step (a peer wedged without dying)
IDLE_TIMEOUT_DAYS = 365       # the step broadcast: an idle server waits for its next request
_control_group = None


class AllReduceTimer:
    """Wall time spent inside `all_reduce` in this process (CUDA: synchronized, so it is the real wait)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


ALL_REDUCE_TIMER = AllReduceTimer()


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it; a race with another process is possible
    but unlikely on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend(device: str | torch.device = "cpu") -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_process_group(rank: int, world_size: int, master_addr: str | None = None, master_port: int | None = None,
                       backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the default process group as ``rank`` of ``world_size`` (env:// rendezvous at rank 0).

    ``master_addr``/``master_port`` default to the environment's MASTER_ADDR/MASTER_PORT (torchrun's).
    ``timeout_s`` bounds every collective inside a step: a peer that hangs without dying fails the
    step after that long instead of hanging it forever (the step broadcast waits without a bound).
    Default: ``$MINISYS_TP_TIMEOUT_S``, else `DEFAULT_TIMEOUT_S`.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("MINISYS_TP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    global _control_group
    if master_addr is not None:
        os.environ["MASTER_ADDR"] = master_addr
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise ValueError("no MASTER_PORT: give master_port or set the environment variable")
    backend = backend or default_backend()
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    # its own group: a worker waits there for the next step however long the engine stays idle
    _control_group = dist.new_group(backend="gloo", timeout=timedelta(days=IDLE_TIMEOUT_DAYS))


def destroy_process_group() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; the time spent is added to `ALL_REDUCE_TIMER`."""
    start = time.perf_counter()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    ALL_REDUCE_TIMER.seconds += time.perf_counter() - start
    ALL_REDUCE_TIMER.calls += 1
    return t


def all_gather_cat(t: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along the last dim; rank r's has ``sizes[r]`` columns (may differ:
    each is padded to the largest, gathered, then cut back)."""
    width = max(sizes)
    padded = t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def broadcast_object(obj=None, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (others pass None and get it back)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]
