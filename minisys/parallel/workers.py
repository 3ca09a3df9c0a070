"""Start, watch and stop worker processes: the small process layer under tensor parallelism.

Generic (nothing here knows about models): lesson 14's replicas reuse it.

    group = WorkerGroup(target, [args_of_worker_1, args_of_worker_2], name="minisys-tp")
    group.start()                  # spawn context: a fresh interpreter each, no forked torch state
    infos = group.wait_ready(60)   # each worker calls report_ready(conn, info) once it is set up
    group.watch(on_death)          # a thread calls on_death(index, exitcode) when one dies
    group.stop()                   # terminate, wait, then kill: nothing left behind

``target(conn, *args)`` runs in the worker. Invariants:

* No orphans. A worker exits by itself when its parent dies, however the parent
  died (a thread polls ``os.getppid()``; SIGKILL of the parent included), and
  workers are daemonic (multiprocessing terminates them at a normal exit).
* Ctrl-C goes to the parent only: a worker ignores SIGINT (the terminal sends it
  to the whole process group), so the parent decides the order of shutdown.
* A worker that fails while starting sends its traceback; `wait_ready` raises
  `WorkerError` with it instead of waiting forever. One that dies later is
  seen by `watch` through its sentinel (no polling).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

PARENT_POLL_S = 0.5


class WorkerError(RuntimeError):
    """A worker failed to start, or died."""


def report_ready(conn, info: Any = None) -> None:
    """Worker side: tell the parent this worker is set up (``info`` comes back from `wait_ready`)."""
    conn.send(("ready", info))


def _exit_with_parent(parent_pid: int) -> None:
    """Worker side: a daemon thread that ends this process as soon as its parent is gone."""
    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)
    threading.Thread(target=poll, name="exit-with-parent", daemon=True).start()


def _bootstrap(target: Callable, conn, parent_pid: int, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    try:
        target(conn, *args)
    except BaseException:
        traceback.print_exc()           # to the worker's stderr (the parent's): visible after start-up too
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)


class WorkerGroup:
    def __init__(self, target: Callable, args: list[tuple], name: str = "minisys-worker") -> None:
        """``target(conn, *args[i])`` is worker i's main function (a module-level function: spawn
        imports it by name)."""
        self.target, self.args, self.name = target, args, name
        self.procs: list[mp.Process] = []
        self.conns: list = []
        self._stopping = threading.Event()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        for i, args in enumerate(self.args):
            parent_conn, child_conn = ctx.Pipe()
            p = ctx.Process(target=_bootstrap, args=(self.target, child_conn, os.getpid(), *args),
                            name=f"{self.name}-{i}", daemon=True)
            p.start()
            child_conn.close()
            self.procs.append(p)
            self.conns.append(parent_conn)

    def wait_ready(self, timeout_s: float) -> list[Any]:
        """Each worker's ``info`` once all reported ready; `WorkerError` (with the worker's traceback)
        if one fails, dies or is not ready within ``timeout_s``; the group is stopped then."""
        infos: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(infos) < len(self.procs):
                pending = [i for i in range(len(self.procs)) if i not in infos]
                left = deadline - time.monotonic()
                ready = wait([self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending],
                             timeout=max(left, 0))
                if not ready:
                    raise WorkerError(f"{self.name}: workers {pending} not ready after {timeout_s:.0f} s")
                for i in pending:
                    if self.conns[i] in ready or self.procs[i].sentinel in ready:
                        infos[i] = self._receive_ready(i)
        except BaseException:
            self.stop()
            raise
        return [infos[i] for i in range(len(self.procs))]

    def _receive_ready(self, i: int) -> Any:
        try:
            kind, payload = self.conns[i].recv()
        except (EOFError, OSError):
            self.procs[i].join(1)
            raise WorkerError(f"{self.name}-{i} exited with code {self.procs[i].exitcode} while starting") from None
        if kind == "error":
            raise WorkerError(f"{self.name}-{i} failed while starting:\n{payload}")
        return payload

    def dead(self) -> list[tuple[int, int | None]]:
        """(index, exit code) of every worker that is no longer running."""
        return [(i, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]

    def watch(self, on_death: Callable[[int, int | None], None], every: bool = False) -> None:
        """A daemon thread calls ``on_death(index, exitcode)`` once, for the first worker that dies
        (not when `stop` ends them); with ``every``, once for each worker that dies (replicas: the
        others keep serving)."""
        def run() -> None:
            sentinels = {p.sentinel: i for i, p in enumerate(self.procs)}
            while sentinels and not self._stopping.is_set():
                hit = wait(list(sentinels), timeout=1.0)
                for s in hit if every else hit[:1]:
                    if self._stopping.is_set():
                        return
                    i = sentinels.pop(s)
                    self.procs[i].join(1)
                    on_death(i, self.procs[i].exitcode)
                if hit and not every:
                    return
        threading.Thread(target=run, name=f"{self.name}-watch", daemon=True).start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End every worker: SIGTERM, wait up to ``timeout_s``, then SIGKILL; idempotent."""
        self._stopping.set()
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0))
            if p.is_alive():
                p.kill()
                p.join(2)
        for c in self.conns:
            c.close()
        self.conns = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
