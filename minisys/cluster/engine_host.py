"""Engines in worker processes joined by a KV group, driven by commands: the test and bench harness.

    hosts = EngineHosts(model_dir, world_size=2, engine_config={...})   # spawns, loads, joins the group
    hosts.call(0, "add", "r1", prompt_ids, {"temperature": 0, "max_tokens": 16}, hold=True)
    hosts.call(0, "run")                       # step until nothing is unfinished
    hosts.call(1, "pull_import", 0, "r1")      # disaggregated decode: rank 1 pulls r1 from rank 0
    hosts.call(0, "migrate_step", "r2", 1)     # one round of a live migration of r2 to rank 1
    hosts.call(i, "counts")                    # free blocks, held and staged requests
    hosts.stop()

Each worker owns one `LLMEngine` and one `KVAgent` over a `GlooConnector`
(rank = worker index), exactly as a replica server does; here the engine's
"thread" is a lock: the command loop holds it while it steps, the agent's
listener takes it to export or import. Real processes, real transport: only
the HTTP layer is missing (the server tests cover it).
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..parallel.comm import pick_free_port
from ..parallel.workers import WorkerGroup, report_ready

READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class HostSpec:
    rank: int
    world_size: int
    master_port: int
    model: str
    engine_config: dict = field(default_factory=dict)
    num_threads: int = 1
    attention_backend: str = "auto"


class _Host:
    """Worker side: the engine, its agent, the migrations in progress, each request's last output."""

    def __init__(self, spec: HostSpec) -> None:
        import torch

        from ..engine.config import EngineConfig
        from ..engine.llm_engine import LLMEngine
        from ..model.loader import load
        from .kv_transfer import GlooConnector, KVAgent
        torch.set_num_threads(spec.num_threads)
        model, tok = load(spec.model, device="cpu", dtype=torch.float32, quiet=True,
                          attention_backend=spec.attention_backend)
        self.engine = LLMEngine(model, tok, EngineConfig(**spec.engine_config))
        self.lock = threading.RLock()
        self.conn = GlooConnector(spec.rank, spec.world_size, spec.master_port)
        self.agent = KVAgent(self.conn, self.engine_call)
        self.migrations: dict[str, Any] = {}
        self.outputs: dict[str, dict] = {}

    def engine_call(self, fn):
        with self.lock:
            return fn(self.engine)

    # ------------------------------------------------------------ commands
    def add(self, rid: str, prompt: list[int], params: dict, hold: bool = False) -> None:
        from ..engine.sampling_params import SamplingParams
        with self.lock:
            self.engine.add_request(rid, prompt, SamplingParams(**params), hold_after_first_token=hold)

    def step(self, n: int = 1) -> None:
        with self.lock:
            for _ in range(n):
                for out in self.engine.step():
                    c = out.outputs[0]
                    self.outputs[out.request_id] = {"token_ids": list(c.token_ids), "text": c.text,
                                                    "finished": out.finished, "finish_reason": c.finish_reason,
                                                    "kv_transfer_params": out.kv_transfer_params}

    def run(self) -> None:
        while self.engine.has_unfinished():
            self.step()

    def output(self, rid: str) -> dict | None:
        return self.outputs.get(rid)

    def num_computed(self, rid: str) -> int:
        with self.lock:
            return self.engine.num_computed(rid)

    def pull_import(self, src: int, rid: str) -> None:
        snap, k, v = self.agent.pull(src, rid)
        with self.lock:
            self.engine.import_request(snap, k, v, streamed=False)

    def migrate_step(self, rid: str, dst: int, stop_threshold_blocks: int = 1) -> bool:
        from .migration import Migration, MigrationConfig
        m = self.migrations.get(rid)
        if m is None:
            m = self.migrations[rid] = Migration(self.agent, rid, dst, MigrationConfig(stop_threshold_blocks))
        try:
            done = m.step()
        except Exception:
            self.migrations.pop(rid, None)
            m._abort_remote()
            raise
        if done:
            self.migrations.pop(rid)
            self.outputs.pop(rid, None)
            return m.result.__dict__
        return False

    def abort(self, rid: str) -> bool:
        with self.lock:
            return self.engine.abort(rid)

    def expire_held(self, after_s: float) -> list[str]:
        import time
        with self.lock:
            return self.engine.expire_held(time.monotonic() + after_s)

    def counts(self) -> dict:
        with self.lock:
            alloc = self.engine.scheduler.allocator
            self.engine.scheduler.check_invariants()
            return {"free": alloc.num_free, "total": alloc.num_blocks, "held": self.engine.held_ids(),
                    "staged": self.agent.num_staged, "unfinished": self.engine.request_ids()}


def host_main(conn, spec: HostSpec) -> None:
    """A worker's life: build the host, report ready, serve commands until ("stop",)."""
    host = _Host(spec)
    report_ready(conn, spec.rank)
    while True:
        name, args, kwargs = conn.recv()
        if name == "stop":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(host, name)(*args, **kwargs)))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class HostError(RuntimeError):
    """A command raised in a worker (its message and traceback)."""


class EngineHosts:
    """The parent side: start ``world_size`` hosts (they join one KV group) and call their commands."""

    def __init__(self, model: str | Path, world_size: int = 2, engine_config: dict | None = None,
                 num_threads: int = 1, attention_backend: str = "auto") -> None:
        port = pick_free_port()
        specs = [HostSpec(r, world_size, port, str(model), dict(engine_config or {}), num_threads, attention_backend)
                 for r in range(world_size)]
        self.group = WorkerGroup(host_main, [(s,) for s in specs], name="minisys-kv-host")
        self.group.start()
        self.group.wait_ready(READY_TIMEOUT_S)
        self._locks = [threading.Lock() for _ in specs]

    def call(self, rank: int, name: str, *args, **kwargs):
        with self._locks[rank]:
            self.group.conns[rank].send((name, args, kwargs))
            kind, value = self.group.conns[rank].recv()
        if kind == "error":
            raise HostError(value)
        return value

    def stop(self) -> None:
        self.group.stop()

    def __enter__(self) -> "EngineHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
