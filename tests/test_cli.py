"""The entry points: ``generate`` streams one conversation on the eager path, with no engine
built; `LLM` hands the model the attention backend it was given ("auto" is not rewritten).

Oracle: transformers' greedy ``generate`` on the same tiny checkpoint.
"""
from __future__ import annotations

import pytest
import torch

from minisys.cli import main
from minisys.engine.llm_engine import LLMEngine


def test_generate_streams_eager_text_without_building_an_engine(tiny_dirs, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from minisys.model import load

    def no_engine(*args, **kwargs):
        raise AssertionError("the CLI built an LLMEngine (and its KV pool) to stream one conversation")

    monkeypatch.setattr(LLMEngine, "__init__", no_engine)
    path = str(tiny_dirs["llama"])
    prompt, n = "the quick brown", 16
    assert main(["generate", prompt, "--raw", "--model", path, "--device", "cpu", "--dtype", "float32",
                 "--max-tokens", str(n)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]

    _, tok = load(path, device="cpu", dtype=torch.float32, quiet=True)
    ids = tok.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    text = tok.decode(out[0, len(ids):].tolist())
    assert printed and printed == text.rstrip("\ufffd")     # a stream never prints half a character


def test_generate_reports_a_bad_prompt_as_an_error(tiny_dirs, capsys):
    path = str(tiny_dirs["llama"])
    assert main(["generate", "x", "--raw", "--model", path, "--device", "cpu", "--max-tokens", "100000"]) == 2
    assert "error" in capsys.readouterr().err


def test_llm_keeps_auto_and_its_engine_reads_pools_through_block_tables(tiny_dirs, monkeypatch):
    from minisys import LLM, SamplingParams
    from minisys.attention import AutoAttention, PagedKV
    from minisys.engine.eager import greedy_generate

    gathers = []
    real_gather = PagedKV.gather
    monkeypatch.setattr(PagedKV, "gather", lambda self, meta: gathers.append(1) or real_gather(self, meta))
    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True)
    assert type(llm.model.attention) is AutoAttention
    prompt = llm.tokenizer.encode("the lazy dog")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    llm.model.set_attention_backend("reference")
    assert out.token_ids == greedy_generate(llm.model, prompt, 5)   # the reference on a contiguous cache
    assert gathers == []                                           # auto on pools: the block-table read
