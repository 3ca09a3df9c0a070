"""Offline throughput: continuous batching vs static batching vs transformers vs eager.

    python -m minisys bench throughput              # CPU size: 64 sequences, lengths 16-256
    MINISYS_QUICK=1 python -m minisys bench throughput   # CI / notebook size
    python -m minisys bench throughput --full       # GPU size (nano-vllm's: 256 seqs, 100-1024)

The workload is shaped like nano-vllm's ``bench.py``: N sequences with random
prompt token ids of random length and a random number of output tokens each,
``ignore_eos`` (every request produces exactly its output length), temperature
0.6, all seeded. Throughput = requested output tokens / wall time. All
systems run side by side in one process on the same weights:

* minisys: `LLMEngine` (continuous batching, paged KV, paged attention);
* static: `StaticBatchGenerator`, fixed batches of ``--max-num-seqs`` that wait for their longest request;
* transformers: ``model.generate`` on padded (left) batches of the same size, same weights (loaded from the GGUF);
* eager: one request at a time (`EagerGenerator`); it is measured on the first
  ``--eager-subset`` requests only (one at a time, its tokens/s do not depend on N),
  on its own fastest attention backend (``auto``).

Every system runs in the same dtype: ``--dtype auto`` is bf16 where the
device computes it natively (CUDA; a CPU with AVX-512 BF16 or AMX, as vLLM's
CPU backend does) and fp32 elsewhere. The table says which one ran.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from .common import quick_mode, save_result


def make_workload(num_seqs: int, min_len: int, max_len: int, vocab: int = 10000, seed: int = 0):
    """[(prompt_ids, output_len)] with uniform random lengths in [min_len, max_len] (nano-vllm's shape)."""
    rng = random.Random(seed)
    return [([rng.randint(0, vocab - 1) for _ in range(rng.randint(min_len, max_len))], rng.randint(min_len, max_len))
            for _ in range(num_seqs)]


def params_for(work, seed: int = 0, temperature: float = 0.6):
    from ..engine.sampling_params import SamplingParams
    return [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, seed=seed + i)
            for i, (_, n) in enumerate(work)]


