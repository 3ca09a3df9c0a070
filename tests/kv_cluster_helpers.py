"""Shared by tests/test_kv_transfer.py and tests/test_migration.py: two engines in two processes, the
eager oracle, and two real replica servers on one KV group."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from minisys.bench.server_process import free_port, wait_healthy

BLOCK_SIZE = 4
HOST_CONFIG = {"num_kv_blocks": 64, "max_num_seqs": 4, "block_size": BLOCK_SIZE}


def eager_tokens(model_dir, prompt: list[int], params: dict) -> list[int]:
    """The eager baseline's tokens (`minisys.engine.eager`): the independent oracle."""
    from minisys.engine.eager import EagerGenerator
    from minisys.engine.sampling_params import SamplingParams
    from minisys.model import load
    model, tok = _eager_cache.get(str(model_dir)) or load(str(model_dir), device="cpu", dtype=torch.float32,
                                                            quiet=True)
    _eager_cache[str(model_dir)] = (model, tok)
    return EagerGenerator(model, tok).generate(prompt, SamplingParams(**params)).token_ids


_eager_cache: dict = {}


def smol_eager_text(smol, url: str, tokenize_body: dict, max_tokens: int) -> str:
    """The eager baseline's greedy text on SmolLM2 in this process, from the server's own token ids."""
    import httpx

    from minisys.engine.eager import EagerGenerator
    from minisys.engine.sampling_params import SamplingParams
    ids = httpx.post(url + "/tokenize", json=tokenize_body, timeout=60).json()["tokens"]
    model, tok = smol
    return EagerGenerator(model, tok).generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens)).text


def assert_no_leak(hosts) -> None:
    """Every block free on every engine, nothing held or staged (the hosts also check invariants)."""
    for r in range(2):
        c = hosts.call(r, "counts")
        assert c["free"] == c["total"], f"rank {r}: {c['total'] - c['free']} KV blocks leaked ({c})"
        assert not c["held"] and not c["staged"] and not c["unfinished"], f"rank {r}: {c}"


@contextmanager
def two_replicas(extra: list[str], timeout: float = 240.0):
    """Two ``minisys serve`` processes joined by one KV group (gloo), 1 thread each; yields their URLs."""
    master, ports = free_port(), [free_port(), free_port()]
    logdir = Path(tempfile.mkdtemp(prefix="minisys-kv-"))
    procs = []
    for r in range(2):
        log = open(logdir / f"replica{r}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "minisys", "serve", *extra, "--device", "cpu", "--dtype", "float32",
             "--threads", "1", "--host", "127.0.0.1", "--port", str(ports[r]), "--kv-connector", "gloo",
             "--kv-rank", str(r), "--kv-world-size", "2", "--kv-master-port", str(master)],
            stdout=log, stderr=subprocess.STDOUT))
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for r in range(2):
            wait_healthy(urls[r], procs[r], timeout, logdir / f"replica{r}.log")
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
