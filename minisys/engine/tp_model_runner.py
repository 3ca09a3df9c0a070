"""The tensor-parallel model runner: rank 0 in the engine process, ranks 1..N-1 in worker processes.

    engine process (rank 0)                          worker r (r = 1..N-1)
    scheduler.schedule() -> SchedulerOutput
    build_batch -> StepMessage ----broadcast---->    StepMessage
    copy blocks; model(batch) on shard 0  <--all-reduce x 2 per layer-->  copy blocks; model(batch) on shard r
    logits (all-gathered) -> sample                  (logits dropped)

The scheduler, the block allocator, detokenizing and sampling run once, on
rank 0; a worker only mirrors the forward. Every rank holds the same block
tables (they come in the message) and its own KV pool with its own KV heads
(``model.local_config``), so a block id means the same slots everywhere.

Failure: a watcher thread sees a worker die (its process sentinel) and
records it in `failure`; the step in flight fails (gloo raises when a peer's
socket closes, or the process group's timeout ends the wait), every later
step fails at once with `TensorParallelError`, and the server reports itself
unhealthy. `shutdown` stops the workers (stop message, then terminate/kill).

It lives in ``engine/``, not ``parallel/``: it is a `ModelRunner` (an engine
part) built on the model, while ``minisys/parallel/`` stays below the model
(``model/llama.py`` builds its layers from ``parallel/linear.py``), so the
packages never import each other in a circle (tests/test_layering.py).
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention.base import AttentionMetadata
from ..kv.paged import PagedKVCache
from ..model.llama import LlamaModel
from ..parallel import comm
from ..parallel.workers import WorkerGroup, report_ready
from .model_runner import ModelRunner, StepBatch

READY_TIMEOUT_S = 300.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or a collective failed: the engine cannot run another step."""


@dataclass
class StepMessage:
    """What every rank needs to run the step's forward (pickled once, broadcast from rank 0)."""

    block_copies: list[tuple[int, int]]
    input_ids: torch.Tensor         # (T,)
    positions: torch.Tensor         # (T,)
    meta: AttentionMetadata         # seqlens, slot_mapping (T,), block_tables (B, max_blocks)
    logits_indices: torch.Tensor    # (R,)


@dataclass(frozen=True)
class WorkerSpec:
    """How worker ``rank`` builds its shard and KV pool (the same model, dtype and pool as rank 0)."""

    rank: int
    tp_size: int
    master_port: int
    model_path: Path
    attention_backend: str
    dtype: torch.dtype
    device: str
    num_blocks: int
    block_size: int
    num_threads: int
    fuse: bool = True               # fused q/k/v and gate/up, as rank 0 loaded them (`ModelSource.fuse`)


def worker_main(conn, spec: WorkerSpec) -> None:
    """A worker's life: load shard ``spec.rank``, join the group, mirror each step until told to stop."""
    from ..model.loader import load_model
    from ..threads import configure_threads
    configure_threads(spec.num_threads)         # torch's and numpy's BLAS (the batch-1 matmuls), as rank 0's
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(spec.device)
    model = load_model(spec.model_path, spec.device, spec.dtype, spec.attention_backend, spec.rank, spec.tp_size,
                       spec.fuse)
    cache = PagedKVCache(model.local_config, spec.num_blocks, spec.block_size, model.dtype, model.device)
    report_ready(conn, os.getpid())
    comm.init_process_group(spec.rank, spec.tp_size, "127.0.0.1", spec.master_port,
                            backend=comm.default_backend(spec.device))
    with torch.inference_mode():
        while (msg := comm.broadcast_object(None)) is not None:
            for src, dst in msg.block_copies:
                cache.copy_block(src, dst)
            dev = model.device
            meta = msg.meta
            if dev.type != "cpu":
                meta.slot_mapping, meta.block_tables = meta.slot_mapping.to(dev), meta.block_tables.to(dev)
            model(msg.input_ids.to(dev), msg.positions.to(dev), meta, kv_cache=cache,
                  logits_indices=msg.logits_indices.to(dev))
    comm.destroy_process_group()


