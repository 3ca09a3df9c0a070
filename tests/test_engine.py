"""LLMEngine against the eager baseline (the oracle): greedy equality whatever the batching."""
from __future__ import annotations

import pytest
import torch

from minisys.engine.config import EngineConfig
from minisys.engine.eager import EagerGenerator
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams

PROMPTS = ["The sky is", "Write a short poem about the sea.", "1, 2, 3, 4,",
           "Once upon a time, in a land far away, there"]


def run_all(engine: LLMEngine, reqs, add_every: int = 0) -> dict[str, object]:
    """Add requests (all at once, or one every `add_every` steps) and step until done."""
    pending, done = list(reqs), {}
    while pending or engine.has_unfinished():
        for _ in range(len(pending) if not add_every else 1):
            if pending:
                rid, ids, sp = pending.pop(0)
                engine.add_request(rid, ids, sp)
        for _ in range(max(add_every, 1)):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        engine.scheduler.check_invariants()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks and not alloc.tables
    return done


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def eager_greedy(smol_paged):
    """The oracle: each prompt alone through the eager baseline, mixed lengths."""
    model, tok = smol_paged
    gen = EagerGenerator(model, tok)
    reqs = []
    for i, p in enumerate(PROMPTS):
        sp = SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True)
        reqs.append((str(i), tok.encode(p), sp))
    ref = {rid: gen.generate(ids, sp).token_ids for rid, ids, sp in reqs}
    return reqs, ref


@pytest.mark.slow
@pytest.mark.parametrize("max_num_seqs,order,add_every", [(8, 1, 0), (2, -1, 2)])
def test_engine_greedy_equals_eager(smol_paged, eager_greedy, max_num_seqs, order, add_every):
    model, tok = smol_paged
    reqs, ref = eager_greedy
    engine = LLMEngine(model, tok, EngineConfig(max_num_seqs=max_num_seqs, num_kv_blocks=64))
    done = run_all(engine, reqs[::order], add_every)
    assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == ref
    assert max(engine.stats.batch_sizes) == min(max_num_seqs, len(reqs)) or add_every


@pytest.mark.slow
def test_engine_greedy_equals_eager_under_heavy_preemption(smol_paged, eager_greedy):
    model, tok = smol_paged
    reqs, ref = eager_greedy
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=7, max_num_seqs=4))
    done = run_all(engine, reqs)
    assert engine.stats.preemptions > 0
    assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == ref


# ------------------------------------------------------------------ tiny random model (fast)
@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from minisys.model import load
    return load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)


def test_seeded_request_does_not_depend_on_its_batch(tiny):
    model, tok = tiny
    sp = SamplingParams(temperature=0.8, seed=7, max_tokens=8, ignore_eos=True)
    ids = tok.encode("the quick brown")
    alone = run_all(LLMEngine(model, tok, EngineConfig(num_kv_blocks=32)), [("x", ids, sp)])["x"]
    others = [(f"o{i}", tok.encode(p), SamplingParams(temperature=1.0, max_tokens=6)) for i, p in enumerate(["the lazy dog", "over the", "fox"])]
    mixed = run_all(LLMEngine(model, tok, EngineConfig(num_kv_blocks=32)), others[:2] + [("x", ids, sp)] + others[2:])["x"]
    assert alone.outputs[0].token_ids == mixed.outputs[0].token_ids
    other_seed = run_all(LLMEngine(model, tok, EngineConfig(num_kv_blocks=32)),
                         [("x", ids, SamplingParams(temperature=0.8, seed=8, max_tokens=8, ignore_eos=True))])["x"]
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids


def test_stop_strings_and_tokens_match_eager_in_a_batch(tiny):
    model, tok = tiny
    gen = EagerGenerator(model, tok)
    ids = tok.encode("the quick brown fox")
    free = gen.generate(ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    cases = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free.token_ids[5]], ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=7)]
    reqs = [(str(i), ids, sp) for i, sp in enumerate(cases)]
    done = run_all(LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=24)), reqs)
    for rid, _, sp in reqs:
        e = gen.generate(ids, sp)
        c = done[rid].outputs[0]
        assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == \
            (e.token_ids, e.text, e.finish_reason, e.stop_reason)
    assert done["1"].outputs[0].finish_reason == "stop" and stop not in done["1"].outputs[0].text


def test_n_samples_abort_and_refusals_leave_nothing_behind(tiny):
    model, tok = tiny
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=12, max_num_seqs=4))
    ids = tok.encode("the lazy dog")
    engine.add_request("n3", ids, SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=6, ignore_eos=True))
    engine.add_request("gone", ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.add_request("waiting", ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.step()
    assert engine.abort("gone") and engine.abort("waiting") and not engine.abort("nope")
    with pytest.raises(ValueError, match="whole pool"):
        engine.add_request("huge", ids, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("bad", [1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("n3", ids, SamplingParams())
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            done[o.request_id] = o
    out = done["n3"]
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs) and "gone" not in done
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks and not alloc.tables and engine.num_unfinished == 0
    st = engine.stats
    assert st.steps > 0 and st.generated_tokens >= 18 and 0 < st.max_kv_usage <= 1


def test_engine_config_resolves_kv_pool_from_a_byte_budget(tiny):
    model, tok = tiny
    cfg = model.config
    per_block = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_bytes=10 * per_block + 5))
    assert engine.config.num_kv_blocks == 10 and engine.config.max_model_len == cfg.max_position_embeddings
    with pytest.raises(ValueError, match="holds no block"):
        LLMEngine(model, tok, EngineConfig(kv_cache_bytes=per_block - 1))


def test_inverse_cdf_sampling_follows_the_distribution():
    """sample_rows draws from softmax(logits / T) (chi-square-free check: frequencies vs probabilities)."""
    from minisys.sampling import sample_rows
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    g = torch.Generator().manual_seed(0)
    warm = SamplingParams(temperature=0.7)
    counts = torch.bincount(torch.tensor([sample_rows(logits, [warm], [g])[0] for _ in range(4000)]), minlength=5)
    expect = torch.softmax(logits[0] / 0.7, -1)
    assert torch.allclose(counts / 4000, expect, atol=0.03) and counts[4] == 0
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert {sample_rows(logits.repeat(2, 1), [top1, warm], [g, g])[0] for _ in range(50)} == {0}
