"""Scheduling policies side by side (lesson 08): fair share (VTC) and reader QoE (Andes) vs FCFS.

    python -m minisys bench scheduling --threads 1      # CPU size (a few minutes on 2 quiet cores)
    MINISYS_QUICK=1 python -m minisys bench scheduling  # CI / notebook size

Two experiments on the real model, each replayed under several policies:

(a) **Fairness.** Client ``heavy`` sends 4x the requests of client ``light``,
    all queued at the start, so both stay backlogged. Per engine step the
    service each client got (prompt tokens x w_in + decode tokens x w_out,
    measured from what the step ran) gives W_heavy(t) and W_light(t). Under
    FCFS the light client waits behind the heavy one's queue and the gap
    grows with time; under VTC it stays within the paper's bound 2U.
(b) **QoE under a burst.** 3x ``max_num_seqs`` streaming requests arrive at
    once; each reader expects the first token within 1 s and then 5 tokens/s
    (`minisys.scheduling.qoe`). The QoE of each request's delivered-token
    timeline is computed; FCFS serves the burst in waves (the last wave waits
    seconds for its first token), Andes pauses readers who are far ahead and
    starts everyone early.

Every run is a **deterministic replay on a step clock**: virtual time
advances by a fixed cost model per engine step (``--step-s`` + ``--token-s``
x tokens in the step), so the numbers do not depend on the machine's load
and repeat exactly. Experiment (b) is also run once on the **wall clock**
(each step time-stamped as it returns), which is what a user of this machine
would see. Throughput (output tokens per second of the run's clock) is
printed beside each policy: pausing by recompute costs prefill work.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from ..scheduling import QoESpec, fairness_bound, max_service_gap, qoe
from .common import quick_mode, save_result
from .metrics import RequestTrace, summarize


@dataclass
class Job:
    """One request of a replayed workload."""

    arrival: float                 # seconds on the replay's clock
    client: str
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Replay:
    """What one replay observed (times on its clock)."""

    token_times: dict[int, list[float]] = field(default_factory=dict)    # job -> time of each new token
    step_times: list[float] = field(default_factory=list)                # clock after each step
    step_service: list[dict[str, float]] = field(default_factory=list)   # per step, weighted tokens per client
    waiting_clients: list[set[str]] = field(default_factory=list)        # per step, clients with waiting requests
    output_tokens: int = 0
    duration: float = 0.0
    preemptions: int = 0


class StepClock:
    """Virtual time: ``step_s`` + ``token_s`` x tokens per engine step (a CPU-like cost model)."""

    def __init__(self, step_s: float, token_s: float) -> None:
        self.now, self.step_s, self.token_s = 0.0, step_s, token_s

    def __call__(self) -> float:
        return self.now

    def advance(self, tokens: int) -> None:
        self.now += self.step_s + self.token_s * tokens


def replay(model, tok, config, jobs: list[Job], clock: StepClock | None = None) -> Replay:
    """Run ``jobs`` on a fresh `LLMEngine` with ``config``; ``clock`` None means the wall clock."""
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampling_params import RequestOutputKind, SamplingParams
    t0 = time.perf_counter()
    now: Callable[[], float] = clock if clock is not None else (lambda: time.perf_counter() - t0)
    engine = LLMEngine(model, tok, config, clock=now)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].arrival)
    rec, nxt, before = Replay(), 0, {}
    while nxt < len(order) or engine.has_unfinished():
        while nxt < len(order) and jobs[order[nxt]].arrival <= now():
            j = jobs[order[nxt]]
            sp = SamplingParams(temperature=0, max_tokens=j.max_tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
            engine.add_request(str(order[nxt]), j.prompt_ids, sp, client=j.client)
            rec.token_times[order[nxt]] = []
            nxt += 1
        if not engine.has_unfinished():                      # idle until the next arrival
            wait = jobs[order[nxt]].arrival - now()
            if clock is not None:
                clock.now += max(0.0, wait)
            else:
                time.sleep(max(0.0, wait))
            continue
        rec.waiting_clients.append({r.client_key for r in engine.scheduler.waiting})
        fed = engine.stats.batched_tokens
        outs = engine.step()
        if clock is not None:
            clock.advance(engine.stats.batched_tokens - fed)
        t = now()
        for o in outs:
            new = len(o.outputs[0].token_ids)
            rec.token_times[int(o.request_id)] += [t] * new
            rec.output_tokens += new
        totals = engine.stats.service.totals
        rec.step_service.append({c: v - before.get(c, 0.0) for c, v in totals.items()})
        before = dict(totals)
        rec.step_times.append(t)
    rec.duration = now()
    rec.preemptions = engine.stats.preemptions
    return rec


# ------------------------------------------------------------------ the two workloads
def _prompt(tok, i: int) -> list[int]:
    return tok.encode(f"Request {i}: write a few sentences about the number {i}.")


def fairness_jobs(tok, light: int, ratio: int, max_tokens: int) -> list[Job]:
    jobs = [Job(0.0, "heavy", _prompt(tok, i), max_tokens) for i in range(light * ratio)]
    return jobs + [Job(0.0, "light", _prompt(tok, 1000 + i), max_tokens) for i in range(light)]


def burst_jobs(tok, n: int, max_tokens: int) -> list[Job]:
    return [Job(0.0, f"reader{i}", _prompt(tok, i), max_tokens) for i in range(n)]


def per_client_latency(rec: Replay, jobs: list[Job]) -> dict[str, dict]:
    """Lesson 05's TTFT / TPOT / ITL (vLLM's definitions), per client, in ms of the replay's clock."""
    by_client: dict[str, list[RequestTrace]] = {}
    for i, j in enumerate(jobs):
        times = rec.token_times[i]
        chunks = sorted(set(times))                       # one arrival per step that delivered tokens
        by_client.setdefault(j.client, []).append(
            RequestTrace(arrival=j.arrival, token_times=chunks, output_tokens=len(times),
                         prompt_tokens=len(j.prompt_ids)))
    keep = ("p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms")
    return {c: {k: summarize(tr, rec.duration)[k] for k in keep} for c, tr in by_client.items()}