class TPModelRunner(ModelRunner):
    """`ModelRunner` on rank 0 of ``model.tp_size`` ranks; starts the other ranks as worker processes.

    ``model`` is rank 0's shard (`minisys.model.loader.load_model(..., tp_rank=0, tp_size=N)`); the
    workers load their shards from the same ``model.source``. One per process (the default process
    group is global). Worker threads: ``torch.get_num_threads()`` of this process, each.
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        if model.tp_rank != 0 or model.tp_size < 2:
            raise ValueError(f"TPModelRunner needs rank 0's shard of a tensor-parallel model, got rank "
                             f"{model.tp_rank} of {model.tp_size}")
        if torch.distributed.is_initialized():
            raise RuntimeError("a process group already exists in this process: one tensor-parallel engine "
                               "per process (shut the other one down first)")
        super().__init__(model, num_blocks, block_size)
        self._failure: str | None = None
        self._closed = False
        port = comm.pick_free_port()
        device = str(model.device)
        specs = [WorkerSpec(r, model.tp_size, port, model.source.path, model.source.attention_backend, model.dtype,
                            f"cuda:{r}" if model.device.type == "cuda" else device, num_blocks, block_size,
                            torch.get_num_threads(), model.source.fuse) for r in range(1, model.tp_size)]
        self.workers = WorkerGroup(worker_main, [(s,) for s in specs], name="minisys-tp-worker")
        self.workers.start()
        atexit.register(self.shutdown)
        self.workers.wait_ready(READY_TIMEOUT_S)             # stops them and raises if one fails to load
        try:
            comm.init_process_group(0, model.tp_size, "127.0.0.1", port, backend=comm.default_backend(device))
        except BaseException:
            self.workers.stop()
            raise
        self.workers.watch(self._on_worker_death)

    def _on_worker_death(self, index: int, exitcode: int | None) -> None:
        if not self._closed:
            self._failure = (f"tensor-parallel worker rank {index + 1} (pid {self.workers.pids[index]}) "
                             f"died with exit code {exitcode}")

    @property
    def failure(self) -> str | None:
        return self._failure

    def forward(self, block_copies: list[tuple[int, int]], batch: StepBatch,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Broadcast the step to the workers, then run rank 0's part of the same forward."""
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        cpu = torch.device("cpu")
        meta = batch.meta
        if meta.slot_mapping is not None and meta.slot_mapping.device != cpu:
            meta = AttentionMetadata(meta.seqlens_q, meta.context_lens, meta.cache_slots,
                                     meta.slot_mapping.to(cpu), meta.block_tables.to(cpu))
        msg = StepMessage(list(block_copies), batch.input_ids.to(cpu), batch.positions.to(cpu), meta,
                          logits_indices.to(cpu))
        try:
            comm.broadcast_object(msg)
            return super().forward(block_copies, batch, logits_indices)
        except Exception as e:
            self._blame_a_dead_worker()
            self._failure = self._failure or f"a tensor-parallel collective failed: {e}"
            raise TensorParallelError(self._failure) from e

    def _blame_a_dead_worker(self, wait_s: float = 1.0) -> None:
        """A collective broke: if a worker died, say which (its watcher may not have run yet: a killed
        peer's socket resets at the moment it dies, often before the sentinel thread wakes)."""
        deadline = time.monotonic() + wait_s
        while self._failure is None and time.monotonic() < deadline:
            dead = self.workers.dead()
            if dead:
                self._on_worker_death(*dead[0])
                return
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop the workers (a stop message if they are healthy, then terminate/kill); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._failure is None and not self.workers.dead():
            try:
                comm.broadcast_object(None)
            except Exception:
                pass
        self.workers.stop()
        if self._failure is None:
            comm.destroy_process_group()
        else:       # a dead peer: gloo's teardown could wait on it; drop our handle of the group instead
            try:
                comm.destroy_process_group()
            except Exception:
                pass
