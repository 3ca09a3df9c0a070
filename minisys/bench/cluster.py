"""Beyond one engine (lesson 14): a cluster of replicas behind the router, part by part.

    python -m minisys bench cluster --part a            # routing policies (this module)
    python -m minisys bench cluster --part a --quick    # the small size (CI, notebook): a minute or two
    MINISYS_QUICK=1 python -m minisys bench cluster      # same as --quick

(a) **Routing.** 2 replicas of the ordinary server (1 torch thread each, on
    this 2-core machine) behind the router, started once; the same skewed
    workload is replayed under each policy in one run: Poisson arrivals,
    long-tailed output lengths (most answers short, a few very long), and a
    few shared system prompts in front of short user questions. Reported per
    policy: p50/p99 TTFT and E2EL (vLLM's definitions, `metrics.summarize`),
    the prefix-cache hit rate (prompt blocks found cached, from the replicas'
    own ``prefix_hits`` counters, ``GET /minisys/load``, over the full blocks
    of all the prompts sent: the blocks a prefix cache could have served
    at most, minus the last one a request must compute), and how
    many requests each replica got. Each policy's run gets its own system
    prompts (the same lengths, a different first word), so no run finds the
    blocks of an earlier one in a replica's cache. Results:
    ``bench/results/cluster_routing.json`` (``_quick`` for the small size) and a plot.

    python -m minisys bench cluster --part b            # colocated vs disaggregated goodput (`cluster_kv`)
    python -m minisys bench cluster --part c            # p99 latency without and with live migration
    python -m minisys bench cluster --part transfer     # KV bytes per token x the gloo transport's bandwidth

Parts (b), (c) and transfer are `minisys.bench.cluster_kv` (its own command
line, ``python -m minisys.bench.cluster_kv``, has every knob). They drive the
two replicas' endpoints directly, doing what the router does (prefill, then
decode with the returned ``kv_transfer_params``; follow ``minisys_migrated``
to ``/minisys/attach``), so that (c)'s rebalancer can pick which request to
move; `minisys.cluster.router_kv` is the same protocol inside the router.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass

from .common import quick_mode, save_result
from .metrics import summarize
from .serve_workload import WORDS, BenchRequest

POLICY_ORDER = ("round_robin", "least_loaded", "prefix_affinity")
BLOCK_SIZE = 16                     # the replicas' (EngineConfig's default)


@dataclass(frozen=True)
class RoutingSize:
    num_requests: int
    rate: float                     # requests per second (Poisson)
    num_system_prompts: int
    system_words: int               # words of each shared system prompt
    short: tuple[int, int]          # output tokens of most requests
    long: tuple[int, int]           # output tokens of the long tail
    long_fraction: float


def routing_size(quick: bool) -> RoutingSize:
    if quick:
        return RoutingSize(16, 1.5, 2, 120, (8, 24), (96, 160), 0.2)
    return RoutingSize(40, 0.5, 4, 160, (8, 32), (128, 256), 0.15)


def skewed_requests(size: RoutingSize, salt: str, seed: int = 0) -> list[BenchRequest]:
    """The workload: each prompt = one of the shared system prompts (its first word ``salt``) + a short
    question; output lengths from ``short`` except a ``long_fraction`` from ``long``. The same ``seed`` gives
    the same lengths and prompt choices whatever the ``salt``."""
    rng = random.Random(seed)
    systems = [" ".join([salt] + [rng.choice(WORDS) for _ in range(size.system_words)])
               for _ in range(size.num_system_prompts)]
    out = []
    for _ in range(size.num_requests):
        system = systems[rng.randrange(size.num_system_prompts)]
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        span = size.long if rng.random() < size.long_fraction else size.short
        out.append(BenchRequest(f"{system}\n\nQuestion: {question}\nAnswer:", rng.randint(*span)))
    return out


def _prefix_counters(urls: list[str]) -> list[tuple[int, int]]:
    """(prefix_queries, prefix_hits) of each replica."""
    from .sse_client import get_json
    return [(r["prefix_queries"], r["prefix_hits"]) for r in (get_json(u + "/minisys/load") for u in urls)]


async def _serve_router_and_replay(replicas, policy: str, tokenizer, name: str, requests, rate: float, seed: int):
    """Run the router (in this event loop, on a free port) for one policy; replay ``requests`` through it."""
    import uvicorn

    from ..cluster.policies import make_policy
    from ..cluster.router import Router, build_router_app
    from .server_process import free_port
    from .sse_client import ClientConfig, run_workload

    router = Router(replicas, make_policy(policy), tokenizer, name)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_router_app(router), host="127.0.0.1", port=port,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        cfg = ClientConfig(url=f"http://127.0.0.1:{port}", model=name)
        traces, _, duration = await run_workload(cfg, requests, rate, seed=seed)
        routed = [rep["routed"] for rep in router.report()["replicas"]]
    finally:
        server.should_exit = True
        await task
    return traces, duration, routed


def run_routing(model: str | None, size: RoutingSize, seed: int = 0, policies=POLICY_ORDER) -> dict:
    """Part (a): start 2 replicas, replay the workload under each policy, stop them."""
    from ..cli import build_parser
    from ..cluster.replica import ReplicaSet
    from ..model.loader import resolve_model_dir
    from ..model.tokenizer import Tokenizer
    from ..server.launch import model_name

    argv = ["serve"] + (["--model", model] if model else []) + ["--threads", "1"]
    args = build_parser().parse_args(argv)
    tokenizer = Tokenizer.from_dir(resolve_model_dir(model))
    replicas = ReplicaSet(args, 2)
    started = replicas.start(timeout_s=600)
    out: dict = {"size": size.__dict__, "replicas": 2, "threads_per_replica": 1, "policies": {}}
    try:
        for k, policy in enumerate(policies):
            requests = skewed_requests(size, salt=f"policy{k}", seed=seed)
            before = _prefix_counters(replicas.urls)
            traces, duration, routed = asyncio.run(_serve_router_and_replay(
                started, policy, tokenizer, model_name(args), requests, size.rate, seed))
            after = _prefix_counters(replicas.urls)
            hits = sum(a[1] - b[1] for a, b in zip(after, before))
            blocks = sum((len(tokenizer.encode(r.prompt)) - 1) // BLOCK_SIZE for r in requests)
            summary = summarize(traces, duration)
            summary.update(prompt_blocks=blocks, prefix_hits=hits, prefix_hit_rate=hits / blocks if blocks else 0.0,
                           routed=routed,
                           errors=[t.error for t in traces if t.error][:3])
            out["policies"][policy] = summary
            print(f"  {policy}: done in {duration:.0f} s", flush=True)
            time.sleep(1.0)
    finally:
        replicas.stop()
    return out


def print_routing(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="(a) routing: 2 replicas x 1 thread, skewed workload (ms)")
    for c in ("policy", "p50 TTFT", "p99 TTFT", "p50 E2EL", "p99 E2EL", "prefix hit rate", "routed", "failed"):
        t.add_column(c, justify="right")
    for p, r in res["policies"].items():
        t.add_row(p, *(f"{r[k]:.0f}" for k in ("p50_ttft_ms", "p99_ttft_ms", "p50_e2el_ms", "p99_e2el_ms")),
                  f"{r['prefix_hit_rate']:.0%}", "/".join(map(str, r["routed"])), str(r["failed"]))
    Console().print(t)
    rr = res["policies"].get("round_robin")
    if rr:
        for p, r in res["policies"].items():
            if p != "round_robin":
                print(f"  {p} vs round_robin: p99 TTFT x{r['p99_ttft_ms'] / rr['p99_ttft_ms']:.2f}, "
                      f"p99 E2EL x{r['p99_e2el_ms'] / rr['p99_e2el_ms']:.2f}")


def plot_routing(res: dict, path) -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook
    policies = list(res["policies"])
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (key, label) in zip(axes, (("ttft", "TTFT (s)"), ("e2el", "E2EL (s)"))):
        for j, pct in enumerate(("p50", "p99")):
            ax.bar([i + 0.38 * j for i in range(len(policies))],
                   [res["policies"][p][f"{pct}_{key}_ms"] / 1000 for p in policies], width=0.38, label=pct)
        ax.set_xticks([i + 0.19 for i in range(len(policies))], policies, fontsize=8)
        ax.set(ylabel=label, title=label.split()[0])
        ax.legend(fontsize=8)
    axes[2].bar(policies, [res["policies"][p]["prefix_hit_rate"] for p in policies], color="tab:green")
    axes[2].set(ylabel="prefix-cache hit rate", ylim=(0, 1), title="prefix blocks found cached")
    axes[2].tick_params(axis="x", labelsize=8)
    fig.suptitle("2 replicas behind the router, one workload per policy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def part_a(a: argparse.Namespace, quick: bool) -> None:
    size = routing_size(quick)
    if a.rate:
        size = RoutingSize(**{**size.__dict__, "rate": a.rate})
    print(f"(a) routing: {size.num_requests} requests at {size.rate}/s per policy, 2 replicas", flush=True)
    res = run_routing(a.model, size, a.seed)
    print_routing(res)
    path = save_result("cluster_routing" + ("_quick" if quick else ""), res, a.out)
    plot_routing(res, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def _kv_part(name: str):
    """Part (b), (c) or transfer: `minisys.bench.cluster_kv` with this command's ``--quick``/``--model``/``--out``
    (its own defaults otherwise: ``python -m minisys.bench.cluster_kv --help`` has every knob)."""
    key = {"transfer": "transfer", "b": "part_b", "c": "part_c"}[name]

    def run(a: argparse.Namespace, quick: bool) -> None:
        from . import cluster_kv
        ns = cluster_kv.with_defaults(argparse.Namespace(quick=quick, model=a.model, out=a.out))
        fn = {"transfer": cluster_kv.run_transfer, "b": cluster_kv.run_part_b, "c": cluster_kv.run_part_c}[name]
        result = {"quick": quick, "threads_per_replica": 1, key: fn(ns)}
        path = save_result(f"cluster_kv{'_quick' if quick else ''}_{name}", result, a.out)
        if name != "transfer":
            cluster_kv.plot(result, path.with_suffix(".png"))
        print(f"wrote {path}")
    return run


def parts() -> dict:
    """{"a": routing (this module), "b": disaggregation, "c": migration, "transfer": the KV transport}."""
    return {"a": part_a, "b": _kv_part("b"), "c": _kv_part("c"), "transfer": _kv_part("transfer")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", default=None,
                   help="run this part (repeatable; default: every part there is)")
    p.add_argument("--quick", action="store_true", help="the small size (also MINISYS_QUICK=1)")
    p.add_argument("--model", default=None, help="model of the replicas (default: SmolLM2-135M-Instruct)")
    p.add_argument("--rate", type=float, default=None, help="(a): requests per second (default: by size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    available = parts()
    chosen = a.part or sorted(available)
    unknown = [x for x in chosen if x not in available]
    if unknown:
        p.error(f"--part {unknown[0]}: not one of {', '.join(sorted(available))}")
    quick = a.quick or quick_mode()
    for name in chosen:
        available[name](a, quick)
    return 0
