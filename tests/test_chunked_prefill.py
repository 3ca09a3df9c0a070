"""Chunked prefill (lesson 05): the token budget per step, and outputs equal to the baseline's.

Oracles: step decisions worked out by hand from the rules (decodes first,
then chunks, FCFS); invariants recomputed from the queues and the allocator
(budget, starvation, leaks); and, end to end, the eager baseline's greedy
tokens (and, for seeded sampling, the engine with chunked prefill off).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisys.engine.config import EngineConfig
from minisys.engine.eager import EagerGenerator
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.request import Request
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import Scheduler


def make_sched(blocks=64, block_size=4, max_num_seqs=4, budget=8, max_len=256, prefix=True, chunked=True):
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, max_model_len=max_len, enable_prefix_caching=prefix,
                       enable_chunked_prefill=chunked)
    s = Scheduler(cfg)
    s.allocator.debug = True
    return s


def req(rid, n_prompt, max_tokens, base=0):
    return Request(str(rid), [(base + i) % 50 for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens)


def run_step(s: Scheduler, token=7):
    """One step with a fake model: requests whose fed tokens reach their end get `token`."""
    out = s.schedule()
    assert out.num_tokens <= s.config.max_num_batched_tokens, "a step exceeded the token budget"
    sampled = [sr.request for sr in out.scheduled if sr.samples]
    s.update_computed(out)
    for r in sampled:
        r.output_token_ids.append(token)
        if len(r.output_token_ids) >= r.max_tokens:
            s.finish(r, "length")
    s.check_invariants()
    return out


def ran(out):
    return [(x.request.request_id, x.num_tokens) for x in out.scheduled]


def drain(s, limit=10_000):
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < limit, "the scheduler made no progress"
    return steps


# ------------------------------------------------------------------ config
def test_config_defaults_and_refusals():
    cfg = EngineConfig(enable_chunked_prefill=True, num_kv_blocks=8)
    assert cfg.enable_chunked_prefill and cfg.max_num_batched_tokens is None
    with pytest.raises(ValueError, match=">= max_num_seqs"):
        EngineConfig(enable_chunked_prefill=True, max_num_seqs=8, max_num_batched_tokens=4)
    wide = req("wide", 40, 4)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_sched(chunked=False).add(wide)             # prefill-first: the prompt must fit one step
    s = make_sched(chunked=True)
    s.add(wide)                                         # chunked: any prompt that fits the pool
    drain(s)
    assert wide.output_token_ids == [7] * 4
    with pytest.raises(ValueError, match="whole pool"):
        make_sched(blocks=4, chunked=True).add(req("huge", 40, 4))


# ------------------------------------------------------------------ the step decision
def test_decodes_go_first_and_a_long_prompt_is_cut_to_the_budget():
    s = make_sched(budget=8)
    s.add(req("a", 5, 6))
    assert ran(run_step(s)) == [("a", 5)]
    s.add(req("long", 20, 2, base=20))
    assert ran(run_step(s)) == [("a", 1), ("long", 7)]
    assert ran(run_step(s)) == [("a", 1), ("long", 7)]
    long = s.running[1]
    assert long.output_token_ids == []                  # a chunk inside the prompt samples nothing
    assert ran(run_step(s)) == [("a", 1), ("long", 6)]  # the last chunk: long samples its first token
    assert long.output_token_ids == [7]
    assert ran(run_step(s)) == [("a", 1), ("long", 1)]
    drain(s)
    assert s.allocator.num_free == s.allocator.num_blocks


def test_any_prompt_in_the_queue_can_be_split_not_only_the_first():
    s = make_sched(budget=8)
    for i in range(3):
        s.add(req(i, 5, 3, base=10 * i))
    assert ran(run_step(s)) == [("0", 5), ("1", 3)]
    assert ran(run_step(s)) == [("0", 1), ("1", 2), ("2", 5)]    # 1's last chunk, then 2 joins
    assert ran(run_step(s)) == [("0", 1), ("1", 1), ("2", 1)]
    drain(s)


def test_prefill_first_switch_prefills_a_whole_prompt_in_one_step():
    s = make_sched(budget=64, chunked=False)
    s.add(req("a", 5, 6))
    run_step(s)
    s.add(req("long", 40, 2, base=20))
    assert ran(run_step(s)) == [("a", 1), ("long", 40)]      # the decode waits for 40 prefill tokens


def test_a_request_preempted_mid_prefill_restarts_and_finishes():
    s = make_sched(blocks=6, block_size=4, budget=4, max_num_seqs=2, prefix=False)
    a, b = req("a", 4, 12), req("b", 16, 2, base=20)
    s.add(a)
    run_step(s)                                              # a: 1 block, grows to 4
    s.add(b)                                                 # 4 blocks at admission: the pool is full
    computed_when_preempted = []
    while s.has_unfinished():
        before = b.num_computed_tokens
        if b in run_step(s).preempted:
            computed_when_preempted.append(before)
    # a crosses a block boundary at its 9th token while b is 12 tokens into its 16-token prompt
    assert computed_when_preempted and 0 < computed_when_preempted[0] < 16
    assert b.output_token_ids == [7, 7] and a.output_token_ids == [7] * 12
    assert s.allocator.num_free == 6


def test_a_queued_request_waits_only_while_the_budget_is_used():
    """Bound: a request waits at most ceil(tokens ahead / prefill budget) steps (+1 for its own)."""
    budget, seqs = 16, 4
    s = make_sched(budget=budget, max_num_seqs=seqs, blocks=128)
    s.add(req("dec", 3, 200))
    run_step(s)                                              # one request decoding all along
    s.add(req("long", 100, 2, base=10))
    short = req("short", 3, 2, base=30)
    s.add(short)
    steps = 0
    while not short.num_computed_tokens:
        run_step(s)
        steps += 1
    ahead = 100                                              # prefill tokens queued before short
    assert steps <= math.ceil(ahead / (budget - 1)) + 1 == 8
    assert steps == 7                                        # 15 prefill tokens a step: 6 full steps + short's


# ------------------------------------------------------------------ property: budget, starvation, leaks
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 8)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=ops, blocks=st.integers(6, 24), block_size=st.sampled_from([1, 2, 4]),
       max_num_seqs=st.integers(1, 4), extra_budget=st.integers(0, 12), prefix=st.booleans())
def test_random_streams_respect_the_budget_never_starve_and_leak_nothing(ops, blocks, block_size, max_num_seqs,
                                                                         extra_budget, prefix):
    budget = max_num_seqs + extra_budget
    s = make_sched(blocks=blocks, block_size=block_size, max_num_seqs=max_num_seqs, budget=budget, prefix=prefix)
    added = []

    def step():
        out = s.schedule()
        assert out.num_tokens <= budget, "a step exceeded the token budget"
        if s.waiting and not out.preempted:                # the head waits only if something is full
            head = s.waiting[0]
            assert (out.num_tokens == budget or len(s.running) == max_num_seqs
                    or not s.allocator.can_allocate(head.num_tokens)), "a queued request starves with room left"
        sampled = [sr.request for sr in out.scheduled if sr.samples]
        s.update_computed(out)
        for r in sampled:
            r.output_token_ids.append(7)
            if len(r.output_token_ids) >= r.max_tokens:
                s.finish(r, "length")
        s.check_invariants()

    for op in ops:
        if op[0] == "add":
            r = req(len(added), op[1], op[2], base=3 * len(added))
            try:
                s.add(r)
                added.append(r)
            except ValueError:
                assert r.request_id not in s.allocator.tables
        elif op[0] == "abort" and added:
            r = added[op[1] % len(added)]
            if not r.is_finished:
                s.finish(r, "abort")
        else:
            for _ in range(op[1]):
                step()
    for _ in range(10_000):
        if not s.has_unfinished():
            break
        step()
    assert all(r.is_finished for r in added)
    assert all(r.finish_reason == "abort" or len(r.output_token_ids) == r.max_tokens for r in added)
    assert s.allocator.num_free == s.allocator.num_blocks and not s.allocator.tables


# ------------------------------------------------------------------ engine: equal outputs (tiny model, fast)
@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from minisys.model import load
    return load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)


def serve(model, tok, reqs, cfg, add_every=0):
    """Run (id, ids, params) through an LLMEngine; check budget and leaks; return ({id: tokens}, engine)."""
    engine = LLMEngine(model, tok, cfg)
    inner = engine.scheduler.schedule

    def checked():
        out = inner()
        assert out.num_tokens <= engine.config.max_num_batched_tokens
        return out
    engine.scheduler.schedule = checked
    pending, done, steps = list(reqs), {}, 0
    while pending or engine.has_unfinished():
        if pending and (not add_every or steps % add_every == 0):
            rid, ids, sp = pending.pop(0)
            engine.add_request(rid, ids, sp)
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        engine.scheduler.check_invariants()
        steps += 1
    alloc = engine.scheduler.allocator
    assert alloc.num_free == alloc.num_blocks and not alloc.tables
    return done, engine


@pytest.fixture(scope="module")
def tiny_cases(tiny):
    model, tok = tiny
    words = "the quick brown fox jumps over the lazy dog ".split()
    prompts = [tok.encode(" ".join(words[(3 * i) % 9:] + words * (2 * (i % 4)))) for i in range(5)]
    sps = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(5)]
    gen = EagerGenerator(model, tok)
    ref = {str(i): gen.generate(p, sp).token_ids for i, (p, sp) in enumerate(zip(prompts, sps))}
    return [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, sps))], ref


@pytest.mark.parametrize("budget,add_every", [(3, 0), (5, 2), (16, 0), (64, 3)])
def test_chunked_greedy_equals_eager_for_any_budget(tiny, tiny_cases, budget, add_every):
    model, tok = tiny
    reqs, ref = tiny_cases
    assert max(len(p) for _, p, _ in reqs) > 3 * min(budget, 16)          # a prompt spans several steps
    cfg = EngineConfig(block_size=4, num_kv_blocks=128, max_num_seqs=3, max_num_batched_tokens=budget,
                       enable_chunked_prefill=True)
    done, engine = serve(model, tok, reqs, cfg, add_every)
    assert done == ref
    assert engine.stats.generated_tokens == sum(len(t) for t in ref.values())


@pytest.mark.parametrize("prefix", [False, True])
def test_chunked_greedy_equals_eager_under_preemption(tiny, tiny_cases, prefix):
    model, tok = tiny
    reqs, ref = tiny_cases
    cfg = EngineConfig(block_size=2, num_kv_blocks=40, max_num_seqs=4, max_num_batched_tokens=6,
                       enable_chunked_prefill=True, enable_prefix_caching=prefix)
    done, engine = serve(model, tok, reqs, cfg)
    assert engine.stats.preemptions > 0
    assert done == ref


def test_seeded_sampling_is_the_same_with_and_without_chunks(tiny, tiny_cases):
    """A chunk inside the prompt must not draw from the request's generator."""
    model, tok = tiny
    reqs, _ = tiny_cases
    sampled = [(rid, p, SamplingParams(temperature=0.9, seed=int(rid), max_tokens=6, ignore_eos=True))
               for rid, p, _ in reqs]
    base, _ = serve(model, tok, sampled, EngineConfig(num_kv_blocks=128, max_num_seqs=3, enable_chunked_prefill=False))
    chunked, _ = serve(model, tok, sampled, EngineConfig(num_kv_blocks=128, max_num_seqs=3, max_num_batched_tokens=4,
                                                         enable_chunked_prefill=True))
    assert chunked == base


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_smol_long_prompts_across_many_steps_with_preemption_equal_eager(smol):
    model, tok = smol
    old = model.attention
    model.set_attention_backend("paged")
    try:
        text = "Chunked prefill splits a long prompt into pieces that share each step with the decodes. "
        prompts = [tok.encode(text * 6), tok.encode("The sky is"), tok.encode(text * 3 + "In short,")]
        sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 12, 8)]
        gen = EagerGenerator(model, tok)
        ref = {str(i): gen.generate(p, sp).token_ids for i, (p, sp) in enumerate(zip(prompts, sps))}
        reqs = [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, sps))]
        # 121 + 12 tokens grow to 17 blocks of 8, the whole pool: the short request is preempted
        cfg = EngineConfig(block_size=8, num_kv_blocks=17, max_num_seqs=3, max_num_batched_tokens=32,
                           enable_chunked_prefill=True, enable_prefix_caching=False)
        done, engine = serve(model, tok, reqs, cfg)
        assert done == ref
        assert len(prompts[0]) > 3 * 32                       # the long prompt spans many steps
        assert engine.stats.preemptions > 0
    finally:
        model.set_attention_backend(old)


