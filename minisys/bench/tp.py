"""Tensor parallelism on this CPU: decode step time at TP=1 and TP=2, and the all-reduce share (lesson 13).

    python -m minisys bench tp                 # quick size (default): batch 8, 16 decode steps, 2 rounds
    python -m minisys bench tp --full          # batch 32, 32 decode steps, 3 rounds

Three setups on the same model, decoding the same batch (greedy, ``ignore_eos``):

* **TP=1, 1 thread**: one process, ``torch.set_num_threads(1)``;
* **TP=1, 2 threads**: one process using both cores the way torch does (intra-op threads);
* **TP=2, 1 thread per rank**: this process (rank 0) and one worker, each one thread, so it uses the
  same 2 cores as the line above: the honest comparison is TP=2 vs TP=1 with 2 threads.

A decode step is one `LLMEngine.step` in which every sequence feeds one token (the prefill steps are not
timed). Reported per setup: median step time, tokens/s (batch / step time), and for TP=2 the share of
the step that rank 0 spends inside ``all_reduce`` (`minisys.parallel.comm.ALL_REDUCE_TIMER`): the
communication itself plus the wait for the slower rank (SmolLM2's 9 heads split 6 + 3, so rank 0 has
more attention work). The setups alternate within each round (``--repeats`` rounds) so they share
the machine's load; medians over rounds are reported, and the ratios come from the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import quick_mode, save_result


def decode_step_times(engine, batch: int, prompt_len: int, steps: int, seed: int) -> tuple[list[float], list[float]]:
    """Add ``batch`` requests, run them to the end; (seconds per decode-only step, all-reduce seconds in it)."""
    from ..engine.sampling_params import SamplingParams
    from ..parallel.comm import ALL_REDUCE_TIMER
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    sp = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"tp-{seed}-{i}", ids, sp)
    times, reduces = [], []
    while engine.has_unfinished():
        decoding = (not engine.scheduler.waiting and len(engine.scheduler.running) == batch
                    and all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running))
        ALL_REDUCE_TIMER.reset()
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if decoding:
            times.append(dt)
            reduces.append(ALL_REDUCE_TIMER.seconds)
    return times, reduces


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench tp", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--full", action="store_true", help="larger batch, more steps and rounds")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="decode steps per round")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    full = args.full and not quick_mode()
    batch = args.batch or (32 if full else 8)
    steps = args.steps or (32 if full else 16)
    repeats = args.repeats or (3 if full else 2)

    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..model.loader import load
    cfg = EngineConfig(max_num_seqs=batch, num_kv_blocks=batch * 8, block_size=16)
    torch.set_num_threads(1)                       # the TP=2 worker takes this process's thread count
    model, tok = load(args.model, "cpu", torch.float32, quiet=True)
    shard, _ = load(args.model, "cpu", torch.float32, quiet=True, tp_size=2)
    one = LLMEngine(model, tok, cfg)
    two = LLMEngine(shard, tok, EngineConfig(**{**cfg.__dict__, "tensor_parallel_size": 2}))
    setups = {"tp1_1thread": (one, 1), "tp1_2threads": (one, 2), "tp2_1thread_per_rank": (two, 1)}
    per_round: dict[str, list[dict]] = {k: [] for k in setups}
    try:
        for r in range(repeats):
            for name, (engine, threads) in setups.items():
                torch.set_num_threads(threads)
                times, reduces = decode_step_times(engine, batch, 32, steps, seed=r)
                per_round[name].append({"step_s": statistics.median(times),
                                        "all_reduce_share": sum(reduces) / sum(times)})
    finally:
        two.shutdown()
    rows = {}
    for name, rounds in per_round.items():
        step = statistics.median(x["step_s"] for x in rounds)
        rows[name] = {"decode_step_ms": round(step * 1e3, 2), "tokens_per_s": round(batch / step, 1),
                      "all_reduce_share": round(statistics.median(x["all_reduce_share"] for x in rounds), 3)}
    tp2 = rows["tp2_1thread_per_rank"]["tokens_per_s"]
    ratios = {"tp2_over_tp1_1thread": round(tp2 / rows["tp1_1thread"]["tokens_per_s"], 3),
              "tp2_over_tp1_2threads": round(tp2 / rows["tp1_2threads"]["tokens_per_s"], 3)}
    print(f"decode, batch {batch}, {steps} steps x {repeats} rounds, {model.config.num_layers} layers "
          f"(2 all-reduces per layer + 1 for the embedding per step)")
    print(f"{'setup':<24}{'step ms':>10}{'tokens/s':>10}{'all-reduce share':>18}")
    for name, row in rows.items():
        share = f"{row['all_reduce_share']:.1%}" if name.startswith("tp2") else "-"
        print(f"{name:<24}{row['decode_step_ms']:>10.2f}{row['tokens_per_s']:>10.1f}{share:>18}")
    print(f"TP=2 / TP=1 (1 thread) tokens/s: {ratios['tp2_over_tp1_1thread']:.2f}x; "
          f"TP=2 / TP=1 (2 threads): {ratios['tp2_over_tp1_2threads']:.2f}x")
    path = save_result("tp", {"batch": batch, "decode_steps": steps, "repeats": repeats, "setups": rows,
                              "ratios": ratios, "per_round": per_round}, args.out)
    print(f"wrote {path}")
    return 0
