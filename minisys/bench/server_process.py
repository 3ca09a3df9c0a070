"""Servers as subprocesses: ``python -m minisys serve ...`` on a free port, for benchmarks and labs.

`launched_server` starts one, waits until ``GET /health`` answers 200 and
yields its root URL; the process is stopped when the ``with`` block ends,
even on an error (terminate, then kill after 10 s). Its output goes to a
log file whose tail is shown if it dies before it is healthy.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Poll ``GET /health`` until 200; raise if the process dies or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy:\n{tail}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout:.0f} s")


@contextmanager
def launched_server(args: list[str], timeout: float = 300.0, log_dir: str | None = None) -> Iterator[str]:
    """Start ``python -m minisys serve ARGS --port P`` on a free loopback port; yield its URL; stop it.

    The server's output goes to a log file (a pipe nobody reads could fill and
    block it). On exit the process gets SIGTERM, then SIGKILL after 10 s.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(log_dir or tempfile.mkdtemp(prefix="minisys-serve-")) / f"server-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "minisys", "serve", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, timeout, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
