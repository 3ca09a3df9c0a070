"""Lab 05 tests: splitting the token budget, and the chunked scheduler.

Oracles: splits and step decisions worked out by hand from the rules
(decodes first, chunks in line, FCFS admission, no admission in a step that
preempted); properties recomputed independently (the budget is never
exceeded, a prompt is cut only after every prompt before it got all it
needed, a queued request waits only while the budget, the sequences or the
blocks are full, nothing leaks); and, end to end, the eager baseline's greedy
tokens on a tiny model with the student's scheduler inside the real engine.
"""
from __future__ import annotations

import random
import types

import pytest
import torch

from minisys.engine.config import EngineConfig
from minisys.engine.request import Request
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import Scheduler


def reference_impl():
    from minisys.engine.scheduler import split_budget
    return types.SimpleNamespace(split_budget=split_budget, schedule_chunked=Scheduler.schedule)


def make(blocks=64, bs=4, seqs=4, budget=8, prefix=False):
    return Scheduler(EngineConfig(block_size=bs, num_kv_blocks=blocks, max_num_seqs=seqs, max_num_batched_tokens=budget,
                                  max_model_len=256, enable_prefix_caching=prefix, enable_chunked_prefill=True))


def req(rid, n, max_tokens, base=0):
    return Request(str(rid), [(base + i) % 97 for i in range(n)], SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens)


def step(impl, s, token=3):
    """One step with a fake model; checks the budget and that the queue head waits only when something is full."""
    out = impl.schedule_chunked(s)
    budget = s.config.max_num_batched_tokens
    assert out.num_tokens <= budget, "the step exceeds the token budget"
    if s.waiting and not out.preempted:
        assert (out.num_tokens == budget or len(s.running) == s.config.max_num_seqs
                or not s.allocator.can_allocate(s.waiting[0].num_tokens)), "a queued request starves"
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


# ------------------------------------------------------------------ split_budget
@pytest.mark.points(2)
@pytest.mark.exercise("split_budget")
def test_split_budget_by_hand(impl):
    assert impl.split_budget(256, 8, [1500]) == [248]
    assert impl.split_budget(16, 2, [5, 20, 7]) == [5, 9, 0]
    assert impl.split_budget(10, 0, [3, 3]) == [3, 3]
    assert impl.split_budget(4, 4, [9]) == [0]
    assert impl.split_budget(8, 1, []) == []
    with pytest.raises(ValueError):
        impl.split_budget(2, 3, [1])


@pytest.mark.points(2)
@pytest.mark.exercise("split_budget")
@pytest.mark.parametrize("seed", range(3))
def test_split_budget_fills_in_line_and_never_overflows(impl, seed):
    rng = random.Random(seed)
    for _ in range(200):
        budget = rng.randint(1, 64)
        decodes = rng.randint(0, budget)
        remaining = [rng.randint(1, 40) for _ in range(rng.randint(0, 6))]
        chunks = impl.split_budget(budget, decodes, remaining)
        assert len(chunks) == len(remaining)
        assert all(0 <= c <= r for c, r in zip(chunks, remaining))
        assert decodes + sum(chunks) == min(budget, decodes + sum(remaining))     # no room wasted
        for i, c in enumerate(chunks):
            if c:
                assert all(chunks[j] == remaining[j] for j in range(i)), "a prompt was served out of line"


# ------------------------------------------------------------------ schedule_chunked
@pytest.mark.points(2)
@pytest.mark.exercise("schedule_chunked")
def test_decodes_first_and_a_long_prompt_is_cut(impl):
    s = make(budget=8)
    s.add(req("a", 5, 6))
    assert ran(step(impl, s)) == [("a", 5)]
    s.add(req("long", 20, 2, base=20))
    assert ran(step(impl, s)) == [("a", 1), ("long", 7)]
    assert ran(step(impl, s)) == [("a", 1), ("long", 7)]
    assert s.running[1].output_token_ids == []                # no token for a chunk inside the prompt
    assert ran(step(impl, s)) == [("a", 1), ("long", 6)]
    assert s.running[1].output_token_ids == [3]
    assert ran(step(impl, s)) == [("a", 1), ("long", 1)]


