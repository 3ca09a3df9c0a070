"""The one-shot GPU check: correctness on CUDA, throughput side by side, decode latency with/without graphs.

    bash bench/gpu_check.sh                         # = python -m minisys bench gpu (needs a CUDA GPU)
    python -m minisys bench gpu --dry-run           # the same code paths at tiny size on CPU (CI runs it)

Meant for a machine lent for a few minutes (H100/H200 class: under 8 minutes
in all). It installs nothing and fetches nothing: torch, transformers and
triton must be there, and the model is the cached GGUF (``--model`` for a
local directory). Every part runs even when an earlier one fails; the exit
code is 1 when a correctness check failed.

(a) correctness, on the device, in the device's dtype (bf16 on CUDA):
    * ``logits``: minisys vs transformers on the same weights and device, every
      position of a prompt; within `TOLERANCE` (bf16: both sides round every
      layer's output to 8 mantissa bits, so they differ by ~1% of a logit's size);
    * ``engine_equals_eager``: greedy `LLMEngine` (batched, paged, CUDA graphs) ==
      greedy eager generation (`EagerGenerator`) for a few prompts, token for token;
    * ``server``: an in-process OpenAI-compatible server answers the ``openai`` client.
(b) throughput on nano-vllm's workload (256 sequences, prompt and output lengths
    100-1024, ignore_eos; `minisys.bench.throughput`'s workload and baselines):
    minisys, transformers' padded ``generate``, and transformers' continuous
    batching (``init_continuous_batching``, when this transformers has it).
(c) batch-1 decode ms/token with and without CUDA graphs (`dtype_speed.decode_ms_per_token`).
(d) JSON to ``bench/results/gpu_check_<device>.json``: device, driver, torch, the command.

``--dry-run`` (CPU, fp32 unless ``--dtype bfloat16``): the same functions with 4 short sequences, a few
decode steps and, where CUDA is needed, its CPU stand-in (the graph runner's
static-buffer step uncaptured; the Triton kernel is not launched on CPU).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import torch

from .common import save_result

# max |minisys - transformers| over every logit of the prompts. bf16: both sides round each layer's output
# to 8 mantissa bits in a different order; logits reach ~30, so 2.0 is ~7% of the largest (the argmax
# agreement is reported beside it). fp32: the same math, summation order apart.
TOLERANCE = {torch.bfloat16: 2.0, torch.float32: 2e-3}
FULL = dict(num_seqs=256, min_len=100, max_len=1024, max_num_seqs=256, decode_steps=256)
DRY = dict(num_seqs=4, min_len=4, max_len=12, max_num_seqs=4, decode_steps=6)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def device_info(device: str) -> dict:
    """The device's name, the NVIDIA driver and CUDA versions (empty strings off CUDA)."""
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda or "", "driver": "",
            "name": "cpu"}
    if device.startswith("cuda"):
        info["name"] = torch.cuda.get_device_name(0)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else ""
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return info


def random_weights_dir(spec_dir: str, seed: int = 0) -> str:
    """A model directory with ``spec_dir``'s config.json and tokenizer and random weights (transformers'
    own init, seeded, saved with ``save_pretrained``): what a GPU machine without the 98 MB GGUF runs.
    Same shapes, so the same speed; correctness is still minisys vs transformers on the same weights."""
    import shutil
    import tempfile
    from pathlib import Path
    from transformers import AutoConfig, AutoModelForCausalLM
    out = Path(tempfile.mkdtemp(prefix="minisys-random-weights-"))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec_dir)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(spec_dir) / name).exists():
            shutil.copy(Path(spec_dir) / name, out / name)
    return str(out)


def load_oracle(model_path: str | None, device: str, dtype: torch.dtype):
    """transformers' model of the same weights: the default GGUF, or the local directory given."""
    from .throughput import load_hf
    if model_path is None:
        return load_hf(device, dtype)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()


