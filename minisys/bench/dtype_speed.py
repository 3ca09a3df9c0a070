"""Batch-1 decode speed of the engine, and the fp32-vs-bf16 line that makes ``--dtype auto`` visible.

    python -m minisys bench dtype              # both dtypes' decode ms/token on this CPU, and what auto picks

`decode_ms_per_token` runs one greedy request on `LLMEngine` and times the
decode steps only (the first step, the prefill, is not counted). ``graphs``
turns CUDA graphs on: captured on CUDA; on CPU the engine's runner is built
with the graph runner's static-buffer path (what a graph would replay), so the
same code runs everywhere (`minisys.bench.gpu_check --dry-run`).
"""
from __future__ import annotations

import argparse
import time

import torch

from .common import cpu_description, save_result


def decode_ms_per_token(model, tok, steps: int = 64, prompt_len: int = 32, graphs: bool = False) -> dict:
    """{"ms_per_token", "graphs_captured"}: median over the decode steps of one request (batch 1)."""
    from ..engine.config import EngineConfig
    from ..engine.cuda_graph import CudaGraphSpec
    from ..engine.llm_engine import LLMEngine
    from ..engine.model_runner import ModelRunner
    from ..engine.sampling_params import SamplingParams
    max_len = prompt_len + steps + 1
    cfg = EngineConfig(num_kv_blocks=-(-max_len // 16) + 1, max_num_seqs=1, max_model_len=max_len,
                       max_num_batched_tokens=max(max_len, 16), enforce_eager=not graphs)
    engine = LLMEngine(model, tok, cfg)
    if graphs and engine.runner.graphs is None:          # not CUDA (or no triton): the uncaptured static path
        engine.runner = ModelRunner(model, engine.config.num_kv_blocks, 16, CudaGraphSpec(1, max_len))
    prompt = [(7 * i) % min(model.config.vocab_size, 10000) for i in range(prompt_len)]
    engine.add_request("0", prompt, SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True))
    engine.step()                                        # the prefill (and the first token)
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"ms_per_token": 1000 * times[len(times) // 2],
            "graphs_captured": bool(engine.runner.graphs is not None and engine.runner.graphs.graphs),
            "graph_error": engine.runner.graph_error}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench dtype", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating fp32/bf16 measurements; the median is kept")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ..model import load
    from ..model.dtype import auto_dtype, cpu_has_native_bf16
    res = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
           "auto": str(auto_dtype("cpu")).replace("torch.", ""), "decode_ms_per_token": {}}
    models = {str(dt).replace("torch.", ""): load(a.model, device="cpu", dtype=dt, quiet=True)
              for dt in (torch.float32, torch.bfloat16)}
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(a.rounds):                            # alternate the dtypes: load drifts hit both alike
        for name, (model, tok) in models.items():
            decode_ms_per_token(model, tok, steps=2)                     # warm-up
            runs[name].append(decode_ms_per_token(model, tok, steps=a.steps)["ms_per_token"])
    res["decode_ms_per_token"] = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    res["runs_ms_per_token"] = runs
    ms = res["decode_ms_per_token"]
    print(f"decode, batch 1, this CPU ({res['cpu'].get('cpu_model', '?')}; flags {res['cpu'].get('cpu_flags')}): "
          f"float32 {ms['float32']:.1f} ms/token, bfloat16 {ms['bfloat16']:.1f} ms/token "
          f"(bf16/fp32 = {ms['bfloat16'] / ms['float32']:.2f}x, {res['threads']} threads); --dtype auto picks {res['auto']}")
    path = save_result("dtype_speed", res, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