def fairness_summary(rec: Replay, jobs: list[Job], config) -> dict:
    flags = [{"heavy", "light"} <= w for w in rec.waiting_clients]
    longest = max(len(j.prompt_ids) for j in jobs)
    m = config.max_num_seqs * max(len(j.prompt_ids) + j.max_tokens for j in jobs)
    cum, series = {"heavy": 0.0, "light": 0.0}, []
    for s in rec.step_service:
        for c in cum:
            cum[c] += s.get(c, 0.0)
        series.append((cum["heavy"], cum["light"]))
    return {"max_gap_backlogged": max_service_gap(rec.step_service, "heavy", "light", flags),
            "bound_2U": fairness_bound(config.vtc_input_weight, config.vtc_output_weight, longest, m),
            "backlogged_steps": sum(flags), "steps": len(rec.step_service),
            "service_heavy": cum["heavy"], "service_light": cum["light"],
            "throughput": rec.output_tokens / rec.duration, "preemptions": rec.preemptions,
            "latency": per_client_latency(rec, jobs),
            "series": {"t": rec.step_times, "heavy": [a for a, _ in series], "light": [b for _, b in series]}}


def qoe_summary(rec: Replay, jobs: list[Job], spec: QoESpec) -> dict:
    q = sorted(qoe(jobs[i].arrival, rec.token_times[i], spec) for i in range(len(jobs)))
    ttft = [rec.token_times[i][0] - jobs[i].arrival for i in range(len(jobs))]
    return {"mean_qoe": statistics.mean(q), "frac_below_0.9": sum(v < 0.9 for v in q) / len(q),
            "p50_ttft_s": statistics.median(ttft), "max_ttft_s": max(ttft),
            "throughput": rec.output_tokens / rec.duration, "preemptions": rec.preemptions, "qoe": q}


# ------------------------------------------------------------------ main
def defaults(quick: bool) -> dict:
    if quick:
        return dict(max_num_seqs=4, light=6, ratio=4, fair_tokens=8, burst_tokens=24)
    return dict(max_num_seqs=8, light=16, ratio=4, fair_tokens=16, burst_tokens=48)


def run(model, tok, size: dict, step_s: float, token_s: float, wall: bool = True) -> dict:
    """Both experiments; returns the JSON-ready results."""
    from ..engine.config import EngineConfig

    def cfg(policy: str) -> EngineConfig:
        return EngineConfig(max_num_seqs=size["max_num_seqs"], scheduling_policy=policy)

    spec = QoESpec(cfg("andes").andes_ttft_s, cfg("andes").andes_tds)
    fair = fairness_jobs(tok, size["light"], size["ratio"], size["fair_tokens"])
    burst = burst_jobs(tok, 3 * size["max_num_seqs"], size["burst_tokens"])
    out: dict = {"fairness": {}, "qoe_step_clock": {}, "qoe_wall_clock": {}}
    for policy in ("fcfs", "vtc"):
        rec = replay(model, tok, cfg(policy), fair, StepClock(step_s, token_s))
        out["fairness"][policy] = fairness_summary(rec, fair, cfg(policy))
    for policy in ("fcfs", "andes"):
        rec = replay(model, tok, cfg(policy), burst, StepClock(step_s, token_s))
        out["qoe_step_clock"][policy] = qoe_summary(rec, burst, spec)
    if wall:
        for policy in ("fcfs", "andes"):
            rec = replay(model, tok, cfg(policy), burst, None)
            out["qoe_wall_clock"][policy] = qoe_summary(rec, burst, spec)
    return out