@torch.inference_mode()
def check_logits(model, hf, tok) -> dict:
    """max |Δ| of every position's logits for each prompt, and whether the argmax agrees everywhere."""
    worst, means, same, total = 0.0, [], 0, 0
    for text in PROMPTS:
        ids = tok.encode(text)[:32] or [1]
        ours = model.forward_sequence(ids)                                           # (T, V) fp32
        theirs = hf(torch.tensor([ids], device=model.device)).logits[0].float()      # (T, V)
        worst = max(worst, float((ours - theirs).abs().max()))
        means.append(float((ours - theirs).abs().mean()))
        same, total = same + int((ours.argmax(-1) == theirs.argmax(-1)).sum()), total + len(ids)
    tol = TOLERANCE.get(model.dtype, 2.0)
    return {"dtype": str(model.dtype).replace("torch.", ""), "max_abs_diff": worst, "mean_abs_diff": max(means),
            "tolerance": tol, "argmax_agrees": same == total, "argmax_agreement": same / total, "ok": worst <= tol}


def check_engine_equals_eager(model, tok, max_tokens: int) -> dict:
    """Greedy outputs of the engine (all prompts in one batch) vs the eager baseline, one at a time.
    Token for token in fp32; in bf16 a batch of 3 and a batch of 1 round differently, so a divergence
    there is reported (``first_divergence``) but the check is run in fp32 too (`main`)."""
    from ..engine.config import EngineConfig
    from ..engine.eager import EagerGenerator
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, max_num_seqs=8, max_model_len=256))
    prompts = [tok.encode(t) for t in PROMPTS]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                got[int(o.request_id)] = list(o.outputs[0].token_ids)
    eager = EagerGenerator(model, tok)
    want = [list(eager.generate(p, params).token_ids) for p in prompts]
    first_diff = [next((j for j, (a, b) in enumerate(zip(got[i], w)) if a != b), None) for i, w in enumerate(want)]
    return {"dtype": str(model.dtype).replace("torch.", ""),
            "graphs_captured": bool(engine.runner.graphs and engine.runner.graphs.graphs),
            "first_divergence": first_diff, "ok": all(d is None for d in first_diff)}


@contextmanager
def served(engine, tok, name: str = "minisys"):
    """An in-process OpenAI-compatible server for ``engine`` on a free loopback port; yields its /v1 URL."""
    import uvicorn
    from ..server.app import build_app
    from ..server.async_engine import AsyncLLMEngine
    from .server_process import free_port, wait_healthy
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(AsyncLLMEngine(engine), tok, name),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", None, timeout=120)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def check_server(model, tok) -> dict:
    """The openai client's completion through the server (a plain prompt: any model has no chat template):
    a non-empty answer of the requested length, usage counted."""
    from openai import OpenAI
    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    cfg = EngineConfig(num_kv_blocks=64, max_num_seqs=4, max_model_len=min(512, model.config.max_position_embeddings))
    with served(LLMEngine(model, tok, cfg), tok) as url:
        client = OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=120)
        r = client.completions.create(model="minisys", prompt="The capital of France is", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    text = r.choices[0].text or ""
    return {"answer": text, "completion_tokens": r.usage.completion_tokens,
            "ok": bool(text) and r.usage.completion_tokens == 8}


def run_hf_continuous(hf, work, warmup: bool = True) -> float | str:
    """Seconds for the workload on transformers' continuous batching (greedy, EOS off), or why it cannot run."""
    from .transformers_baseline import _hf_run, transformers_available
    why = transformers_available()
    if why is not None:
        return why
    from transformers import GenerationConfig
    max_new = max(n for _, n in work)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=-1)
    try:                                                            # newer transformers size the cache from hints
        from transformers.generation.continuous_batching.utils import WorkloadHints
        hints = WorkloadHints(max_prompt_length=max(len(p) for p, _ in work), max_generated_length=max_new,
                              num_requests=len(work))
        manager = hf.init_continuous_batching(generation_config=config, workload_hints=hints)
    except (ImportError, TypeError):
        manager = hf.init_continuous_batching(generation_config=config)
    if warmup and hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()                                         # its CUDA graphs, captured before the clock
    manager.start()
    try:
        traces, seconds = _hf_run(manager, [p for p, _ in work], [n for _, n in work], [0.0] * len(work), "gpu")
    finally:
        manager.stop(block=True, timeout=60)
    bad = [t.error for t in traces if t.error]
    return f"transformers' continuous batching failed: {bad[0]}" if bad else seconds


