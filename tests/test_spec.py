"""Speculative decoding in the engine: greedy outputs equal plain decoding, no KV leaks, rollback.

Oracles: the eager baseline (greedy tokens without any speculation); a naive
n-gram search written out here; the allocator's own invariants and a simple
token-list model of each sequence for `append_slots` / `truncate`.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minisys.engine.config import EngineConfig
from minisys.engine.eager import EagerGenerator
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams
from minisys.kv.block_allocator import AllocatorError, BlockAllocator
from minisys.spec import expected_tokens_per_step, ngram_propose, predicted_speedup
from minisys.spec.draft import SelfDraftModel

PROMPTS = ["the quick brown fox jumps over the lazy dog the quick brown", "the lazy dog", "fox fox fox fox",
           "over the lazy the quick over the"]


# ------------------------------------------------------------------ n-gram lookup
def naive_ngram(tokens, k, n_max, n_min):
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[-n:]]
        if starts:
            s = max(starts)
            return tokens[s + n:s + n + k]
    return []


def test_ngram_examples():
    assert ngram_propose([1, 2, 3, 4, 1, 2], k=3, n_max=2) == [3, 4, 1]
    assert ngram_propose([1, 2, 3, 9, 2, 3, 7, 2, 3], k=2, n_max=2) == [7, 2]     # the latest match wins
    assert ngram_propose([5, 6, 7], k=3) == []
    assert ngram_propose([7, 7, 7], k=4, n_max=3) == [7]                           # overlapping match
    assert ngram_propose([1, 2, 3, 1], k=0) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=30), st.integers(1, 5), st.sampled_from([(3, 1), (4, 2), (1, 1)]))
def test_ngram_matches_naive_search(tokens, k, sizes):
    n_max, n_min = sizes
    assert ngram_propose(tokens, k, n_max, n_min) == naive_ngram(tokens, k, n_max, n_min)


# ------------------------------------------------------------------ allocator rollback
def test_truncate_frees_draft_blocks_and_drops_stale_hashes():
    a = BlockAllocator(8, 4, enable_prefix_caching=True, debug=True)
    a.allocate("s", [1, 2, 3, 4, 5, 6])
    assert a.num_used == 2
    res = a.append_slots("s", [7, 8, 9, 10, 11])                     # 11 tokens: 3 blocks
    assert len(res) == 5 and a.num_used == 3 and a.table("s").num_tokens == 11
    a.truncate("s", 7)                                               # drafts 8.. rejected
    assert a.num_used == 2 and a.held_tokens("s") == [1, 2, 3, 4, 5, 6, 7]
    assert a.blocks[a.table("s").block_ids[1]].hash is None          # was hashed with draft tokens 7, 8
    assert a.allocate("t", [1, 2, 3, 4, 5, 6, 7, 8, 0]).num_cached_tokens == 4   # no stale prefix hit
    a.check_invariants()
    a.free("s")
    a.free("t")
    assert a.num_free == 8
    with pytest.raises(AllocatorError):
        a.truncate("s", 1)


def test_append_slots_is_all_or_nothing():
    a = BlockAllocator(3, 4, enable_prefix_caching=False, debug=True)
    a.allocate("s", list(range(8)))
    assert not a.append_slots("s", list(range(5)))                   # needs 2 blocks, 1 free
    assert a.table("s").num_tokens == 8 and a.num_free == 1
    assert a.append_slots("s", list(range(4)))


class RollbackMachine(RuleBasedStateMachine):
    """Sequences grow by bursts of drafts and roll back; a token-list model tracks what each should hold."""

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(12, 4, enable_prefix_caching=True, debug=True)
        self.model: dict[int, list[int]] = {}
        self.next_id = 0

    @rule(n=st.integers(1, 9), tok=st.integers(0, 2))
    def allocate(self, n, tok):
        if self.a.allocate(self.next_id, [tok] * n):
            self.model[self.next_id] = [tok] * n
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data(), toks=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def speculate(self, data, toks):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        if self.a.append_slots(sid, toks):
            keep = data.draw(st.integers(len(self.model[sid]) + 1, len(self.model[sid]) + len(toks)))
            self.a.truncate(sid, keep)
            self.model[sid] = (self.model[sid] + toks)[:keep]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.a.fork(sid, self.next_id)
        self.model[self.next_id] = list(self.model[sid])
        self.next_id += 1

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.a.free(sid)
        del self.model[sid]

    @invariant()
    def tables_match_model(self):
        self.a.check_invariants()
        assert {s: self.a.held_tokens(s) for s in self.a.tables} == self.model
        assert {s: t.num_tokens for s, t in self.a.tables.items()} == {s: len(m) for s, m in self.model.items()}
        if not self.model:
            assert self.a.num_free == self.a.num_blocks


TestRollbackMachine = RollbackMachine.TestCase
TestRollbackMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


# ------------------------------------------------------------------ the engine (tiny random model: fast)
@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from minisys.model import load
    return load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)


def serve(engine, reqs):
    """Add every request, step to the end checking invariants; assert nothing is left behind."""
    for rid, ids, sp in reqs:
        engine.add_request(rid, ids, sp)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        engine.scheduler.check_invariants()
        tables = engine.scheduler.allocator.tables      # no draft's slot outlives its step
        assert all(tables[r.request_id].num_tokens <= r.num_tokens for r in engine.scheduler.running)
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks and not alloc.tables and engine.num_unfinished == 0
    return done


def greedy_reqs(tok, n=4):
    return [(str(i), tok.encode(p), SamplingParams(temperature=0, max_tokens=10 + 3 * i, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:n])]


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    model, tok = tiny
    gen = EagerGenerator(model, tok)
    return {rid: gen.generate(ids, sp).token_ids for rid, ids, sp in greedy_reqs(tok)}


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("blocks", [64, 9])
@pytest.mark.parametrize("chunked", [False, True], ids=["prefill-first", "chunked"])
def test_greedy_speculation_equals_plain_decoding(tiny, tiny_ref, method, k, blocks, chunked):
    """Both proposers, several k, with and without preemption, with and without chunked prefill
    (a budget of 8 tokens: prompts span several steps beside verification runs)."""
    model, tok = tiny
    cfg = EngineConfig(block_size=4, num_kv_blocks=blocks, max_num_seqs=4, speculative_method=method,
                       num_speculative_tokens=k, draft_layers=1, enable_chunked_prefill=chunked,
                       max_num_batched_tokens=8 if chunked else None)
    engine = LLMEngine(model, tok, cfg)
    done = serve(engine, greedy_reqs(tok))
    assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == tiny_ref
    sp = engine.stats.spec
    assert sp.proposed > 0 and sp.num_verifications > 0 and sp.accepted <= sp.proposed
    assert engine.stats.generated_tokens == sum(len(v) for v in tiny_ref.values())
    if blocks == 9:
        assert engine.stats.preemptions > 0


def test_separate_draft_model_from_a_directory(tiny, tiny_ref, tiny_dirs):
    """A draft loaded from its own checkpoint (another tiny model with the same tokenizer)."""
    model, tok = tiny
    cfg = EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=4, speculative_method="draft",
                       speculative_model=str(tiny_dirs["llama-tied"]), num_speculative_tokens=3)
    engine = LLMEngine(model, tok, cfg)
    assert engine.speculator.proposer.model is not model and engine.speculator.proposer.model.config.num_layers == 2
    done = serve(engine, greedy_reqs(tok))
    assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == tiny_ref
    assert engine.stats.spec.draft_forwards > 0


def test_sampled_speculation_is_seeded_and_leaves_nothing_behind(tiny):
    model, tok = tiny
    for method in ("ngram", "draft"):
        def run():
            cfg = EngineConfig(block_size=4, num_kv_blocks=16, max_num_seqs=3, speculative_method=method,
                               num_speculative_tokens=3, draft_layers=1)
            reqs = [(str(i), tok.encode(p), SamplingParams(temperature=0.8, top_k=50, seed=i, max_tokens=12,
                                                           ignore_eos=True)) for i, p in enumerate(PROMPTS[:3])]
            reqs.append(("g", tok.encode(PROMPTS[3]), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
            engine = LLMEngine(model, tok, cfg)
            return {rid: o.outputs[0].token_ids for rid, o in serve(engine, reqs).items()}, engine
        a, engine = run()
        b, _ = run()
        assert a == b and all(len(v) == 12 for v in a.values())
        assert engine.stats.spec.proposed > 0


def test_self_draft_shares_weights_and_checks_layers(tiny):
    model, _ = tiny
    d = SelfDraftModel(model, 1)
    assert d.lm_head is model.lm_head and len(d.model.layers) == 1 and d.config.num_layers == 1
    with pytest.raises(ValueError, match="draft_layers"):
        SelfDraftModel(model, model.config.num_layers + 1)


def test_speculative_config_is_validated():
    with pytest.raises(ValueError, match="speculative_method"):
        EngineConfig(speculative_method="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="ngram_prompt_lookup_min"):
        EngineConfig(speculative_method="ngram", ngram_prompt_lookup_min=5, ngram_prompt_lookup_max=2)


def test_speedup_formulas():
    assert expected_tokens_per_step(0.0, 4) == 1.0 and expected_tokens_per_step(1.0, 4) == 5.0
    assert abs(expected_tokens_per_step(0.5, 2) - 1.75) < 1e-12                  # 1 + 0.5 + 0.25
    assert abs(predicted_speedup(0.5, 2, 0.25) - 1.75 / 1.5) < 1e-12


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_real_model_greedy_ngram_equals_eager_under_preemption(smol):
    model, tok = smol
    old = model.attention
    model.set_attention_backend("paged")
    try:
        gen = EagerGenerator(model, tok)
        text = "Repeat exactly: the cat sat on the mat, the cat sat on the mat."
        reqs = [(str(i), tok.encode(p), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
                for i, p in enumerate([text, "1, 2, 3, 4, 5, 6,"])]
        ref = {rid: gen.generate(ids, sp).token_ids for rid, ids, sp in reqs}
        for method, blocks in (("ngram", 11), ("draft", 64)):          # 11: both admitted, then preempted
            engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=blocks, max_num_seqs=2,
                                                        speculative_method=method, num_speculative_tokens=4,
                                                        draft_layers=4))
            done = serve(engine, reqs)
            assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == ref, (method, blocks)
            assert engine.stats.spec.proposed > 0
            if blocks == 11:
                assert engine.stats.preemptions > 0
    finally:
        model.set_attention_backend(old)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_speculation_follows_the_target_distribution_end_to_end(tiny, method):
    """Many seeded sequences through the engine: (token 1, token 2) ~ p(t1) p(t2 | t1), token 2 speculated.

    Oracle: the target's own next-token distributions (top_k=3, temperature 1)
    computed with `forward_sequence`; chi-square at significance 1e-3.
    """
    from scipy.stats import chisquare
    from minisys.sampling import probs_from_logits as target_probs
    model, tok = tiny
    sp = dict(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    base, extra = tok.encode("the quick brown fox the quick"), []
    for _ in range(20):             # put the likely first tokens in the prompt, so that n-gram lookup finds them
        prompt = extra + base
        likely = model.forward_sequence(prompt)[-1].topk(3).indices.tolist()
        if all(t in prompt[:-1] for t in likely):
            break
        extra = sorted(set(extra) | set(likely))
    p1 = target_probs(model.forward_sequence(prompt)[-1:], SamplingParams(**sp))[0]          # (V,)
    cells = {}
    for a in p1.nonzero().flatten().tolist():
        p2 = target_probs(model.forward_sequence(prompt + [a])[-1:], SamplingParams(**sp))[0]
        for b in p2.nonzero().flatten().tolist():
            cells[(a, b)] = float(p1[a] * p2[b])
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=1200, max_num_seqs=128,
                                                speculative_method=method, num_speculative_tokens=2,
                                                draft_layers=1, ngram_prompt_lookup_min=1))
    N = 3000
    done = serve(engine, [(str(i), prompt, SamplingParams(seed=i, **sp)) for i in range(N)])
    assert engine.stats.spec.proposed > 500                 # token 2 was verified, not decoded plainly
    if method == "draft":
        assert engine.stats.spec.accepted > 0               # (the tiny model's n-gram drafts are all rejected)
    counts = {c: 0 for c in cells}
    for o in done.values():
        pair = tuple(o.outputs[0].token_ids[:2])
        assert pair in counts, f"the engine emitted {pair}, which the target cannot produce"
        counts[pair] += 1
    keys = sorted(cells)
    pv = chisquare([counts[c] for c in keys], [N * cells[c] / sum(cells.values()) for c in keys]).pvalue
    assert pv > 1e-3, f"chi-square rejects the engine's sampled speculation (p = {pv:.2e})"
