"""Logprobs (`SamplingParams.logprobs` / ``prompt_logprobs``) against the independent oracle:
``torch.log_softmax`` of Hugging Face transformers' logits on the same GGUF (fp32, 1e-4).

Greedy, so each generated token is the oracle's argmax (rank 1); the prompt's logprobs arrive
over several chunked-prefill steps, and the prompt is also in the prefix cache (a prompt-logprobs
request must compute it anyway).
"""
from __future__ import annotations

import pytest
import torch

from minisys.engine.config import EngineConfig
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.sampling_params import RequestOutputKind

ATOL = 1e-4
K = 3


def _run(engine, reqs):
    for rid, ids, sp in reqs:
        engine.add_request(rid, ids, sp)
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def _hf_logprobs(hf_model, ids):
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)   # (len, V)


def _check_entry(entry, token, row, k):
    """entry {id: Logprob} for ``token`` against the oracle's logprob row: value, rank, top-k ids and values."""
    want = row[token].item()
    assert abs(entry[token].logprob - want) < ATOL
    # the rank: 1 + tokens more likely (tokens within ATOL of it may fall either way)
    assert int((row > want + ATOL).sum()) + 1 <= entry[token].rank <= int((row > want - ATOL).sum()) + 1
    top_v, top_i = row.topk(k)
    for r, (t, v) in enumerate(zip(top_i.tolist(), top_v.tolist()), start=1):
        assert t in entry, f"top-{r} token {t} missing"
        assert abs(entry[t].logprob - v) < ATOL
        if t != token:
            assert entry[t].rank == r
    assert set(entry) <= set(top_i.tolist()) | {token}


@pytest.mark.slow
def test_logprobs_match_transformers(smol, hf_smol):
    model, tok = smol
    hf_model, _ = hf_smol
    prompt = tok.encode("The quick brown fox jumps")
    P = len(prompt)
    engine = LLMEngine(model, tok, EngineConfig(block_size=2, num_kv_blocks=32, max_num_batched_tokens=3, max_num_seqs=2,
                                                max_model_len=64))
    _run(engine, [("warm", prompt, SamplingParams(temperature=0, max_tokens=1))])   # prompt now in the prefix cache
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=K, prompt_logprobs=K)
    (final,) = [o for o in _run(engine, [("x", prompt, sp)])["x"] if o.finished]
    out = final.outputs[0]
    lp = _hf_logprobs(hf_model, prompt + out.token_ids)
    assert len(out.logprobs) == len(out.token_ids) == 5
    for m, (t, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = lp[P - 1 + m]
        assert t == int(row.argmax()) and entry[t].rank == 1
        _check_entry(entry, t, row, K)
        assert entry[t].decoded_token == tok.decode([t], skip_special_tokens=False)
    assert len(final.prompt_logprobs) == P and final.prompt_logprobs[0] is None
    for j in range(1, P):
        _check_entry(final.prompt_logprobs[j], prompt[j], lp[j - 1], K)


@pytest.mark.slow
def test_logprobs_zero_and_delta_stream_and_mixed_batch(smol):
    model, tok = smol
    prompts = [tok.encode(t) for t in ("Hello there", "One two three", "The sky is")]
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    cfg = EngineConfig(block_size=4, num_kv_blocks=32, max_num_batched_tokens=4, max_num_seqs=3, max_model_len=64)
    base = _run(LLMEngine(model, tok, cfg), [(str(i), p, plain) for i, p in enumerate(prompts)])
    with_lp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0, prompt_logprobs=1)
    delta = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=0,
                           output_kind=RequestOutputKind.DELTA)
    mixed = _run(LLMEngine(model, tok, cfg), [("0", prompts[0], plain), ("1", prompts[1], with_lp),
                                              ("2", prompts[2], delta)])
    for i in "01":
        assert mixed[i][-1].outputs[0].token_ids == base[i][-1].outputs[0].token_ids
    assert sum((o.outputs[0].token_ids for o in mixed["2"]), []) == base["2"][-1].outputs[0].token_ids
    assert mixed["0"][-1].outputs[0].logprobs is None and mixed["0"][-1].prompt_logprobs is None
    one = mixed["1"][-1]
    assert [list(e) for e in one.outputs[0].logprobs] == [[t] for t in one.outputs[0].token_ids]   # 0: token only
    assert all(e[t].rank == 1 for e, t in zip(one.outputs[0].logprobs, one.outputs[0].token_ids))
    assert one.prompt_logprobs[0] is None and len(one.prompt_logprobs) == len(prompts[1])
    assert all(len(e) in (1, 2) for e in one.prompt_logprobs[1:])
    # DELTA: each output carries only its new tokens' logprobs; the prompt's come once, whole
    streamed = mixed["2"]
    assert all(len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids) for o in streamed)
    lps = sum((o.outputs[0].logprobs for o in streamed), [])
    assert [next(iter(e)) for e in lps] == sum((o.outputs[0].token_ids for o in streamed), [])
    assert all(2 <= len(e) <= 3 for e in lps)
    sent = [o.prompt_logprobs for o in streamed if o.prompt_logprobs is not None]
    assert len(sent) == 1 and len(sent[0]) == len(prompts[2]) and sent[0][0] is None
    merged = streamed[0]
    for o in streamed[1:]:
        merged = merged.add(o)
    assert merged.outputs[0].logprobs == lps and merged.prompt_logprobs == sent[0]


def test_logprobs_validation(smol):
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    model, tok = smol
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=16, speculative_method="ngram"))
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=name):
            engine.add_request("s", [1, 2, 3], SamplingParams(**{name: 1}))
    with pytest.raises(ValueError, match="logprobs"):
        engine.add_request("v", [1, 2, 3], SamplingParams(logprobs=model.config.vocab_size + 1))


def test_the_eager_baseline_refuses_logprobs(smol):
    from minisys.engine.eager import EagerGenerator
    model, tok = smol
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=name):
            EagerGenerator(model, tok).check_prompt([1, 2, 3], SamplingParams(**{name: 0}))
