"""The offline API, the eager baseline, stopping and detokenization on the real model."""
from __future__ import annotations

import pytest
import torch

from minisys import LLM, SamplingParams
from minisys.engine import EagerGenerator
from minisys.engine.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", quiet=True)


def test_generate_shapes_and_input_order(llm):
    prompts = ["The sky is", {"prompt_token_ids": llm.tokenizer.encode("One, two, three,")}, {"prompt": "Hello"}]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["The sky is", None, "Hello"]
    assert outs[1].prompt_token_ids == llm.tokenizer.encode("One, two, three,")
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason in ("stop", "length") and 0 < len(c.token_ids) <= 24
        assert c.text == llm.tokenizer.decode(c.token_ids)
    # each output equals running that prompt alone
    alone = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == outs[2].outputs[0].token_ids


def test_one_sampling_params_per_prompt(llm):
    outs = llm.generate(["A", "B"], [SamplingParams(temperature=0, max_tokens=3),
                                     SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["A", "B"], [GREEDY], use_tqdm=False)


def test_chat_applies_the_template(llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(msgs, GREEDY, use_tqdm=False)[0]
    assert out.prompt == llm.tokenizer.apply_chat_template(msgs)
    assert "Paris" in out.outputs[0].text
    two = llm.chat([msgs, msgs], GREEDY, use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].text == out.outputs[0].text


def test_kv_cache_and_no_cache_give_the_same_tokens(llm):
    ids = llm.tokenizer.encode("Write a haiku about the sea.")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with_cache = EagerGenerator(llm.model, llm.tokenizer, use_kv_cache=True).generate(ids, params)
    no_cache = EagerGenerator(llm.model, llm.tokenizer, use_kv_cache=False).generate(ids, params)
    assert with_cache.token_ids == no_cache.token_ids


def test_seeded_sampling_is_reproducible_and_n_gives_n_outputs(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12, n=3)
    a = llm.generate("Tell me a story", params, use_tqdm=False)[0]
    b = llm.generate("Tell me a story", params, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_stop_string_spanning_tokens_is_cut(llm):
    """Stop at a string taken from the middle of an unstopped run (the oracle)."""
    ids = llm.tokenizer.encode("The history of Rome")
    free = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # a stop string that starts in one token and ends in a later one
    toks = [llm.tokenizer.decode([t]) for t in free.token_ids]
    start = sum(len(t) for t in toks[:10])
    stop = free.text[start + len(toks[10]) - 2: start + len(toks[10]) + 3]
    assert len(stop) == 5
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    # streamed: the stop string is never leaked, and the deltas add up to the final text
    deltas = [ev.text_delta for ev in llm.runner.stream(ids, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))]
    assert "".join(deltas) == out.text and all(stop not in "".join(deltas[:i]) for i in range(len(deltas) + 1))
    incl = llm.generate({"prompt_token_ids": ids}, SamplingParams(
        temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert incl.text == free.text[: free.text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    ids = llm.tokenizer.encode("1, 2, 3, 4,")
    free = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop_id = free.token_ids[4]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    k = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[: k + 1] and out.stop_reason == stop_id


@pytest.mark.parametrize("prompt,msg", [
    ({"prompt_token_ids": []}, "empty"), ({"prompt_token_ids": [1, 10**6]}, "outside the vocabulary"),
    ({"prompt_token_ids": [1, 2.5]}, "list of integers"), (42, "a prompt is"),
])
def test_bad_prompts_are_refused(llm, prompt, msg):
    with pytest.raises(ValueError, match=msg):
        llm.generate(prompt, GREEDY, use_tqdm=False)


def test_prompt_plus_max_tokens_over_context_is_refused(llm):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llm.generate({"prompt_token_ids": [1] * 8000}, SamplingParams(max_tokens=500), use_tqdm=False)


@pytest.mark.parametrize("text", ["emoji 🤖🚀🎉 done", "日本語のテキスト、中文和한국어", "mixed é ü 🙂 ok"])
def test_incremental_detokenizer_never_emits_broken_characters(llm, text):
    tok = llm.tokenizer
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(t) for t in tok.encode(text)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tok.decode(tok.encode(text))


def test_cli_generate_answers_paris():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "minisys", "generate", "What is the capital of France?",
                          "--max-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, seed=7, max_tokens=16, n=3, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=123, max_tokens=16, n=2, ignore_eos=True),
])
def test_seeded_sampling_through_the_engine_equals_the_eager_baseline(llm, params):
    """The eager loop is the oracle for sampled decoding too: one sampler, one seed per sequence.

    The engine batches the prompts (and their n sequences) together, pages
    their KV and samples rows in groups; the eager baseline runs each
    sequence alone. Same seeds, same tokens.
    """
    eager = LLM(device="cpu", quiet=True, engine="eager")
    prompts = ["Once upon a time", "The three primary colours are", "def fibonacci(n):"]
    engine_outs = llm.generate(prompts, params, use_tqdm=False)
    eager_outs = eager.generate(prompts, params, use_tqdm=False)
    for e, b in zip(engine_outs, eager_outs):
        assert [c.token_ids for c in e.outputs] == [c.token_ids for c in b.outputs]
        assert len({tuple(c.token_ids) for c in e.outputs}) == params.n     # n distinct samples
