"""Batch-1 latency: one user, one stream. TTFT and decode ms/token against the memory-bandwidth limit.

    python -m minisys bench latency                      # threads = physical cores; llama.cpp if installed
    python -m minisys bench latency --threads 1 --repeats 5
    MINISYS_QUICK=1 python -m minisys bench latency      # CI / notebook size

One request, greedy, ``ignore_eos``: a prompt of ``--prompt-len`` tokens, then ``--new-tokens``
tokens. Each system runs it ``--repeats`` times, the systems interleaved round by round so that
a noisy neighbour slows them alike; ms/token is the median decode step of each run, then the
median of the runs. Side by side, in one process, on the same fp32 weights:

* ``eager (plain)``: the eager loop (`EagerGenerator`) on the model as the checkpoint names it:
  separate q/k/v and gate/up matmuls (``load(..., fuse=False)``);
* ``eager (modular)``: the same loop on the model as the engine loads it (fused projections,
  input-major weights), each step through the modules (``model.flat_decode = False``);
* ``eager``: the same, each step through the flat batch-1 loop (`minisys.model.flat_decode`);
* ``engine``: `LLMEngine` with one request (scheduler, paged KV cache, detokenizer: what ``make serve`` runs);
* ``llama.cpp``: llama-cpp-python on an F32 GGUF of the same weights (`minisys.bench.llama_cpp`),
  same thread count; skipped, with the install command, when it is not installed.

A decode step must stream every weight once (the LM head, tied to the embedding, included), so
``weight bytes / step time`` is the bandwidth the step achieved; it is printed beside this
machine's measured bandwidth (`memory_bandwidth`: a read-only pass and a copy over 256 MiB
buffers, far larger than the caches). Last, torch.profiler's table of one eager decode step
(`profile_step`): self CPU time per op, summed into matmuls, attention, norms/RoPE/activations,
KV-cache writes, sampling, and the rest of the wall time (Python, dispatch, allocation). The
batch-1 matmuls run on numpy's BLAS, which the profiler cannot see: they are labelled for it.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch

from .common import quick_mode, save_result

MiB = 1 << 20


@dataclass
class Run:
    """One system's timings over the repeats: per run, TTFT and the median decode step (seconds)."""

    ttft_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)      # the last run's greedy tokens

    def summary(self) -> dict:
        return {"ttft_ms": 1e3 * statistics.median(self.ttft_s), "ms_per_token": 1e3 * statistics.median(self.step_s),
                "runs_ms_per_token": [round(1e3 * s, 2) for s in self.step_s]}


# ----------------------------------------------------------------------------- the machine's limit
def memory_bandwidth(mib: int = 256, repeats: int = 5) -> dict:
    """GB/s of a read-only pass (``sum``) and of a copy (bytes read + written) over ``mib`` MiB, median."""
    a = torch.ones(mib * MiB // 4)
    b = torch.empty_like(a)
    b.copy_(a)                                           # touch every page first

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    nbytes = a.numel() * 4
    return {"read_GBps": nbytes / best(a.sum) / 1e9, "copy_GBps": 2 * nbytes / best(lambda: b.copy_(a)) / 1e9,
            "buffer_MiB": mib}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (shared ones once); an untied
    embedding only contributes the one row it looks up, so it is left out."""
    seen, total = set(), 0
    emb = model.model.embed_tokens.weight
    for p in model.parameters():
        if p.data_ptr() in seen or (p is emb and not model.config.tie_word_embeddings):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


# ----------------------------------------------------------------------------- the systems
def greedy(n: int):
    from ..engine.sampling_params import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def run_eager(model, tok, prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
    """(TTFT, decode step times, tokens) of the eager loop: each token's time from the previous one's."""
    from ..engine.eager import EagerGenerator
    gen = EagerGenerator(model, tok)
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for ev in gen.stream(prompt, greedy(n)):
        stamps.append(time.perf_counter())
        tokens.append(ev.token_id)
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], tokens


def run_engine(model, tok, prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
    """The same on `LLMEngine` with one request (a fresh engine: its KV pool sized for it)."""
    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    blocks = -(-(len(prompt) + n) // 16) + 1
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=blocks, max_num_seqs=1))
    stamps, tokens = [], []
    t0 = time.perf_counter()
    engine.add_request("0", prompt, greedy(n))
    while engine.has_unfinished():
        for o in engine.step():
            if len(o.outputs[0].token_ids) > len(tokens):
                stamps.append(time.perf_counter())
                tokens = list(o.outputs[0].token_ids)
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], tokens


def without_flat_decode(model, fn):
    """``fn()`` with ``model``'s batch-1 flat decode loop off: every step through the modules."""
    was, model.flat_decode = model.flat_decode, False
    try:
        return fn()
    finally:
        model.flat_decode = was


# ----------------------------------------------------------------------------- the profile
GEMV = "numpy sgemv (batch-1 linear)"       # torch.profiler's label for `minisys.parallel.linear.blas_gemv`
CATEGORIES = {        # op name -> what it is in a decode step (self CPU time)
    "matmuls (linear layers, LM head)": ("aten::mm", "aten::addmm", GEMV),
    "attention": ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_attention_math", "aten::index_select", "aten::baddbmm"),
    "KV cache writes, copies": ("aten::index_put_", "aten::_index_put_impl_", "aten::copy_"),
    "norms, RoPE, SiLU, residuals": ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt",
                                     "aten::cat", "aten::neg", "aten::silu", "aten::index", "aten::_fused_rms_norm",
                                     "aten::embedding", "aten::sub", "aten::div"),
}


