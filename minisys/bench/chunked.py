"""Online latency: chunked prefill under a token budget vs prefill-first (lesson 05).

    python -m minisys bench chunked --threads 1       # CPU size (~4 minutes on 2 quiet cores)
    MINISYS_QUICK=1 python -m minisys bench chunked   # CI / notebook size
    python -m minisys bench chunked --full            # GPU size (longer prompts, higher rate)

Workload (`make_online_workload`, seeded): requests arrive as a Poisson
process at ``--rate`` per second; a fraction ``--long-frac`` are long
prompts (1-1.5k random token ids on CPU) with short answers (a document to
summarize), the rest short chat turns (16-96 prompt tokens, 32-64 output
tokens). Every request is greedy with ``ignore_eos``, so it produces exactly
its output length. The same arrivals are replayed, in wall-clock time, on

* **prefill-first** (``enable_chunked_prefill=False``, lesson 04): a new
  prompt is prefilled whole in one step, and every running decode waits for
  it (the *generation stall*);
* **chunked prefill** (``enable_chunked_prefill=True``) at each budget of
  ``--budgets``: decodes first, the rest of the budget to prompt chunks.

The driver (`run_online`) adds each request when its arrival time has
passed, steps the engine, and time-stamps every step output that carries new
tokens; a request's arrival is its scheduled send time, so queueing counts in
its TTFT. Metrics are vLLM's (`minisys.bench.metrics`): TTFT, TPOT, ITL, E2EL
percentiles, output throughput, goodput at ``--slo-ttft-ms`` /
``--slo-tpot-ms``. The policies run back to back in one process (``--repeats``
rounds, policies alternating within a round, medians reported), so they
share the machine's load. The plot (p99 ITL and p99 TTFT vs budget, with the
prefill-first line) and the JSON go to ``--out``.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

from .common import quick_mode, save_result
from .metrics import SLO, RequestTrace, poisson_arrivals, summarize


@dataclass
class OnlineRequest:
    arrival: float               # seconds after the start
    prompt_ids: list[int]
    max_tokens: int
    kind: str                    # "short" | "long"


@dataclass
class WorkloadSpec:
    num_requests: int = 32
    rate: float = 1.0                           # requests per second
    long_frac: float = 0.25
    short_prompt: tuple[int, int] = (16, 96)
    short_output: tuple[int, int] = (32, 64)
    long_prompt: tuple[int, int] = (1024, 1536)
    long_output: tuple[int, int] = (4, 8)
    seed: int = 0


def make_online_workload(spec: WorkloadSpec, vocab: int = 10000) -> list[OnlineRequest]:
    """Seeded Poisson arrivals, each a short chat turn or (with probability long_frac) a long prompt."""
    rng = random.Random(spec.seed)
    out = []
    for t in poisson_arrivals(spec.num_requests, spec.rate, spec.seed):
        long = rng.random() < spec.long_frac
        (p_lo, p_hi), (o_lo, o_hi) = ((spec.long_prompt, spec.long_output) if long
                                      else (spec.short_prompt, spec.short_output))
        ids = [rng.randrange(vocab) for _ in range(rng.randint(p_lo, p_hi))]
        out.append(OnlineRequest(t, ids, rng.randint(o_lo, o_hi), "long" if long else "short"))
    return out


def engine_config(work: list[OnlineRequest], budget: int | None, max_num_seqs: int = 16, block_size: int = 16):
    """Prefill-first (budget None: every prompt fits one step) or chunked with ``budget`` tokens a step.

    The KV pool holds every request at once, so neither policy preempts.
    """
    from ..engine.config import EngineConfig
    worst = max(len(w.prompt_ids) + w.max_tokens for w in work)
    blocks = sum(-(-(len(w.prompt_ids) + w.max_tokens) // block_size) for w in work) + max_num_seqs
    if budget is None:
        return EngineConfig(block_size=block_size, num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max(2048, worst, max_num_seqs), max_model_len=max(worst, 2048),
                            enable_chunked_prefill=False)
    return EngineConfig(block_size=block_size, num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=budget, max_model_len=max(worst, 2048), enable_chunked_prefill=True)


def run_online(engine, work: list[OnlineRequest], sleep=time.sleep) -> tuple[list[RequestTrace], float]:
    """Replay ``work`` on ``engine`` in wall-clock time; return one trace per request and the duration (s).

    Before each step every request whose arrival time has passed is added;
    when nothing is running the driver sleeps until the next arrival. A step
    output that carries new tokens of a request is one arrival of output
    (one ITL gap), time-stamped when the step returns.
    """
    from ..engine.sampling_params import SamplingParams
    traces = [RequestTrace(arrival=w.arrival, prompt_tokens=len(w.prompt_ids)) for w in work]
    nxt, t0 = 0, time.perf_counter()
    while nxt < len(work) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < len(work) and work[nxt].arrival <= now:
            sp = SamplingParams(temperature=0, max_tokens=work[nxt].max_tokens, ignore_eos=True)
            engine.add_request(str(nxt), work[nxt].prompt_ids, sp)
            nxt += 1
        if not engine.has_unfinished():
            sleep(max(0.0, work[nxt].arrival - now))
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        for o in outs:
            tr, n = traces[int(o.request_id)], len(o.outputs[0].token_ids)
            if n > tr.output_tokens:
                tr.token_times.append(t)
                tr.output_tokens = n
    return traces, time.perf_counter() - t0


def run_policy(model, tok, work, budget: int | None, slo: SLO, max_num_seqs: int) -> dict:
    """One replay of the workload under one policy: vLLM's metrics plus the engine's step counters."""
    from ..engine.llm_engine import LLMEngine
    engine = LLMEngine(model, tok, engine_config(work, budget, max_num_seqs))
    step_tokens: list[int] = []
    inner = engine.scheduler.schedule

    def counted():
        out = inner()
        step_tokens.append(out.num_tokens)
        return out
    engine.scheduler.schedule = counted
    traces, duration = run_online(engine, work)
    res = summarize(traces, duration, slo)
    res.update(steps=engine.stats.steps, max_step_tokens=max(step_tokens), preemptions=engine.stats.preemptions,
               budget=engine.config.max_num_batched_tokens)
    return res


def median_runs(runs: list[dict]) -> dict:
    """Per-key median of numeric results over repeated runs (the first run's other fields)."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["runs"] = len(runs)
    return out


def sweep(model, tok, work, budgets: list[int], slo: SLO, max_num_seqs: int = 16, repeats: int = 1,
          log=print) -> dict[str, dict]:
    """{"prefill-first": ..., "chunked-<b>": ...}: the policies alternate inside each round."""
    names = ["prefill-first"] + [f"chunked-{b}" for b in budgets]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(repeats):
        for name, budget in zip(names, [None] + list(budgets)):
            r = run_policy(model, tok, work, budget, slo, max_num_seqs)
            runs[name].append(r)
            log(f"round {rep + 1}/{repeats} {name:>14}: p99 ITL {r['p99_itl_ms']:7.0f} ms, p99 TTFT "
                f"{r['p99_ttft_ms']:7.0f} ms, {r['output_throughput']:6.1f} out tok/s, {r['duration_s']:.0f} s")
    return {n: median_runs(rs) for n, rs in runs.items()}


def compare(results: dict[str, dict]) -> dict[str, dict]:
    """Per chunked policy: p99 ITL x lower and output throughput ratio vs prefill-first."""
    base = results["prefill-first"]
    return {n: {"p99_itl_x_lower": base["p99_itl_ms"] / r["p99_itl_ms"],
                "p99_ttft_ratio": r["p99_ttft_ms"] / base["p99_ttft_ms"],
                "throughput_ratio": r["output_throughput"] / base["output_throughput"]}
            for n, r in results.items() if n != "prefill-first"}


def plot(results: dict[str, dict], path, title: str = "") -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook
    base = results["prefill-first"]
    chunked = sorted((r["budget"], r) for n, r in results.items() if n != "prefill-first")
    xs = [b for b, _ in chunked]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "p99_itl_ms", "p99 inter-token latency (ms)"),
                           (axes[1], "p99_ttft_ms", "p99 time to first token (ms)")):
        ax.plot(xs, [r[key] for _, r in chunked], "o-", label="chunked prefill")
        ax.axhline(base[key], color="tab:red", ls="--", label="prefill-first")
        ax.set(xscale="log", xlabel="token budget per step (max_num_batched_tokens)", ylabel=label)
        ax.minorticks_off()
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench chunked", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests/s")
    p.add_argument("--long-frac", type=float, default=None, help="fraction of long prompts")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="chunked-prefill token budgets")
    p.add_argument("--headline-budget", type=int, default=None, help="the budget the targets are checked on")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="GPU size: 4-8k-token long prompts, higher rate")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 keeps step times stable on a machine shared with other jobs)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    quick = quick_mode()
    spec, budgets, headline, repeats, slo = defaults(quick, a.full)
    spec.num_requests = a.num_requests or spec.num_requests
    spec.rate = a.rate or spec.rate
    spec.long_frac = a.long_frac if a.long_frac is not None else spec.long_frac
    spec.seed = a.seed
    budgets = a.budgets or budgets
    headline = a.headline_budget or (headline if headline in budgets else budgets[0])
    slo = SLO(ttft_ms=a.slo_ttft_ms or slo.ttft_ms, tpot_ms=a.slo_tpot_ms or slo.tpot_ms)

    import torch
    from ..model import load
    from .throughput import resolve_dtype
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load(None, device=device, dtype=resolve_dtype(a.dtype, device), attention_backend="paged", quiet=True)
    work = make_online_workload(spec)
    warm = make_online_workload(WorkloadSpec(num_requests=3, rate=float("inf"), long_frac=0.5, seed=99,
                                             long_prompt=(256, 300)))
    for b in (None, budgets[0]):                                                   # warm-up
        run_online(_engine(model, tok, warm, b, a.max_num_seqs), warm)
    results = sweep(model, tok, work, budgets, slo, a.max_num_seqs, a.repeats or repeats)
    ratios = compare(results)
    res = {"workload": {**spec.__dict__, "long_requests": sum(w.kind == "long" for w in work),
                        "output_tokens": sum(w.max_tokens for w in work)},
           "device": str(device), "dtype": str(model.dtype).replace("torch.", ""), "budgets": budgets,
           "headline_budget": headline, "max_num_seqs": a.max_num_seqs, "torch_threads": torch.get_num_threads(), "repeats": a.repeats or repeats,
           "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}, "results": results, "vs_prefill_first": ratios}
    _print(res)
    name = "chunked" + ("_quick" if quick else "_full" if a.full else "")
    path = save_result(name, res, a.out)
    plot(results, path.with_suffix(".png"), f"{spec.num_requests} requests at {spec.rate}/s, "
                                            f"{spec.long_frac:.0%} long ({res['device']}, {res['dtype']})")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def defaults(quick: bool, full: bool = False):
    """(WorkloadSpec, budgets, headline budget, repeats, SLO) for the CPU, quick and GPU sizes (lab 05 uses these)."""
    if full:
        return (WorkloadSpec(num_requests=200, rate=4.0, long_frac=0.2, long_prompt=(4096, 8192),
                             short_output=(64, 256)), [256, 512, 1024, 2048, 4096], 512, 3,
                SLO(ttft_ms=2000, tpot_ms=50))
    if quick:
        return (WorkloadSpec(num_requests=6, rate=0.5, long_frac=0.3, long_prompt=(384, 512),
                             short_output=(8, 16)), [64, 256], 64, 1, SLO(ttft_ms=10000, tpot_ms=1000))
    return WorkloadSpec(), [128, 256, 512], 256, 1, SLO(ttft_ms=10000, tpot_ms=1000)


def _engine(model, tok, work, budget, max_num_seqs):
    """A fresh LLMEngine for `work` under one policy."""
    from ..engine.llm_engine import LLMEngine
    return LLMEngine(model, tok, engine_config(work, budget, max_num_seqs))


def _print(res) -> None:
    from rich.console import Console
    from rich.table import Table
    w = res["workload"]
    t = Table(title=f"online latency: {w['num_requests']} requests, Poisson {w['rate']}/s, "
                    f"{w['long_requests']} long ({w['long_prompt'][0]}-{w['long_prompt'][1]} tokens), "
                    f"max_num_seqs {res['max_num_seqs']} ({res['device']}, {res['dtype']})")
    cols = ("policy", "p50 ITL ms", "p99 ITL ms", "p50 TTFT ms", "p99 TTFT ms", "p99 TPOT ms", "p99 E2EL s",
            "out tok/s", "goodput req/s", "steps", "max step tokens", "p99 ITL x lower", "throughput vs base")
    for c in cols:
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, r in res["results"].items():
        cmp = res["vs_prefill_first"].get(name)
        t.add_row(name, f"{r['p50_itl_ms']:.0f}", f"{r['p99_itl_ms']:.0f}", f"{r['p50_ttft_ms']:.0f}",
                  f"{r['p99_ttft_ms']:.0f}", f"{r['p99_tpot_ms']:.0f}", f"{r['p99_e2el_ms'] / 1000:.1f}",
                  f"{r['output_throughput']:.1f}", f"{r['goodput']:.2f}", str(r["steps"]),
                  str(r["max_step_tokens"]),
                  f"{cmp['p99_itl_x_lower']:.2f}x" if cmp else "1.00x",
                  f"{cmp['throughput_ratio']:.1%}" if cmp else "100%")
    Console(width=max(Console().width, 170)).print(t)
    h = res["vs_prefill_first"].get(f"chunked-{res['headline_budget']}")
    if h:
        ok = h["p99_itl_x_lower"] >= 3 and abs(h["throughput_ratio"] - 1) <= 0.10
        print(f"budget {res['headline_budget']}: p99 ITL {h['p99_itl_x_lower']:.2f}x lower than prefill-first, "
              f"output throughput {h['throughput_ratio']:.1%} of it -> target (>= 3x, within 10%) "
              f"{'MET' if ok else 'NOT met'}; SLO for goodput: TTFT <= {res['slo']['ttft_ms']:.0f} ms, "
              f"TPOT <= {res['slo']['tpot_ms']:.0f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
