"""The small numbers the lessons quote that no other benchmark produces, each one re-measurable.

    python -m minisys bench facts                    # all of them (~1-2 min on 2 CPU cores)
    python -m minisys bench facts rope tokens        # only some: next-token rope tokens gather matmul profile

Each fact is a small seeded measurement on SmolLM2-135M-Instruct (CPU):

* ``next-token`` (lesson 01, section 3): the top next-token probabilities after
  ``"The capital of France is"``;
* ``rope`` (lesson 01, section 1): greedy output with the GGUF's Q/K row order
  put back (llama.cpp's permutation re-applied), raw and chat prompts, beside
  the correct model's;
* ``tokens`` (lessons 01 and 07): the chat template's length, how many tokens
  an emoji and two CJK characters take, and tokens per word of the lessons'
  prose (code blocks and tables removed);
* ``gather`` (lessons 03 and 04): the paged-attention gather of a decode group
  written ``k_pool[block_tables]`` against ``k_pool.index_select``;
* ``matmul`` (lesson 04): one MLP up-projection (576 -> 1536) for 1 and 64
  rows, fp32 against bf16 (native on a CPU with AVX-512 BF16 or AMX);
* ``profile`` (lesson 04): where a decode step at batch 64 spends its time
  (linear layers, attention, the rest), and what sampling costs in it: one
  uniform per row (``sample_rows``) against one ``torch.multinomial`` per row.

Timings are medians of repeated runs; the JSON (``bench/results/facts.json``)
records the machine, its CPU flags and its load average with them.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

from .common import median_time, save_result

FACTS = ("next-token", "rope", "tokens", "gather", "matmul", "profile")
FRANCE = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    return median_time(fn, repeats, warmup) * 1e3


def next_token(llm) -> dict:
    """Top-5 next tokens (text, probability) after FRANCE."""
    ids = llm.tokenizer.encode(FRANCE)
    with torch.no_grad():
        probs = torch.softmax(llm.model.forward_sequence(ids)[-1].float(), dim=-1)
    top = probs.topk(5)
    return {"prompt": FRANCE, "top": [[llm.tokenizer.decode([int(i)]), round(float(p), 4)]
                                      for p, i in zip(top.values, top.indices)]}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order, per head (D/2, 2) <- (2, D/2): the inverse of `unpermute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_weights(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention layer's Q and K projection weights: its own, or views of its fused q/k/v weight."""
    if attn.qkv_proj is None:
        return attn.q_proj.weight, attn.k_proj.weight
    q, k, _ = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes)      # row blocks: views, written in place
    return q, k


def rope(llm) -> dict:
    """Greedy raw and chat outputs of the correct model, then with every q/k projection re-permuted."""
    from ..engine.sampling_params import SamplingParams

    def outputs() -> dict:
        raw = llm.generate(FRANCE, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        chat = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=16))
        return {"raw": raw[0].outputs[0].text, "chat": chat[0].outputs[0].text,
                "chat_token_ids": list(chat[0].outputs[0].token_ids),
                "chat_finish_reason": chat[0].outputs[0].finish_reason}

    correct = outputs()
    cfg = llm.model.config
    with torch.no_grad():
        for layer in llm.model.model.layers:
            q, k = qk_weights(layer.self_attn)
            q.copy_(llama_cpp_permute(q, cfg.num_heads))
            k.copy_(llama_cpp_permute(k, cfg.num_kv_heads))
    try:
        scrambled = outputs()
    finally:                                          # put the weights back for the other facts
        from ..model.gguf_loader import unpermute_qk
        with torch.no_grad():
            for layer in llm.model.model.layers:
                for w, h in zip(qk_weights(layer.self_attn), (cfg.num_heads, cfg.num_kv_heads)):
                    w.copy_(torch.from_numpy(unpermute_qk(w.cpu().numpy(), h)))
    return {"max_tokens": {"raw": 8, "chat": 16}, "correct": correct, "qk_rows_as_in_gguf": scrambled}