# ------------------------------------------------------------------ the online benchmark's driver and workload
def test_online_workload_is_seeded_and_in_its_ranges():
    from minisys.bench.chunked import WorkloadSpec, make_online_workload
    spec = WorkloadSpec(num_requests=200, rate=2.0, long_frac=0.3, seed=3)
    a, b = make_online_workload(spec), make_online_workload(spec)
    assert [(w.arrival, w.prompt_ids, w.max_tokens) for w in a] == [(w.arrival, w.prompt_ids, w.max_tokens) for w in b]
    assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
    longs = [w for w in a if w.kind == "long"]
    assert 0.2 < len(longs) / len(a) < 0.4
    for w in a:
        (lo, hi), (olo, ohi) = ((spec.long_prompt, spec.long_output) if w.kind == "long"
                                else (spec.short_prompt, spec.short_output))
        assert lo <= len(w.prompt_ids) <= hi and olo <= w.max_tokens <= ohi


def test_run_online_adds_on_arrival_and_stamps_each_step_with_new_tokens():
    """A fake engine whose steps take 20 ms and give every running request one token."""
    import time
    from types import SimpleNamespace
    from minisys.bench.chunked import OnlineRequest, run_online

    class FakeEngine:
        def __init__(self):
            self.running, self.added_at, self.t0 = {}, {}, time.perf_counter()

        def add_request(self, rid, ids, sp):
            self.running[rid] = [sp.max_tokens, []]
            self.added_at[rid] = time.perf_counter() - self.t0

        def has_unfinished(self):
            return bool(self.running)

        def step(self):
            time.sleep(0.02)
            outs = []
            for rid, (n, toks) in list(self.running.items()):
                toks.append(1)
                outs.append(SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=list(toks))]))
                if len(toks) == n:
                    del self.running[rid]
            return outs

    work = [OnlineRequest(0.0, [1, 2], 3, "short"), OnlineRequest(0.3, [3], 2, "short")]
    eng = FakeEngine()
    traces, duration = run_online(eng, work)
    assert eng.added_at["1"] >= 0.3 - 1e-3                 # not added before its arrival time
    assert [t.output_tokens for t in traces] == [3, 2] and [len(t.token_times) for t in traces] == [3, 2]
    assert all(t.token_times[0] >= t.arrival for t in traces)
    assert all(0.015 < g < 0.5 for t in traces for g in t.itls)
    assert duration >= traces[1].token_times[-1] >= 0.3 + 0.04