def throughput(model, tok, hf, size: dict, continuous: bool = True) -> dict:
    """Output tokens/s of minisys, transformers' padded generate and its continuous batching, side by side.
    ``continuous=False`` (the dry run): its API is checked, not run (its set-up alone takes ~1 min on a CPU)."""
    from .throughput import make_workload, run_engine, run_hf
    vocab = min(model.config.vocab_size, 10000)
    work = make_workload(size["num_seqs"], size["min_len"], size["max_len"], vocab=vocab)
    tokens = sum(n for _, n in work)
    run_engine(model, tok, work[:2], 2)                                  # warm-up (and graph capture)
    rows = {}
    secs, engine = run_engine(model, tok, work, size["max_num_seqs"])
    rows["minisys"] = {"seconds": secs, "tok_s": tokens / secs, "steps": engine.stats.steps,
                       "cuda_graphs": bool(engine.runner.graphs and engine.runner.graphs.graphs)}
    secs = run_hf(hf, work, size["max_num_seqs"])
    rows["transformers_generate"] = {"seconds": secs, "tok_s": tokens / secs}
    if continuous:
        try:                                              # another transformers version: its column says why
            cb = run_hf_continuous(hf, work)
        except Exception as exc:                          # noqa: BLE001 - recorded in the JSON, never hidden
            cb = f"transformers' continuous batching failed: {type(exc).__name__}: {exc}"
    else:
        from .transformers_baseline import transformers_available
        cb = transformers_available() or "dry run: API present; not run (about a minute of set-up on a CPU)"
    rows["transformers_continuous"] = ({"seconds": cb, "tok_s": tokens / cb} if isinstance(cb, float)
                                       else {"skipped": cb})
    for r in rows.values():
        if "tok_s" in r:
            r["minisys_speedup"] = rows["minisys"]["tok_s"] / r["tok_s"]
    return {"workload": {**size, "output_tokens": tokens, "ignore_eos": True}, "systems": rows}


def latency(model, tok, steps: int) -> dict:
    """Batch-1 decode ms/token, eager and with CUDA graphs (on CPU: the uncaptured static path)."""
    from .dtype_speed import decode_ms_per_token
    decode_ms_per_token(model, tok, steps=2, graphs=True)              # warm-up (compiles the kernels)
    eager = decode_ms_per_token(model, tok, steps=steps, graphs=False)
    graphs = decode_ms_per_token(model, tok, steps=steps, graphs=True)
    return {"eager_ms_per_token": eager["ms_per_token"], "graphs_ms_per_token": graphs["ms_per_token"],
            "graphs_captured": graphs["graphs_captured"], "graph_error": graphs["graph_error"],
            "speedup": eager["ms_per_token"] / graphs["ms_per_token"]}


NO_KERNEL = {"view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "t", "slice", "select", "expand",
             "reshape", "as_strided", "alias", "detach", "detach_", "permute", "lift_fresh", "item",
             "empty", "empty_like", "resolve_conj", "resolve_neg", "to"}   # metadata only, or usually a no-op