def prose(markdown: str) -> str:
    """The English of a lesson: code blocks, tables, indented code, images, inline code and URLs removed."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    lines = [ln for ln in text.splitlines()
             if not ln.lstrip().startswith(("|", "![")) and not ln.startswith("    ")]
    text = "\n".join(lines)
    text = re.sub(r"`[^`]*`", " ", text)                             # inline code
    text = re.sub(r"\]\([^)]*\)", "]", text)                         # link targets
    text = re.sub(r"<?https?://\S+", " ", text)
    return text


def tokens(llm, lessons_dir: str | Path = "lessons") -> dict:
    tok = llm.tokenizer
    chat_prompt = tok.apply_chat_template(CHAT)
    out = {"chat_template_tokens": len(tok.encode(chat_prompt)), "strings": {}}
    for s in ("🙂", "😀", "世界"):
        ids = tok.encode(s)
        out["strings"][s] = {"utf8_bytes": len(s.encode()), "tokens": len(ids),
                             "each_alone": [tok.decode([i]) for i in ids]}
    per_lesson = {}
    for path in sorted(Path(lessons_dir).glob("[0-9][0-9]-*.md")):
        text = prose(path.read_text())
        per_lesson[path.name] = {"words": len(text.split()), "tokens": len(tok.encode(text))}
    if per_lesson:
        words = sum(v["words"] for v in per_lesson.values())
        toks = sum(v["tokens"] for v in per_lesson.values())
        out["lessons_prose"] = {"per_lesson": per_lesson, "words": words, "tokens": toks,
                                "tokens_per_word": round(toks / words, 3)}
    return out


def gather(repeats: int = 200, threads: int = 1) -> dict:
    """A decode group's K gather: 16 sequences of 485 tokens (block 16), SmolLM2's KV shape.

    The two forms alternate in one loop (they share the machine's load) and run on ``threads``
    torch threads: on a machine shared with other jobs a ~1 ms op split over 2 threads often
    waits a whole scheduler time slice for its second thread, which hides the difference.
    """
    g = torch.Generator().manual_seed(0)
    b, ctx, bs, hkv, d = 16, 485, 16, 3, 64
    nb = -(-ctx // bs)
    out = {"shape": {"sequences": b, "context": ctx, "block_size": bs, "kv_heads": hkv, "head_dim": d},
           "torch_threads": threads, "repeats": repeats}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            pool = torch.randn(4096, bs, hkv, d, generator=g).to(dtype)          # (num_blocks, bs, Hkv, D)
            tables = torch.randperm(4096, generator=g)[: b * nb].view(b, nb)     # (b, nb)
            flat = tables.reshape(-1)
            assert torch.equal(pool[tables].reshape(b, nb * bs, hkv, d),
                               pool.index_select(0, flat).view(b, nb * bs, hkv, d))
            fancy, select = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                pool[tables]                                                      # (b, nb, bs, Hkv, D)
                fancy.append(time.perf_counter() - t)
                t = time.perf_counter()
                pool.index_select(0, flat)                                        # (b * nb, bs, Hkv, D)
                select.append(time.perf_counter() - t)
            f, s_ = statistics.median(fancy) * 1e3, statistics.median(select) * 1e3
            out[str(dtype).replace("torch.", "")] = {"fancy_indexing_ms": round(f, 3),
                                                     "index_select_ms": round(s_, 3),
                                                     "index_select_x_faster": round(f / s_, 2)}
    finally:
        torch.set_num_threads(before)
    return out


def matmul(repeats: int = 200, threads: int = 1) -> dict:
    """x @ W for SmolLM2's MLP up-projection (576 -> 1536), 1 and 64 rows, fp32 vs bf16, interleaved."""
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(1536, 576, generator=g)
    w16 = w32.to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {"weight": [1536, 576], "torch_threads": threads, "repeats": repeats}
    try:
        for rows in (1, 64):
            x32 = torch.randn(rows, 576, generator=g)
            x16 = x32.to(torch.bfloat16)
            t32, t16 = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                torch.nn.functional.linear(x32, w32)
                t32.append(time.perf_counter() - t)
                t = time.perf_counter()
                torch.nn.functional.linear(x16, w16)
                t16.append(time.perf_counter() - t)
            a, b = statistics.median(t32) * 1e6, statistics.median(t16) * 1e6
            out[f"rows_{rows}"] = {"fp32_us": round(a, 1), "bf16_us": round(b, 1), "bf16_x_faster": round(a / b, 2)}
    finally:
        torch.set_num_threads(before)
    return out


def linear_layers(model) -> list[torch.nn.Module]:
    """The modules whose forward is a matmul over a weight: `nn.Linear` (q/k/v, o, gate/up, down when
    unfused), the fused q/k/v and gate/up (`MergedColumnParallelLinear`) and the LM head."""
    from ..parallel.linear import MergedColumnParallelLinear, ParallelLMHead
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, MergedColumnParallelLinear, ParallelLMHead))]


class _TimedBackend:
    """Delegates to an attention backend and adds the seconds spent in its forward* calls."""

    def __init__(self, inner, acc: list[float]) -> None:
        self._inner, self._acc = inner, acc

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not name.startswith("forward"):
            return attr

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._acc[0] += time.perf_counter() - t
        return timed