def profile_step(model, tok, prompt: list[int], steps: int = 3) -> dict:
    """torch.profiler over ``steps`` eager decode steps (forward + sampler, as the eager loop runs them).

    Returns per-step ms by category, the top ops, and the step's wall time; "other" is the wall
    time no op accounts for (Python, dispatch, allocation) plus ops in no category.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..engine.eager import next_token_logits
    from ..kv.contiguous import ContiguousKVCache
    from ..sampling import sample_next_token
    params = greedy(1)
    cache = ContiguousKVCache(model.config, len(prompt) + steps + 2, 1, model.dtype, model.device)
    seq = list(prompt)
    seq.append(int(sample_next_token(next_token_logits(model, seq, seq, cache), params)[0]))
    next_token_logits(model, seq, seq[-1:], cache)         # warm the decode path (its first call allocates)
    seq.append(0)
    from ..parallel import linear as lin

    def labelled_gemv(x, w):                              # numpy's matmul is invisible to the profiler: label it
        with record_function(GEMV):
            return lin.blas_gemv(x, w)
    patch = hasattr(lin, "_gemv")
    if patch:
        lin._gemv = labelled_gemv
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                logits = next_token_logits(model, seq, seq[-1:], cache)
                with record_function("sampler"):
                    seq.append(int(sample_next_token(logits, params)[0]))
            wall = (time.perf_counter() - t) / steps
    finally:
        if patch:
            lin._gemv = lin.blas_gemv
    sampler_ms = sum(e.cpu_time_total for e in prof.events() if e.name == "sampler") / 1e3 / steps
    ops = {}
    for e in prof.key_averages():
        if (e.key.startswith("aten::") or e.key == GEMV) and e.self_cpu_time_total > 0:
            ops[e.key] = (e.self_cpu_time_total / 1e3 / steps, e.count // steps)
    cats = {name: 0.0 for name in CATEGORIES}
    for op, (ms, _) in ops.items():
        for name, names in CATEGORIES.items():
            if op in names:
                cats[name] += ms
    cats["sampling (argmax / top-p)"] = sampler_ms
    cats["other: Python, dispatch, allocation, small ops"] = max(0.0, 1e3 * wall - sum(cats.values()))
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]
    return {"step_ms": 1e3 * wall, "categories_ms": cats,
            "top_ops": [{"op": k, "ms_per_step": ms, "calls_per_step": n} for k, (ms, n) in top]}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: physical cores)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 64; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 64; quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="runs per system, interleaved (default 3; quick 2)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    p.add_argument("--no-plain", action="store_true", help="skip the unfused model")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    quick = quick_mode()
    prompt_len = a.prompt_len or (16 if quick else 64)
    n = a.new_tokens or (16 if quick else 64)
    repeats = a.repeats or (2 if quick else 3)

    from ..model import load
    from ..threads import configure_threads, physical_cores
    threads = configure_threads(a.threads)
    model, tok = load(None, device="cpu", dtype=torch.float32, quiet=True)
    plain = None if a.no_plain else load(None, device="cpu", dtype=torch.float32, quiet=True, fuse=False,
                                         input_major=False)[0]
    prompt = (tok.encode("Once upon a time, in a small village by the sea, there lived") * prompt_len)[:prompt_len]
    systems = {}
    if plain is not None:
        systems["eager (plain: unfused)"] = lambda: run_eager(plain, tok, prompt, n)
    if model.flat_decode:
        systems["eager (modular)"] = lambda: without_flat_decode(model, lambda: run_eager(model, tok, prompt, n))
    systems["eager"] = lambda: run_eager(model, tok, prompt, n)
    systems["engine"] = lambda: run_engine(model, tok, prompt, n)
    llama_note = None
    if not a.no_llama_cpp:
        from .llama_cpp import INSTALL, decode_llama_cpp, f32_gguf, llama_cpp_version, load_llama_cpp
        if llama_cpp_version() is None:
            llama_note = f"llama.cpp: llama-cpp-python is not installed (an optional benchmark dependency): {INSTALL}"
        else:
            lcpp = load_llama_cpp(f32_gguf(), threads, prompt_len + n + 8)

            def run_lcpp():
                r = decode_llama_cpp(lcpp, prompt, n)
                return r["ttft_s"], r["step_s"], r["tokens"]
            systems["llama.cpp (f32 GGUF)"] = run_lcpp
    runs = {name: Run() for name in systems}
    for name, fn in systems.items():                     # warm-up: first calls allocate and compile
        fn()
    for _ in range(repeats):
        for name, fn in systems.items():
            ttft, steps, tokens = fn()
            runs[name].ttft_s.append(ttft)
            runs[name].step_s.append(statistics.median(steps))
            runs[name].tokens = tokens
    bw = memory_bandwidth()
    wbytes = weight_bytes_per_token(model)
    res = {"prompt_len": prompt_len, "new_tokens": n, "repeats": repeats, "threads": threads,
           "physical_cores": physical_cores(), "dtype": "float32", "weight_bytes_per_token": wbytes,
           "memory_bandwidth": bw, "systems": {}}
    for name, run in runs.items():
        s = run.summary()
        s["achieved_GBps"] = wbytes / (s["ms_per_token"] / 1e3) / 1e9
        s["fraction_of_read_bandwidth"] = s["achieved_GBps"] / bw["read_GBps"]
        res["systems"][name] = s
    ref = runs.get("eager")
    for name, run in runs.items():                       # greedy tokens agree with the eager loop's?
        res["systems"][name]["same_tokens_as_eager"] = run.tokens == ref.tokens
    if llama_note:
        res["llama_cpp"] = llama_note
    res["profile"] = profile_step(model, tok, prompt)
    _print(res)
    path = save_result("latency" + ("_quick" if quick else ""), res, a.out)
    print(f"wrote {path}")
    return 0


def _print(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    bw = res["memory_bandwidth"]
    con = Console(width=120)
    t = Table(title=f"batch-1 greedy decode, fp32, {res['threads']} thread(s): prompt {res['prompt_len']}, "
                    f"{res['new_tokens']} new tokens, median of {res['repeats']} interleaved runs")
    for c in ("system", "TTFT ms", "decode ms/token", "x llama.cpp", "weights GB/s", "of read limit", "runs"):
        t.add_column(c, justify="left" if c == "system" else "right")
    lcpp = res["systems"].get("llama.cpp (f32 GGUF)")
    for name, s in res["systems"].items():
        x = f"{s['ms_per_token'] / lcpp['ms_per_token']:.2f}x" if lcpp else "-"
        t.add_row(name, f"{s['ttft_ms']:.1f}", f"{s['ms_per_token']:.1f}", x, f"{s['achieved_GBps']:.1f}",
                  f"{100 * s['fraction_of_read_bandwidth']:.0f}%", " ".join(map(str, s["runs_ms_per_token"])))
    con.print(t)
    con.print(f"weights read per token: {res['weight_bytes_per_token'] / 1e6:.0f} MB; memory bandwidth on this "
              f"machine: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s (read + write, "
              f"{bw['buffer_MiB']} MiB buffers, {res['threads']} thread(s))")
    if "llama_cpp" in res:
        con.print(res["llama_cpp"])
    prof = res["profile"]
    t = Table(title=f"one eager decode step, torch.profiler: {prof['step_ms']:.1f} ms wall")
    for c in ("where the time goes", "ms / step", "share"):
        t.add_column(c, justify="left" if c.startswith("where") else "right")
    for name, ms in sorted(prof["categories_ms"].items(), key=lambda kv: -kv[1]):
        t.add_row(name, f"{ms:.2f}", f"{100 * ms / prof['step_ms']:.0f}%")
    con.print(t)
    t = Table(title="top ops by self CPU time")
    for c in ("op", "ms / step", "calls / step"):
        t.add_column(c, justify="left" if c == "op" else "right")
    for r in prof["top_ops"]:
        t.add_row(r["op"], f"{r['ms_per_step']:.2f}", str(r["calls_per_step"]))
    con.print(t)


if __name__ == "__main__":
    raise SystemExit(main())
