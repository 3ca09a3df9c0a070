"""The serving benchmark's outside baseline: transformers' own continuous batching, in-process.

The ``ContinuousBatchingManager`` behind ``generate_batch`` (transformers
5.x) runs the same seeded workload with the same arrival times and the
same weights (the default GGUF, fp32), greedy with EOS off. There is no
HTTP and no SSE in this path, so it is slightly favoured against a server.
"""
from __future__ import annotations

import math
import os
import threading
import time

from .metrics import SLO, RequestTrace, poisson_arrivals, summarize
from .serve_workload import BenchRequest


def transformers_available() -> str | None:
    """None if transformers has continuous batching (``generate_batch``), else why not."""
    try:
        from transformers import GenerationMixin
    except Exception as exc:                               # pragma: no cover - transformers is a test dependency
        return f"transformers not importable: {exc}"
    if not hasattr(GenerationMixin, "init_continuous_batching"):
        import transformers
        return f"transformers {transformers.__version__} has no continuous batching (generate_batch)"
    return None


def bench_transformers(requests: list[BenchRequest], rates: list[float], seed: int, slo: SLO | None) -> list[dict]:
    """The same workload on transformers' ContinuousBatchingManager (in-process, greedy, EOS off).

    The manager behind ``generate_batch`` runs its own loop in a thread; we add
    each request at its Poisson time and read ``record_timestamps``'s per-token
    times (one arrival per token: no HTTP and no SSE in this path).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    from ..model.store import fetch_gguf
    from .throughput import load_hf
    os.environ.setdefault("TQDM_DISABLE", "1")             # the GGUF de-quantization progress bar
    path = fetch_gguf(quiet=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = load_hf("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    ids = [tok(r.prompt)["input_ids"] for r in requests]
    max_new = max(r.max_tokens for r in requests)
    hints = WorkloadHints(max_prompt_length=max(map(len, ids)), max_generated_length=max_new,
                          num_requests=len(ids))            # as generate_batch sizes its cache
    manager = hf.init_continuous_batching(generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=max_new, eos_token_id=-1), workload_hints=hints)
    if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()
    manager.start()
    try:
        _hf_run(manager, [[1, 2, 3]], [4], [0.0], "warm")
        out = []
        for rate in rates:
            offsets = poisson_arrivals(len(requests), rate, seed)
            traces, duration = _hf_run(manager, ids, [r.max_tokens for r in requests], offsets, f"r{rate}")
            out.append({**summarize(traces, duration, slo), "rate": rate})
        return out
    finally:
        manager.stop(block=True, timeout=30)


def _hf_run(manager, ids: list[list[int]], max_tokens: list[int], offsets: list[float], tag: str):
    """(traces, duration): add requests at ``offsets`` from a thread, collect the finished outputs."""
    traces = {f"{tag}-{i}": RequestTrace(arrival=math.nan) for i in range(len(ids))}
    start = time.perf_counter()

    def feed():
        for i, (p, n, off) in enumerate(zip(ids, max_tokens, offsets)):
            time.sleep(max(0.0, start + off - time.perf_counter()))
            traces[f"{tag}-{i}"].arrival = time.perf_counter()
            manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=n, record_timestamps=True,
                                eos_token_id=-1)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    pending = set(traces)
    while pending:
        res = manager.get_result(timeout=1)
        if res is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped")
            continue
        if res.request_id in pending and res.is_finished():
            t = traces[res.request_id]
            t.token_times, t.output_tokens = list(res.timestamps or []), len(res.generated_tokens)
            t.prompt_tokens, t.error = len(res.prompt_ids), res.error or ""
            pending.discard(res.request_id)
    feeder.join()
    return list(traces.values()), time.perf_counter() - start
