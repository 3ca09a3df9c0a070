"""Throughput with and without structured outputs (a json_schema constraint), side by side in one run.

    python -m minisys bench structured                    # quick: 8 requests, 2 rounds
    python -m minisys bench structured --num-seqs 32 --rounds 3

The same batch of chat requests runs on `LLMEngine` twice per round:

* ``structured``: each request with ``structured_outputs=json`` (a nested schema with enums and an array),
  greedy; each output stops when its JSON is complete;
* ``free``: the same prompts, no constraint, ``ignore_eos`` and ``max_tokens`` = the length the structured
  run produced for that request: the same number of tokens per request and the same batch shapes per
  step, so the tokens/s ratio is the per-step cost of the constraint alone.

Reported per variant (the fastest of the rounds, the variants alternating so load drifts hit both): wall
seconds, generated tokens/s, steps; for ``structured`` also the mask fill time (background thread,
overlapped with the forward), the part the engine thread waited for, the share of the step time each
takes, the grammar compiles, and a micro-benchmark of `apply_token_mask` on the batch's shape.
Writes bench/results/structured.json (with the CPU's model and ISA flags).
"""
from __future__ import annotations

import argparse
import time

import torch

from .common import save_result

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["engineer", "scientist", "artist", "teacher"]},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                 "country": {"type": "string", "maxLength": 16}},
                "required": ["city", "country"], "additionalProperties": False}},
    "required": ["name", "age", "role", "skills", "address"], "additionalProperties": False}
NAMES = ["Ada", "Alan", "Grace", "Linus", "Marie", "Niels", "Rosalind", "Claude", "Emmy", "Kurt"]


def _prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content":
            f"Describe a person called {NAMES[i % len(NAMES)]} (number {i}) as JSON: name, age, role, "
            "skills, address."}])) for i in range(n)]


def _run(model, tok, prompts, params) -> dict:
    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=len(prompts), num_kv_blocks=64 * len(prompts)))
    if params[0].structured_outputs is not None:
        engine.grammars.compile(params[0].structured_outputs)     # tokenizer info + compile: not in the timing
        engine.grammars.compiles = 0
    t = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    lens, texts = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                lens[int(out.request_id)] = len(out.outputs[0].token_ids)
                texts[int(out.request_id)] = out.outputs[0].text
    secs = time.perf_counter() - t
    m = engine.runner.masks
    return {"seconds": secs, "tokens": sum(lens.values()), "tok_s": sum(lens.values()) / secs,
            "steps": engine.stats.steps, "lens": [lens[i] for i in range(len(prompts))],
            "texts": [texts[i] for i in range(len(prompts))], "mask_fill_s": m.fill_s, "mask_wait_s": m.wait_s,
            "compiles": engine.grammars.compiles if engine._grammars else 0}


def _apply_cost(batch: int, vocab: int) -> float:
    """Median seconds of `apply_token_mask` on ``batch`` constrained rows of a (batch, vocab) logits."""
    from ..structured.mask import apply_token_mask
    logits = torch.randn(batch, vocab)
    bits = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int64).to(torch.int32)
    rows = list(range(batch))
    apply_token_mask(logits, rows, bits)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        apply_token_mask(logits, rows, bits)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    import json

    from ..engine.sampling_params import SamplingParams
    from ..model import load
    from ..structured import StructuredOutputsParams
    ap = argparse.ArgumentParser(prog="python -m minisys bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    model, tok = load(None, device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)
    prompts = _prompts(tok, a.num_seqs)
    spec = StructuredOutputsParams(json=SCHEMA)
    s_params = [SamplingParams(temperature=0, max_tokens=a.max_tokens, structured_outputs=spec) for _ in prompts]
    _run(model, tok, prompts[:2], s_params[:2])                                       # warm-up
    runs: dict[str, list[dict]] = {"structured": [], "free": []}
    for _ in range(a.rounds):
        s = _run(model, tok, prompts, s_params)
        f_params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in s["lens"]]
        f = _run(model, tok, prompts, f_params)
        assert f["tokens"] == s["tokens"], "the free run must generate the same number of tokens"
        runs["structured"].append(s)
        runs["free"].append(f)
    valid = sum(1 for t in runs["structured"][0]["texts"] if _valid(t))

    def best(name: str) -> dict:
        return min(runs[name], key=lambda r: r["seconds"])
    res = {"workload": {"num_seqs": a.num_seqs, "rounds": a.rounds, "max_tokens": a.max_tokens, "greedy": True,
                        "schema": SCHEMA, "tokens": runs["structured"][0]["tokens"],
                        "valid_json": f"{valid}/{a.num_seqs}"},
           "torch_threads": torch.get_num_threads(), "variants": {}}
    for name in runs:
        b = best(name)
        res["variants"][name] = {"seconds": b["seconds"], "tok_s": b["tok_s"], "steps": b["steps"],
                                 "all_rounds_seconds": [r["seconds"] for r in runs[name]]}
    sv = res["variants"]["structured"]
    sv["mask_fill_s"], sv["mask_wait_s"] = best("structured")["mask_fill_s"], best("structured")["mask_wait_s"]
    sv["mask_fill_share"] = sv["mask_fill_s"] / sv["seconds"]
    sv["mask_wait_share"] = sv["mask_wait_s"] / sv["seconds"]
    sv["compiles_while_timed"] = runs["structured"][0]["compiles"]     # 0: compiled once, before timing
    sv["apply_mask_ms_per_step"] = 1e3 * _apply_cost(a.num_seqs, model.config.vocab_size)
    res["tok_s_ratio_structured_over_free"] = sv["tok_s"] / res["variants"]["free"]["tok_s"]
    path = save_result("structured", res, a.out)
    print(f"{'variant':<12}{'seconds':>9}{'tok/s':>9}{'steps':>7}")
    for name, v in res["variants"].items():
        print(f"{name:<12}{v['seconds']:>9.2f}{v['tok_s']:>9.1f}{v['steps']:>7.0f}")
    print(f"tok/s ratio structured/free: {res['tok_s_ratio_structured_over_free']:.3f}; mask fill "
          f"{100 * sv['mask_fill_share']:.2f}% of the wall time (overlapped), engine waited "
          f"{100 * sv['mask_wait_share']:.2f}%; apply {sv['apply_mask_ms_per_step']:.3f} ms/step; "
          f"valid JSON {res['workload']['valid_json']}")
    print(json.dumps({"wrote": str(path)}))
    return 0


def _valid(text: str) -> bool:
    import json
    try:
        import jsonschema
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
