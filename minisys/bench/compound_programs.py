"""bench compound, part (b): a map-reduce program issued call by call vs submitted as one DAG (lesson 16).

The program (`minisys.programs.examples.map_reduce_program`): N chunk
summaries (map, independent), then one combine of all of them (reduce). Two
servers over the same loaded model, each its own engine and prefix cache,
serve it over HTTP on loopback (uvicorn in a thread, the real app):

* ``sequential``: `SequentialClient`, the request-at-a-time OpenAI client:
  each call is sent when the previous answer is back (N + 1 round trips,
  batch size 1 throughout);
* ``dag``: `ProgramClient`, the whole program in one ``POST /v1/programs``:
  the N maps go into the engine together and batch, the combine starts the
  moment the last map ends.

Each repetition uses fresh documents (a repetition marker before every chunk),
so no run reuses another's chunk KV; both servers still share the map
instruction prefix between calls of one program (measured: the
``prefix_cache_hits`` counter of /metrics). The modes alternate which goes
first. Reported: end-to-end latency per repetition and its median, the
speed-up, prefix-cache hits, and whether every call's text and token count
are equal between the two modes (greedy: they must be).
"""
from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .server_process import free_port


def _serve(model, tok, name: str, engine_config) -> tuple[object, threading.Thread, str]:
    import uvicorn

    from ..engine.llm_engine import LLMEngine
    from ..server.app import build_app
    from ..server.async_engine import AsyncLLMEngine
    from .server_process import wait_healthy
    port = free_port()
    app = build_app(AsyncLLMEngine(LLMEngine(model, tok, engine_config)), tok, name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, None, 120)
    return server, thread, url


@contextmanager
def servers(model, tok, names: list[str], engine_config) -> Iterator[dict[str, str]]:
    """One in-thread server per name, all over the same model; stopped (and joined) on exit."""
    running = []
    try:
        for n in names:
            running.append((n, *_serve(model, tok, "bench", engine_config)))
        yield {n: url for n, _, _, url in running}
    finally:
        for _, server, thread, _ in running:
            server.should_exit = True
        for _, _, thread, _ in running:
            thread.join(timeout=30)


def _prefix_hits(url: str) -> tuple[float, float]:
    import httpx

    from ..server.metrics import parse_metrics
    m = parse_metrics(httpx.get(url + "/metrics", timeout=30).text)
    return m["minisys:prefix_cache_hits_total"], m["minisys:prefix_cache_queries_total"]


def map_reduce_side_by_side(model, tok, chunks: list[str], map_tokens: int, reduce_tokens: int, reps: int,
                            max_num_seqs: int = 16, warmup: bool = True, log=print) -> dict:
    """Run the map-reduce program ``reps`` times per mode, interleaved; the results dict (see the module).
    ``warmup``: one uncounted run per mode first (the program path's first-call costs)."""
    import openai

    from ..engine.config import EngineConfig
    from ..programs.client import ProgramClient, SequentialClient
    from ..programs.examples import map_reduce_program
    config = EngineConfig(num_kv_blocks=1024, max_num_seqs=max_num_seqs)
    modes = ["sequential", "dag"]
    lat: dict[str, list[float]] = {m: [] for m in modes}
    hits = {m: [0.0, 0.0] for m in modes}
    same, runs = [], []
    with servers(model, tok, modes, config) as urls:
        seq_client = SequentialClient(openai.OpenAI(base_url=urls["sequential"] + "/v1", api_key="EMPTY",
                                                    max_retries=0, timeout=600), "bench")
        dag_client = ProgramClient(urls["dag"], model="bench")
        for url in urls.values() if warmup else ():           # warm-up (first-call costs), not counted
            openai.OpenAI(base_url=url + "/v1", api_key="EMPTY").completions.create(
                model="bench", prompt="Warm up", max_tokens=2)
        for r in range(0 if warmup else 1, reps + 1):         # repetition 0: warm-up of the program path
            prog = map_reduce_program([f"(document {r})\n{c}" for c in chunks], map_tokens, reduce_tokens)
            out = {}
            for m in (modes if r % 2 == 0 else modes[::-1]):
                before = _prefix_hits(urls[m])
                t0 = time.perf_counter()
                out[m] = (seq_client if m == "sequential" else dag_client).run(prog)
                wall = time.perf_counter() - t0
                after = _prefix_hits(urls[m])
                if r == 0:
                    continue
                lat[m].append(wall)
                hits[m][0] += after[0] - before[0]
                hits[m][1] += after[1] - before[1]
            equal = all(out["dag"].calls[n].text == out["sequential"].calls[n].text
                        and out["dag"].calls[n].completion_tokens == out["sequential"].calls[n].completion_tokens
                        for n in out["sequential"].calls)
            if r:
                same.append(equal)
                runs.append({"final": out["dag"].outputs["final"],
                             "dag_token_ids": {n: c.token_ids for n, c in out["dag"].calls.items()},
                             "dag_calls": {n: [round(c.start_s, 3), round(c.end_s, 3)]
                                           for n, c in out["dag"].calls.items()}})
                log(f"rep {r}/{reps}: sequential {lat['sequential'][-1]:.2f} s, dag {lat['dag'][-1]:.2f} s, "
                    f"same outputs: {equal}")
    med = {m: statistics.median(lat[m]) for m in modes}
    pairs = [s / d for s, d in zip(lat["sequential"], lat["dag"])]       # each repetition's own ratio
    return {
        "latency_s": lat, "latency_median_s": med, "speedup_dag_vs_sequential": med["sequential"] / med["dag"],
        "speedup_per_rep": pairs, "speedup_median_of_reps": statistics.median(pairs),
        "decode_tokens": {"sequential_batch1": sum(len(v) for v in runs[-1]["dag_token_ids"].values()),
                          "dag_map_phase_steps": max(len(runs[-1]["dag_token_ids"][f"s{i}"])
                                                     for i in range(len(chunks))),
                          "dag_reduce_steps": len(runs[-1]["dag_token_ids"]["final"])},
        "prefix_cache": {m: {"hit_tokens": hits[m][0], "queried_tokens": hits[m][1]} for m in modes},
        "same_outputs": all(same), "runs": runs,
        "calls": len(chunks) + 1, "map_tokens": map_tokens, "reduce_tokens": reduce_tokens,
    }