def plot(res: dict, path) -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    ax = axes[0]
    for policy, style in (("fcfs", "--"), ("vtc", "-")):
        s = res["fairness"][policy]["series"]
        ax.plot(s["t"], s["heavy"], style, color="tab:red", label=f"{policy}: heavy client")
        ax.plot(s["t"], s["light"], style, color="tab:blue", label=f"{policy}: light client")
    ax.set(xlabel="time (s, step clock)", ylabel="weighted tokens served W(t)",
           title="(a) two backlogged clients, 4:1 load")
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, clock in (("qoe_step_clock", "step clock"), ("qoe_wall_clock", "wall clock")):
        for policy, color in (("fcfs", "tab:red"), ("andes", "tab:green")):
            r = res[key].get(policy)
            if r:
                q = r["qoe"]
                ax.step(q, [(i + 1) / len(q) for i in range(len(q))], where="post", color=color,
                        ls="-" if clock == "step clock" else ":", label=f"{policy} ({clock})")
    ax.axvline(0.9, color="grey", lw=0.8)
    lowest = min((min(r["qoe"]) for key in ("qoe_step_clock", "qoe_wall_clock") for r in res[key].values()),
                 default=0.0)
    ax.set(xlabel="QoE of a request", ylabel="fraction of requests <= x", xlim=(max(0.0, lowest - 0.1), 1.01),
           title="(b) burst of 3x the batch: QoE CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _print(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="(a) fairness: heavy client sends 4x the light one's requests (step clock)")
    for c in ("policy", "max service gap (backlogged)", "bound 2U", "W heavy", "W light", "tok/s"):
        t.add_column(c, justify="right")
    for p, r in res["fairness"].items():
        t.add_row(p, f"{r['max_gap_backlogged']:.0f}", f"{r['bound_2U']:.0f}", f"{r['service_heavy']:.0f}",
                  f"{r['service_light']:.0f}", f"{r['throughput']:.1f}")
    Console().print(t)
    t = Table(title="(a) per client (step clock, ms): TTFT, TPOT, ITL")
    for c in ("policy", "client", "p50 TTFT", "p99 TTFT", "mean TPOT", "p99 ITL"):
        t.add_column(c, justify="right")
    for p, r in res["fairness"].items():
        for client, m in r["latency"].items():
            t.add_row(p, client, *(f"{m[k]:.0f}" for k in ("p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                                             "p99_itl_ms")))
    Console().print(t)
    t = Table(title="(b) QoE under a burst of 3x max_num_seqs (TTFT 1 s, 5 tokens/s expected)")
    for c in ("clock", "policy", "mean QoE", "QoE < 0.9", "p50 TTFT s", "max TTFT s", "tok/s", "preempted"):
        t.add_column(c, justify="right")
    for key in ("qoe_step_clock", "qoe_wall_clock"):
        for p, r in res[key].items():
            t.add_row(key.split("_")[1], p, f"{r['mean_qoe']:.3f}", f"{r['frac_below_0.9']:.0%}",
                      f"{r['p50_ttft_s']:.2f}", f"{r['max_ttft_s']:.2f}", f"{r['throughput']:.1f}",
                      str(r["preemptions"]))
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench scheduling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-s", type=float, default=0.04, help="step clock: seconds per engine step")
    p.add_argument("--token-s", type=float, default=0.0005, help="step clock: seconds per token in a step")
    p.add_argument("--no-wall", action="store_true", help="skip the wall-clock run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    import torch
    from ..model import load
    from .throughput import resolve_dtype
    if a.threads:
        torch.set_num_threads(a.threads)
    quick = quick_mode()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load(None, device=device, dtype=resolve_dtype(a.dtype, device), quiet=True)
    size = defaults(quick)
    res = {"size": size, "step_clock": {"step_s": a.step_s, "token_s": a.token_s}, "device": device,
           "dtype": str(model.dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
           **run(model, tok, size, a.step_s, a.token_s, wall=not a.no_wall)}
    _print(res)
    path = save_result("scheduling" + ("_quick" if quick else ""), res, a.out)
    plot(res, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