def run_engine(model, tok, work, max_num_seqs: int, kv_blocks: int | None = None, block_size: int = 16):
    """(seconds, engine) for the whole workload on LLMEngine."""
    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    worst = max(len(p) + n for p, n in work)
    blocks = kv_blocks or sum(-(-(len(p) + n) // block_size) for p, n in work) + max_num_seqs
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max(2048, worst, max_num_seqs),
                       enable_chunked_prefill=False)            # lesson 04's policy, as its numbers were measured
    engine = LLMEngine(model, tok, cfg)
    t = time.perf_counter()
    for i, ((p, _), sp) in enumerate(zip(work, params_for(work))):
        engine.add_request(str(i), p, sp)
    finish_times = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finish_times[o.request_id] = time.perf_counter() - t
    engine.latencies = [finish_times[str(i)] for i in range(len(work))]
    return time.perf_counter() - t, engine


def run_static(model, tok, work, batch_size: int):
    from ..engine.static_batching import StaticBatchGenerator
    gen = StaticBatchGenerator(model, tok, batch_size)
    t = time.perf_counter()
    gen.generate([p for p, _ in work], params_for(work))
    return time.perf_counter() - t, gen


def run_eager(model, tok, work, backend: str = "auto"):
    """Seconds for ``work`` one request at a time, on ``backend`` (then the model's own is restored)."""
    from ..engine.eager import EagerGenerator
    before = model.attention
    model.set_attention_backend(backend)
    try:
        gen = EagerGenerator(model, tok)
        t = time.perf_counter()
        for (p, _), sp in zip(work, params_for(work)):
            gen.generate(p, sp)
        return time.perf_counter() - t
    finally:
        model.set_attention_backend(before)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' -> bf16 where the device has native bf16 matmuls, else fp32 (`minisys.model.dtype`'s probe)."""
    from ..model.dtype import resolve_dtype as resolve
    return resolve(name, device)


def load_hf(device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    from ..model.store import fetch_gguf
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = fetch_gguf(quiet=True)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval()


@torch.inference_mode()
def run_hf(hf, work, batch_size: int, pad_id: int = 0):
    """transformers' generate on left-padded batches; each batch runs to its longest output."""
    device = hf.device
    t = time.perf_counter()
    for b in range(0, len(work), batch_size):
        batch = work[b:b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(n for _, n in batch)
        torch.manual_seed(b)
        hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=0.6,
                    top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=None)
    p.add_argument("--min-len", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit = static/HF batch size")
    p.add_argument("--eager-subset", type=int, default=None, help="requests the eager baseline runs")
    p.add_argument("--full", action="store_true", help="GPU size: 256 sequences, lengths 100-1024")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="all systems run in this dtype (auto: bf16 where native, else fp32)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    quick = quick_mode()
    size = (256, 100, 1024, 256, 4) if a.full else (16, 16, 64, 16, 2) if quick else (64, 16, 256, 64, 4)
    n, lo, hi, mns, esub = [v if v is not None else d for v, d in
                            zip((a.num_seqs, a.min_len, a.max_len, a.max_num_seqs, a.eager_subset), size)]

    from ..model import load
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(a.dtype, device)
    model, tok = load(None, device=device, dtype=dtype, attention_backend="paged", quiet=True)
    work = make_workload(n, lo, hi)
    out_tokens = sum(k for _, k in work)
    run_engine(model, tok, work[:2], 2)                                    # warm-up
    res = {"workload": {"num_seqs": n, "min_len": lo, "max_len": hi, "max_num_seqs": mns,
                        "output_tokens": out_tokens, "temperature": 0.6, "ignore_eos": True},
           "device": str(device), "dtype": str(model.dtype), "systems": {}}
    rows = res["systems"]
    secs, engine = run_engine(model, tok, work, mns)
    st = engine.stats
    rows["minisys"] = {"seconds": secs, "tok_s": out_tokens / secs, "steps": st.steps,
                       "mean_batch": st.mean_batch_size, "preemptions": st.preemptions,
                       "max_kv_usage": st.max_kv_usage}
    secs, static = run_static(model, tok, work, mns)
    rows["static"] = {"seconds": secs, "tok_s": out_tokens / secs, "steps": static.steps,
                      "padded_tokens": static.padded_tokens}
    if not a.no_hf:
        hf = load_hf(device, model.dtype)
        secs = run_hf(hf, work, mns)
        rows["transformers"] = {"seconds": secs, "tok_s": out_tokens / secs}
        del hf
    sub = work[:esub]
    secs = run_eager(model, tok, sub)
    rows["eager"] = {"seconds": secs, "tok_s": sum(k for _, k in sub) / secs, "requests": len(sub)}
    base = rows["minisys"]["tok_s"]
    for r in rows.values():
        r["minisys_speedup"] = base / r["tok_s"]
    _print(res)
    path = save_result("throughput" + ("_quick" if quick else "_full" if a.full else ""), res, a.out)
    plot(res, str(path.with_suffix(".png")))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(res: dict, path: str) -> None:
    """Bar chart of output tokens/s per system, with minisys's speedup over each (from a result dict)."""
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook

    names = list(res["systems"])
    tok_s = [res["systems"][n]["tok_s"] for n in names]
    w = res["workload"]
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    bars = ax.barh(names[::-1], tok_s[::-1], color="#4c78a8")
    for bar, n in zip(bars, names[::-1]):
        x = res["systems"][n]["minisys_speedup"]
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {bar.get_width():.1f} tok/s" + (f"  (minisys {x:.2f}x)" if n != "minisys" else ""),
                va="center", fontsize=8)
    ax.set_xlabel("output tokens / s")
    ax.set_xlim(0, max(tok_s) * 1.45)
    ax.set_title(f"Offline throughput: {w['num_seqs']} seqs, lengths {w['min_len']}-{w['max_len']}, "
                 f"batch limit {w['max_num_seqs']} ({res['device']}, {res['dtype'].replace('torch.', '')})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    w = res["workload"]
    t = Table(title=f"offline throughput: {w['num_seqs']} seqs, lengths {w['min_len']}-{w['max_len']}, "
                    f"batch limit {w['max_num_seqs']}, {w['output_tokens']} output tokens "
                    f"({res['device']}, {res['dtype'].replace('torch.', '')})")
    for c in ("system", "output tok/s", "seconds", "minisys is x faster", "notes"):
        t.add_column(c, justify="right" if c != "system" else "left")
    for name, r in res["systems"].items():
        notes = {"minisys": f"{r.get('steps')} steps, mean batch {r.get('mean_batch', 0):.1f}, "
                            f"{r.get('preemptions')} preemptions",
                 "static": f"{r.get('padded_tokens')} padded decode rows",
                 "eager": f"first {r.get('requests')} requests"}.get(name, "left-padded batches")
        t.add_row(name, f"{r['tok_s']:.1f}", f"{r['seconds']:.1f}", f"{r['minisys_speedup']:.2f}x", notes)
    Console().print(t)


if __name__ == "__main__":
    raise SystemExit(main())
