"""Speculative decoding: plain decoding vs n-gram prompt lookup vs a draft model, side by side.

    python -m minisys bench spec                   # CPU size
    MINISYS_QUICK=1 python -m minisys bench spec   # CI / notebook size

Two workloads of chat-templated prompts for SmolLM2-135M-Instruct, greedy:

* **grounded** — "correct the spelling in this text and write it out in full":
  the answer mostly copies the input, the case where n-gram drafts shine;
* **chat** — open questions: the answer is new text, drafts must be guessed.

Each runs at **batch 1** (one request at a time) and **under load** (all
requests at once, ``--max-num-seqs``), for plain decoding, ``ngram`` (k =
``--k-ngram``, n-grams of 4 down to ``--ngram-min`` tokens) and ``draft`` (self-draft: the target's first ``--draft-layers``
layers, k = ``--k-draft``). Runs are interleaved and repeated (``--repeats``,
median) so a busy machine hurts every method alike; greedy outputs must be
identical across methods (checked and printed).

Reported per method: alpha = accepted / proposed; tokens per verification
(measured, and expected ``(1 - alpha^(k+1)) / (1 - alpha)`` at the mean k);
c = draft time per decode step per draft position / plain decode step time;
v = target time of a speculative decode step / plain decode step time (the
verification is not quite free on a CPU); predicted speedup ``E / (k c + 1)``
(Leviathan et al.), the refined ``E / (k c + v)``, and the measured speedup =
plain time / method time, end to end (prefills included) and over the decode
steps only (steps with no prefill in them).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .common import quick_mode, save_result

TEXTS = [
    "The Industrial Revolution began in Britain in the late eigteenth century. It transformed how goods were made, "
    "moving production from small workshops into large factorys powered by steam engines. Cities grew quickly as "
    "people left farms to find work, and new railways carried coal, iron and cotton accross the country.",
    "The water cycle describes how water moves around the Earth. The sun heats the oceans, and water evaporates into "
    "the air. As the vapour rises it cools and forms clouds. Eventualy the water falls back as rain or snow, and "
    "rivers carry it back to the sea.",
    "Chess is a board game for two players. Each player starts with sixteen peices: one king, one queen, two rooks, "
    "two knights, two bishops and eight pawns. The goal is to checkmate the opponents king, so that it is under "
    "attack and cannot escape.",
    "The Moon is Earths only natural satelite. It is about one quarter the size of Earth and takes around twenty "
    "seven days to orbit our planet. Its gravity causes the tides in the oceans, and its surface is covered with "
    "craters left by ancient impacts.",
]
CHAT = ["Write a short story about a dragon who learns to cook.", "What are three tips for staying focused while studying?",
        "Explain why the sky is blue to a ten year old.", "Describe your ideal weekend in a few sentences."]


def prompts(tok, kind: str, n: int) -> list[list[int]]:
    if kind == "grounded":
        msgs = [f"Correct the spelling mistakes in the following text and write the corrected text out in full.\n\n{t}"
                for t in TEXTS]
    else:
        msgs = list(CHAT)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}])) for m in (msgs * n)[:n]]


def run(model, tok, ids: list[list[int]], spec: dict, max_num_seqs: int, max_tokens: int) -> dict:
    """Serve ``ids`` (one at a time when max_num_seqs == 1, else all at once); seconds, steps, outputs, spec stats."""
    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampling_params import SamplingParams
    blocks = sum(-(-(len(p) + max_tokens + 16) // 16) for p in ids) + 4
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
                                                enable_chunked_prefill=False, **spec))   # as lesson 06 measured
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    outputs = {}
    waves = [[i] for i in range(len(ids))] if max_num_seqs == 1 else [list(range(len(ids)))]
    st = engine.stats
    dec_seconds, dec_steps = 0.0, 0                     # steps without any prefill: pure decode/verify
    t0 = time.perf_counter()
    for wave in waves:
        for i in wave:
            engine.add_request(str(i), ids[i], sp)
        while engine.has_unfinished():
            before, t = st.prefill_tokens, time.perf_counter()
            for o in engine.step():
                if o.finished:
                    outputs[int(o.request_id)] = o.outputs[0].token_ids
            if st.prefill_tokens == before:
                dec_seconds += time.perf_counter() - t
                dec_steps += 1
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": st.steps, "tokens": st.generated_tokens, "outputs": outputs,
            "decode_seconds": dec_seconds, "decode_steps": dec_steps, "spec": st.spec.summary()}


def analyse(plain: dict, res: dict) -> dict:
    """alpha, tokens per verification (measured/expected), c, v, predicted and measured speedup."""
    from ..spec.metrics import expected_tokens_per_step, predicted_speedup
    sp = res["spec"]
    t_plain = plain["decode_seconds"] / max(plain["decode_steps"], 1)     # one plain decode step
    k = sp["mean_k"] or 1.0
    alpha = sp["alpha"]
    steps = max(res["decode_steps"], 1)
    c = sp["draft_seconds"] / steps / k / t_plain
    v = (res["decode_seconds"] - sp["draft_seconds"]) / steps / t_plain
    expect = expected_tokens_per_step(alpha, k) if sp["proposed"] else 1.0
    return {"alpha": alpha, "mean_k": sp["mean_k"], "tokens_per_verification": sp["tokens_per_verification"],
            "expected_tokens_per_verification": expect, "tokens_per_step": res["tokens"] / res["steps"],
            "c": c, "v": v, "predicted_speedup": predicted_speedup(alpha, k, c) if sp["proposed"] else 1.0,
            "predicted_speedup_with_v": expect / (k * c + v), "measured_speedup": plain["seconds"] / res["seconds"],
            "measured_decode_speedup": plain["decode_seconds"] / max(res["decode_seconds"], 1e-9)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minisys bench spec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = quick_mode()
    p.add_argument("--num-requests", type=int, default=2 if quick else 4)
    p.add_argument("--max-tokens", type=int, default=48 if quick else 128)
    p.add_argument("--max-num-seqs", type=int, default=4 if quick else 8, help="batch limit of the 'load' runs")
    p.add_argument("--k-ngram", type=int, default=6)
    p.add_argument("--ngram-min", type=int, default=2, help="ngram_prompt_lookup_min (max is 4)")
    p.add_argument("--k-draft", type=int, default=3)
    p.add_argument("--draft-layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1 if quick else 3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="model dtype for every method (auto: bf16 where the CPU has native bf16)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ..model import load
    from .throughput import resolve_dtype
    model, tok = load(None, device="cpu", dtype=resolve_dtype(a.dtype, "cpu"), attention_backend="paged",
                      quiet=True)
    methods = {"plain": {},
               "ngram": {"speculative_method": "ngram", "num_speculative_tokens": a.k_ngram,
                         "ngram_prompt_lookup_min": a.ngram_min},
               "draft": {"speculative_method": "draft", "num_speculative_tokens": a.k_draft,
                         "draft_layers": a.draft_layers}}
    results = {}
    for workload in ("grounded", "chat"):
        ids = prompts(tok, workload, a.num_requests)
        for mode, seqs in (("batch1", 1), ("load", max(a.num_requests, 1) and a.max_num_seqs)):
            runs = {m: [] for m in methods}
            for _ in range(a.repeats):                                  # interleaved: load hits all alike
                for m, spec in methods.items():
                    runs[m].append(run(model, tok, ids, spec, seqs, a.max_tokens))
            med = {m: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for m, rs in runs.items()}
            same = all(med[m]["outputs"] == med["plain"]["outputs"] for m in methods)
            row = {"identical_outputs": same, "tokens": med["plain"]["tokens"],
                   "seconds": {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()},
                   "plain_tokens_per_s": med["plain"]["tokens"] / med["plain"]["seconds"]}
            for m in ("ngram", "draft"):
                row[m] = analyse(med["plain"], med[m])
            results[f"{workload}/{mode}"] = row
            print_row(f"{workload}/{mode}", row)
    path = save_result("spec" + ("_quick" if quick else ""), {"args": vars(a), "results": results}, a.out)
    plot(results, path.with_suffix(".png"))
    print(f"saved {path} and {path.with_suffix('.png')} (machine shared with other jobs: ratios are side by side)")
    return 0


def print_row(name: str, row: dict) -> None:
    print(f"\n{name}: {row['tokens']} tokens, plain {row['plain_tokens_per_s']:.1f} tok/s, "
          f"greedy outputs identical across methods: {'yes' if row['identical_outputs'] else 'NO'}")
    print(f"  {'method':6s} {'alpha':>6s} {'k':>4s} {'tok/verif':>9s} {'expected':>8s} {'c':>6s} {'v':>5s} "
          f"{'pred':>6s} {'pred(v)':>7s} {'measured':>8s} {'(decode only)':>13s}")
    for m in ("ngram", "draft"):
        r = row[m]
        print(f"  {m:6s} {r['alpha']:6.2f} {r['mean_k']:4.1f} {r['tokens_per_verification']:9.2f} "
              f"{r['expected_tokens_per_verification']:8.2f} {r['c']:6.3f} {r['v']:5.2f} {r['predicted_speedup']:5.2f}x "
              f"{r['predicted_speedup_with_v']:6.2f}x {r['measured_speedup']:7.2f}x {r['measured_decode_speedup']:12.2f}x")


def plot(results: dict, path) -> None:
    from matplotlib.figure import Figure        # no pyplot: no global backend switch, safe in a notebook
    names = list(results)
    fig = Figure(figsize=(14, 4))
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(axes, ("alpha", "tokens_per_step", "measured_speedup"),
                              ("acceptance rate alpha", "tokens per engine step", "measured speedup vs plain")):
        for j, m in enumerate(("ngram", "draft")):
            ax.bar([i + 0.4 * j for i in range(len(names))], [results[n][m][key] for n in names], 0.4, label=m)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=20)
        ax.set_title(title)
        if key == "measured_speedup":
            ax.axhline(1.0, color="gray", ls=":")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
