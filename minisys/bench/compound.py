"""python -m minisys bench compound : lesson 16's two benchmarks, side by side in one run each.

    --part a   RAG serving with and without document KV reuse (this module)
    --part b   a map-reduce program: calls issued one by one vs the DAG submitted at once
               (`minisys.bench.compound_programs`)
    --part ab  both (the default); --quick: the small sizes (CI, the lab)

Part (a):

A seeded query stream whose retrieved passages are Zipf-popular (a few
passages come back often, as real retrieval does) is served one query at a
time by three engines over the same model, query by query, side by side:

* ``recompute``        prefix cache off: every prompt prefilled whole;
* ``reuse``            prefix cache on, passages in the canonical order (`minisys.rag.prompt`);
* ``reuse-unordered``  prefix cache on, passages in retrieval order (the same sets, not sorted);
* ``reuse-popular``    prefix cache on, passages sorted by how often earlier queries retrieved them
                       (most first, ties by id): popular passages lead, so they are a shared prefix
                       more often than under the id order, whatever their ids.

Reported per engine: TTFT mean / p50, prompt tokens prefilled (the engine's
counter), output tokens/s, and whether its greedy tokens equal
``recompute``'s (``reuse`` must: same prompts, reused KV). The retrieval is
simulated (passage sets drawn from the Zipf law over course passages) so the
numbers measure serving, not the embedding model. Writes
``bench/results/compound.json``. On a loaded machine the times are noisy;
the prefilled-token counts are exact, and the engines run interleaved so
that load hits all three alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from .common import save_result

QUESTIONS = ["What is this about?", "Why does it matter?", "How is it measured?", "What is the trade-off?",
             "Which lesson explains it?", "What goes wrong without it?"]


@dataclass
class Mode:
    name: str
    prefix_cache: bool
    canonical: bool
    popular_first: bool = False
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


def zipf_stream(num_passages: int, num_queries: int, k: int, s: float, seed: int) -> list[list[int]]:
    """Per query, k distinct passage indices drawn with probability ~ 1 / rank^s (retrieval order)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, num_passages + 1) ** s
    return [list(rng.choice(num_passages, size=k, replace=False, p=w / w.sum())) for _ in range(num_queries)]


