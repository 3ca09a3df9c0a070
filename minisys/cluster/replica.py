"""N replicas of the ordinary server, each in its own process on its own loopback port (lesson 14).

    replicas = ReplicaSet(args, 2)     # args: the parsed ``serve`` flags (engine flags pass through)
    replicas.start(timeout_s=300)      # spawn, wait until each has loaded its model and bound a free port
    replicas.watch(on_death)           # on_death(index, exitcode) for every replica that dies
    replicas.urls                      # ["http://127.0.0.1:PORT", ...]
    replicas.stop()                    # SIGTERM (each drains as a server does), then SIGKILL

The process layer is `minisys.parallel.workers.WorkerGroup` (tensor
parallelism's): spawned interpreters, a start-up failure raised with the
replica's traceback, death seen through the process sentinel, and no
orphans: a replica exits by itself when the router's process is gone,
however it died. A replica runs in its own process group, so Ctrl-C in a
terminal reaches only the router, which decides the order of shutdown.

A replica is `minisys.server.launch.serve` with ``--host 127.0.0.1 --port
0`` (a free port, reported back once the model is loaded), no API key (it
listens on loopback; the router checks the key) and 1 torch thread unless
``--threads`` says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass
from typing import Callable, Optional

from ..parallel.workers import WorkerGroup, report_ready

REPLICA_HOST = "127.0.0.1"


def replica_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags of one replica: the router's, on a free loopback port, keyless, one thread by default."""
    r = copy.copy(args)
    r.host, r.port, r.api_key, r.metrics_open = REPLICA_HOST, 0, None, True
    r.replicas, r.routing_policy, r.prefill_replicas, r.rebalance_every_s = 1, None, None, None
    r.threads = args.threads or 1
    r.rebuild_cache = False                  # the router converted the model once, before spawning
    return r


def _replica_main(conn, args: argparse.Namespace) -> None:
    """Worker side: serve until told to stop; report (port, pid) once the model is loaded."""
    os.setpgrp()                             # Ctrl-C in the terminal goes to the router only
    os.environ.pop("MINISYS_API_KEY", None)   # keyless behind the router
    from ..server.launch import serve
    code = serve(args, on_ready=lambda port: report_ready(conn, {"port": port, "pid": os.getpid()}))
    if code:
        raise SystemExit(code)


@dataclass
class Replica:
    index: int
    url: str
    pid: int
    alive: bool = True


def kv_group_args(args: argparse.Namespace, num_replicas: int, master_port: int) -> list[argparse.Namespace]:
    """One replica's flags per index; with ``--kv-connector`` they join one KV group: rank = replica index,
    world size = N, rendezvous on ``master_port`` (a free port the router picked)."""
    out = []
    for i in range(num_replicas):
        r = replica_args(args)
        if getattr(args, "kv_connector", None):
            r.kv_rank, r.kv_world_size, r.kv_master_port = i, num_replicas, master_port
        out.append(r)
    return out


class ReplicaSet:
    def __init__(self, args: argparse.Namespace, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {num_replicas}")
        from ..parallel.comm import pick_free_port
        port = pick_free_port() if getattr(args, "kv_connector", None) else 0
        self.group = WorkerGroup(_replica_main, [(a,) for a in kv_group_args(args, num_replicas, port)],
                                 name="minisys-replica")
        self.replicas: list[Replica] = []

    def start(self, timeout_s: float = 300.0) -> list[Replica]:
        """Spawn every replica and wait until each is ready; `WorkerError` (group stopped) otherwise."""
        self.group.start()
        infos = self.group.wait_ready(timeout_s)
        self.replicas = [Replica(i, f"http://{REPLICA_HOST}:{info['port']}", info["pid"])
                         for i, info in enumerate(infos)]
        return self.replicas

    def watch(self, on_death: Callable[[int, Optional[int]], None]) -> None:
        """Mark a replica dead and call ``on_death(index, exitcode)`` (on a watcher thread) when it dies."""
        def died(i: int, code: Optional[int]) -> None:
            self.replicas[i].alive = False
            on_death(i, code)
        self.group.watch(died, every=True)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def pids(self) -> list[int]:
        return self.group.pids

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every replica (SIGTERM: each drains as a server does; SIGKILL after ``timeout_s``)."""
        for r in self.replicas:
            r.alive = False
        self.group.stop(timeout_s)