def count_decode_ops(model, tok) -> dict:
    """The torch ops one batch-1 decode step dispatches (a `TorchDispatchMode` counts them): on a GPU each
    op outside `NO_KERNEL` is at least one kernel launch, and ``item`` is a host sync."""
    from collections import Counter
    from torch.utils._python_dispatch import TorchDispatchMode
    from ..engine.paged_runner import PagedRunner

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    runner = PagedRunner(model, 4, 16)
    runner.add("a", [(7 * i) % min(model.config.vocab_size, 10000) for i in range(8)])
    runner.append("a", int(runner.step(["a"])[0].argmax()))
    with Count() as c:
        runner.step(["a"])
    launches = sum(n for op, n in c.ops.items() if op not in NO_KERNEL)
    return {"layers": model.config.num_layers, "ops": sum(c.ops.values()), "kernel_ops": launches,
            "kernel_ops_per_layer": launches / model.config.num_layers, "host_syncs": c.ops["item"],
            "top": c.ops.most_common(8)}


def _part(res: dict, name: str, fn, *args) -> None:
    """Run one part; a failure is recorded (with its error) and the check goes on."""
    t = time.perf_counter()
    try:
        res[name] = fn(*args)
    except Exception as exc:                                          # noqa: BLE001 - reported, never hidden
        res[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    res[name]["seconds_taken"] = round(time.perf_counter() - t, 2)
    print(f"[gpu_check] {name}: {res[name]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code paths (CI)")
    p.add_argument("--model", default=None, help="a local HF directory (default: the cached SmolLM2 GGUF)")
    p.add_argument("--random-weights", metavar="DIR", default=None,
                   help="random weights with DIR's config.json and tokenizer (bench/gpu_prepare.sh writes .gpu/model): "
                        "for a GPU machine without the model cache")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the model's dtype (auto: bf16 on CUDA; the dry run's auto is float32)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--skip", action="append", default=[], choices=["correctness", "throughput", "latency"],
                   help="leave a part out (repeatable); the JSON says which")
    a = p.parse_args(argv)
    device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    size = DRY if a.dry_run else FULL
    from ..model import load
    from ..model.dtype import resolve_dtype
    dtype = torch.float32 if a.dry_run and a.dtype == "auto" else resolve_dtype(a.dtype, device)
    t0 = time.perf_counter()
    if a.random_weights and a.model:
        p.error("give --model or --random-weights, not both")
    if a.random_weights:
        a.model = random_weights_dir(a.random_weights)
    model, tok = load(a.model, device=device, dtype=dtype, quiet=True)
    hf = load_oracle(a.model, device, dtype)
    res = {"gpu": device_info(device), "dtype": str(dtype).replace("torch.", ""), "dry_run": a.dry_run,
           "weights": "random (the shape of " + a.random_weights + ")" if a.random_weights else a.model or "default",
           "skipped": a.skip}
    if "correctness" not in a.skip:
        _part(res, "logits", check_logits, model, hf, tok)
        n = 16 if a.dry_run else 32
        if model.dtype != torch.float32:                      # informational in bf16; the check is fp32's
            _part(res, "engine_equals_eager_bf16", check_engine_equals_eager, model, tok, n)
            res["engine_equals_eager_bf16"].pop("ok", None)
        fp32 = model if model.dtype == torch.float32 else load(a.model, device=device, dtype=torch.float32,
                                                                quiet=True)[0]
        _part(res, "engine_equals_eager", check_engine_equals_eager, fp32, tok, n)
        del fp32
        _part(res, "server", check_server, model, tok)
    if "throughput" not in a.skip:
        _part(res, "throughput", throughput, model, tok, hf, size, not a.dry_run)
    if "latency" not in a.skip:
        _part(res, "decode_ops", count_decode_ops, model, tok)
        _part(res, "decode_latency", latency, model, tok, size["decode_steps"])
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    slug = re.sub(r"[^a-z0-9]+", "_", res["gpu"]["name"].lower()).strip("_")
    path = save_result(f"gpu_check_{'dryrun_' if a.dry_run else ''}{slug}", res, a.out)
    failed = [k for k in ("logits", "engine_equals_eager", "server") if res.get(k, {}).get("ok") is False]
    failed += [k for k in ("throughput", "decode_latency") if "error" in res.get(k, {})]
    print(f"[gpu_check] wrote {path}; {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} "
          f"in {res['total_seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