@pytest.mark.points(2)
@pytest.mark.exercise("schedule_chunked")
def test_any_prompt_can_be_split_and_admission_is_fcfs(impl):
    s = make(budget=8)
    for i in range(3):
        s.add(req(i, 5, 3, base=10 * i))
    assert ran(step(impl, s)) == [("0", 5), ("1", 3)]
    assert ran(step(impl, s)) == [("0", 1), ("1", 2), ("2", 5)]
    s = make(budget=8, seqs=2)
    for i in range(3):
        s.add(req(i, 2, 3, base=10 * i))
    assert ran(step(impl, s)) == [("0", 2), ("1", 2)]         # max_num_seqs
    s = make(budget=32, blocks=3)
    for i, n in enumerate([8, 8, 2]):
        s.add(req(i, n, 2, base=30 * i))
    assert ran(step(impl, s)) == [("0", 8)]                   # blocks: 2 may not jump the queue


@pytest.mark.points(2)
@pytest.mark.exercise("schedule_chunked")
def test_no_admission_in_a_step_that_preempted_but_chunks_go_on(impl):
    s = make(blocks=6, budget=4, seqs=3)
    s.add(req("a", 4, 12))
    step(impl, s)                                             # a: 1 block
    s.add(req("b", 16, 2, base=20))
    step(impl, s)                                             # a: 2 blocks, b: 4 blocks, 3 of 16 computed
    s.add(req("c", 2, 2, base=60))
    outs = [step(impl, s) for _ in range(4)]                  # a needs a 3rd block at its 9th token
    hit = [o for o in outs if o.preempted]
    assert hit and [r.request_id for r in hit[0].preempted] == ["b"]
    assert ran(hit[0]) == [("a", 1)]                          # c is not admitted in that step
    assert [r.request_id for r in s.waiting][:1] == ["b"]


@pytest.mark.points(3)
@pytest.mark.exercise("schedule_chunked")
@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_never_starve_and_free_every_block(impl, seed):
    rng = random.Random(seed)
    seqs = rng.randint(1, 4)
    budget = seqs + rng.randint(0, 10)
    s = make(blocks=rng.randint(10, 20), bs=rng.choice([2, 4]), seqs=seqs, budget=budget)
    reqs = []
    for i in range(12):
        r = req(i, rng.randint(1, 30), rng.randint(1, 6), base=7 * i)
        s.add(r)
        reqs.append(r)
    steps = 0
    while s.has_unfinished():
        step(impl, s)
        steps += 1
        assert steps < 3000, "no progress"
    assert all(r.is_finished and len(r.output_token_ids) == r.max_tokens for r in reqs)
    assert s.allocator.num_free == s.allocator.num_blocks and not s.allocator.tables


@pytest.mark.points(4)
@pytest.mark.exercise("schedule_chunked")
def test_student_scheduler_in_the_real_engine_equals_eager(impl, tiny_dirs):
    from minisys.engine.eager import EagerGenerator
    from minisys.engine.llm_engine import LLMEngine
    from minisys.model import load
    model, tok = load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)
    words = "the quick brown fox jumps over the lazy dog ".split()
    prompts = [tok.encode(" ".join(words * k)) for k in (3, 1, 5, 2)]
    sps = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(4)]
    ref = [EagerGenerator(model, tok).generate(p, sp).token_ids for p, sp in zip(prompts, sps)]
    engine = LLMEngine(model, tok, EngineConfig(block_size=2, num_kv_blocks=40, max_num_seqs=3,
                                                max_num_batched_tokens=5, enable_chunked_prefill=True))
    engine.scheduler.schedule = lambda: impl.schedule_chunked(engine.scheduler)
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert [done[str(i)] for i in range(4)] == ref
    assert max(len(p) for p in prompts) > 5 * 5                # prompts span many steps
    assert engine.scheduler.allocator.num_free == 40