def run_one(engine, rid: str, ids: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
    """(TTFT s, latency s, greedy token ids) of one request alone on ``engine``."""
    from ..engine.sampling_params import SamplingParams
    t0 = time.perf_counter()
    engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    ttft, tokens = None, []
    while engine.has_unfinished():
        for out in engine.step():
            if ttft is None and out.outputs and out.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            if out.finished:
                tokens = out.outputs[0].token_ids
    return ttft or 0.0, time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench compound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "ab"], default="ab", help="a: RAG KV reuse; b: map-reduce program")
    p.add_argument("--quick", action="store_true", help="small sizes (also MINISYS_QUICK=1)")
    p.add_argument("--chunks", type=int, default=8, help="(b) chunk summaries before the combine")
    p.add_argument("--map-tokens", type=int, default=None, help="(b) max tokens per summary (default 32; quick 6)")
    p.add_argument("--reduce-tokens", type=int, default=None, help="(b) max tokens of the combine (default 64; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="(b) repetitions per mode (default 3; quick 1)")
    p.add_argument("--queries", type=int, default=None, help="(a) queries in the stream (default 8; quick 4)")
    p.add_argument("--passages", type=int, default=12, help="passages the stream draws from")
    p.add_argument("-k", type=int, default=2, help="passages per query")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of passage popularity")
    p.add_argument("--max-words", type=int, default=40, help="words per passage, at most")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    from .common import quick_mode
    args.quick = args.quick or quick_mode()
    quick = args.quick
    args.queries = args.queries or (4 if quick else 8)
    args.map_tokens = args.map_tokens or (6 if quick else 32)
    args.reduce_tokens = args.reduce_tokens or (8 if quick else 64)
    args.reps = args.reps or (1 if quick else 3)
    import torch

    from ..model import load
    model, tok = load(args.model, device=None, dtype=torch.float32, quiet=True)
    ok = True
    if "a" in args.part:
        ok = part_a(args, model, tok) and ok
    if "b" in args.part:
        ok = part_b(args, model, tok) and ok
    return 0 if ok else 1


def part_b(args, model, tok) -> bool:
    """The map-reduce program, sequential client vs DAG; writes compound_programs[_quick].json."""
    from ..programs.examples import course_chunks
    from .compound_programs import map_reduce_side_by_side
    chunks = course_chunks(args.chunks, max_words=30 if args.quick else 60)
    print(f"part (b): map-reduce over {len(chunks)} chunks ({args.map_tokens} tokens each) + a combine "
          f"({args.reduce_tokens} tokens), {args.reps} repetition(s) per mode", flush=True)
    res = map_reduce_side_by_side(model, tok, chunks, args.map_tokens, args.reduce_tokens, args.reps)
    med = res["latency_median_s"]
    print(f"end-to-end latency (median): sequential client {med['sequential']:.2f} s, DAG at once "
          f"{med['dag']:.2f} s: {res['speedup_dag_vs_sequential']:.2f}x (per repetition: "
          + ", ".join(f"{x:.2f}x" for x in res["speedup_per_rep"]) + f"); same outputs: {res['same_outputs']}")
    for m, h in res["prefix_cache"].items():
        print(f"  {m:10s} prefix cache: {h['hit_tokens']:.0f} of {h['queried_tokens']:.0f} looked-up prompt "
              f"tokens found")
    path = save_result("compound_programs_quick" if args.quick else "compound_programs", {
        "config": vars(args), **res,
        "note": "two servers over one loaded model (uvicorn threads on loopback), modes alternating first; "
                "wall clock on a CPU shared with other jobs (see machine.load_average_1min)",
    }, args.out)
    print(f"wrote {path}")
    return res["same_outputs"]


def part_a(args, model, tok) -> bool:
    """RAG with and without document KV reuse (see the module docstring); writes compound.json."""

    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..rag.cli import REPO_ROOT
    from ..rag.corpus import build_corpus
    from ..rag.prompt import build_rag_prompt

    corpus = build_corpus(REPO_ROOT, max_words=args.max_words)
    rng = np.random.default_rng(args.seed)
    pool = [corpus[i] for i in rng.choice(len(corpus), size=min(args.passages, len(corpus)), replace=False)]
    stream = zipf_stream(len(pool), args.queries, args.k, args.zipf, args.seed)
    modes = [Mode("recompute", False, True), Mode("reuse", True, True), Mode("reuse-unordered", True, False),
             Mode("reuse-popular", True, True, popular_first=True)]
    seen: dict[int, int] = {}                               # passage id -> times retrieved by earlier queries
    engines = {m.name: LLMEngine(model, tok, EngineConfig(num_kv_blocks=512, max_num_seqs=4,
                                                          enable_prefix_caching=m.prefix_cache)) for m in modes}
    for m in modes:                                         # warm-up (first-call costs), not counted
        run_one(engines[m.name], f"{m.name}-warmup", tok.encode("Warm up: count to three."), 2)
        engines[m.name].stats.prefill_tokens = 0
    prompt_tokens = {m.name: 0 for m in modes}
    for q, picks in enumerate(stream):
        question = f"{QUESTIONS[q % len(QUESTIONS)]} (query {q})"
        for m in modes:                                     # interleaved: load hits every engine alike
            key = (lambda p: (-seen.get(p.id, 0), p.id)) if m.popular_first else None
            ids = build_rag_prompt(tok, question, [pool[i] for i in picks], canonical=m.canonical,
                                   order_key=key).token_ids
            prompt_tokens[m.name] += len(ids)
            ttft, lat, out = run_one(engines[m.name], f"{m.name}-{q}", ids, args.max_tokens)
            m.ttft.append(ttft)
            m.latency.append(lat)
            m.outputs.append(out)
        for i in picks:
            seen[pool[i].id] = seen.get(pool[i].id, 0) + 1
        print(f"query {q + 1}/{len(stream)}: passages {sorted(int(pool[i].id) for i in picks)}, TTFT "
              + ", ".join(f"{m.name} {m.ttft[-1] * 1e3:.0f} ms" for m in modes), flush=True)

    base = modes[0]
    rows = {}
    for m in modes:
        st = engines[m.name].stats
        out_tokens = sum(map(len, m.outputs))
        rows[m.name] = {
            "prefix_cache": m.prefix_cache, "canonical_order": m.canonical,
            "ttft_mean_ms": 1e3 * statistics.mean(m.ttft), "ttft_p50_ms": 1e3 * statistics.median(m.ttft),
            "prompt_tokens": prompt_tokens[m.name], "prefilled_tokens": st.prefill_tokens,
            "reused_tokens": prompt_tokens[m.name] - st.prefill_tokens,
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / sum(m.latency),
            "requests_per_s": len(m.latency) / sum(m.latency),
            "same_greedy_tokens_as_recompute": (m.outputs == base.outputs
                                                if m.canonical and not m.popular_first else None),
        }
    for name, r in rows.items():
        print(f"{name:16s} TTFT mean {r['ttft_mean_ms']:7.0f} ms  p50 {r['ttft_p50_ms']:7.0f} ms  prefilled "
              f"{r['prefilled_tokens']:6d}/{r['prompt_tokens']:6d} tokens  {r['output_tokens_per_s']:6.2f} out tok/s"
              + (f"  same tokens as recompute: {r['same_greedy_tokens_as_recompute']}"
                 if r["same_greedy_tokens_as_recompute"] is not None else ""))
    ratio = rows["recompute"]["ttft_mean_ms"] / max(rows["reuse"]["ttft_mean_ms"], 1e-9)
    print(f"TTFT speed-up from document KV reuse (recompute / reuse, mean): {ratio:.2f}x")
    path = save_result("compound_quick" if args.quick else "compound", {
        "config": vars(args), "pool_passage_ids": [int(p.id) for p in pool],
        "stream": [[int(pool[i].id) for i in picks] for picks in stream],
        "modes": rows, "ttft_speedup_reuse_vs_recompute": ratio,
        "note": "one query at a time (concurrency 1), the three engines interleaved query by query; "
                "times are wall clock on a CPU shared with other jobs (see machine.load_average_1min); "
                "prefilled token counts are exact",
    }, args.out)
    print(f"wrote {path}")
    return bool(rows["reuse"]["same_greedy_tokens_as_recompute"])