def profile(llm, batch: int = 64, prompt_len: int = 128, steps: int = 6) -> dict:
    """Time shares of a decode step at ``batch`` (the engine's own step), and sampling's cost in it."""
    from ..engine.config import EngineConfig
    from ..engine.llm_engine import LLMEngine
    from ..engine.sampling_params import SamplingParams
    from ..sampling import make_generator, probs_from_logits, sample_rows

    model = llm.model
    rng = torch.Generator().manual_seed(0)
    cfg = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len,
                       enable_chunked_prefill=False, num_kv_blocks=batch * (-(-(prompt_len + 64) // 16)) + batch)
    engine = LLMEngine(model, llm.tokenizer, cfg)
    sp = SamplingParams(temperature=0.6, max_tokens=64, ignore_eos=True, seed=0)
    for i in range(batch):
        engine.add_request(str(i), torch.randint(0, 10000, (prompt_len,), generator=rng).tolist(), sp)
    engine.step()                                       # every prompt prefilled in one step
    engine.step(), engine.step()                        # warm-up decodes
    attn_s, linear_s = [0.0], [0.0]
    starts: dict[int, float] = {}
    hooks = []
    for m in linear_layers(model):                      # the LM head is a linear layer too
        hooks.append(m.register_forward_pre_hook(lambda mod, _: starts.__setitem__(id(mod), time.perf_counter())))
        hooks.append(m.register_forward_hook(
            lambda mod, _i, _o: linear_s.__setitem__(0, linear_s[0] + time.perf_counter() - starts[id(mod)])))
    original = model.attention
    model.attention = _TimedBackend(original, attn_s)
    step_times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - t)
    finally:
        model.attention = original
        for h in hooks:
            h.remove()
    total = sum(step_times)
    step_ms = statistics.median(step_times) * 1e3
    logits = torch.randn(batch, model.config.vocab_size, generator=rng)
    params = [sp] * batch
    gens = [make_generator(i) for i in range(batch)]

    def per_row_multinomial():
        for i in range(batch):
            torch.multinomial(probs_from_logits(logits[i:i + 1], params[i]), 1, generator=gens[i])

    rows_ms = _median_ms(lambda: sample_rows(logits, params, gens), 10)
    multi_ms = _median_ms(per_row_multinomial, 10)
    return {"batch": batch, "prompt_len": prompt_len, "dtype": str(model.dtype), "decode_steps": steps,
            "decode_step_ms_median": round(step_ms, 1),
            "share_linear_layers": round(linear_s[0] / total, 3),
            "share_attention": round(attn_s[0] / total, 3),
            "share_rest": round(1 - (linear_s[0] + attn_s[0]) / total, 3),
            "sampling_64_rows": {"sample_rows_ms": round(rows_ms, 2), "multinomial_per_row_ms": round(multi_ms, 2),
                                 "sample_rows_share_of_step": round(rows_ms / step_ms, 3),
                                 "multinomial_share_of_step": round(multi_ms / step_ms, 3)}}


def main(argv: list[str] | None = None) -> int:
    import json

    from ..bench.throughput import resolve_dtype
    from ..llm import LLM

    p = argparse.ArgumentParser(prog="python -m minisys bench facts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("facts", nargs="*", metavar="FACT", help=f"any of {', '.join(FACTS)} (default: all)")
    p.add_argument("--out", default="bench/results", help="folder for facts.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the profile (1 keeps step times stable on a shared machine)")
    a = p.parse_args(argv)
    unknown = sorted(set(a.facts) - set(FACTS))
    if unknown:
        p.error(f"unknown fact(s) {unknown}; choose from {', '.join(FACTS)}")
    wanted = a.facts or list(FACTS)
    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = {}
    llm = None
    if set(wanted) & {"next-token", "rope", "tokens"}:
        llm = LLM(quiet=True, engine="eager", dtype=torch.float32)          # fp32: the lessons' CPU default
        for name, fn in (("next-token", next_token), ("rope", rope), ("tokens", tokens)):
            if name in wanted:
                results[name] = fn(llm)
                print(name, json.dumps(results[name], ensure_ascii=False, indent=1))
    if "gather" in wanted:
        results["gather"] = gather()
        print("gather", json.dumps(results["gather"], indent=1))
    if "matmul" in wanted:
        results["matmul"] = matmul()
        print("matmul", json.dumps(results["matmul"], indent=1))
    if "profile" in wanted:
        dtype = resolve_dtype("auto", "cpu")
        llm = LLM(quiet=True, engine="eager", dtype=dtype, attention_backend="paged")
        results["profile"] = profile(llm)
        print("profile", json.dumps(results["profile"], indent=1))
    name = "facts" if not a.facts else "facts_" + "_".join(sorted(wanted))
    path = save_result(name, {"facts": results}, a.out)
    print(f"wrote {path}")
    return 0
