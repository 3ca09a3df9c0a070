"""Lab 04 tests: the scheduler's step decision and the batch assembly.

Oracles: decisions worked out by hand from the rules (FCFS admission, the
newest running request is the victim, no admission in a step that
preempted); invariants recomputed from the queues and the allocator (every
block free at the end, every request finished with all its tokens); the slot
formula written out per token; and, end to end, the eager baseline's greedy
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
    from minisys.engine import model_runner

    def schedule(sched):
        return Scheduler.schedule(sched)

    def build_batch(scheduled, allocator):
        from minisys.engine.scheduler import SchedulerOutput
        b = model_runner.build_batch(SchedulerOutput(scheduled=list(scheduled)), allocator, "cpu")
        return {"input_ids": b.input_ids.tolist(), "positions": b.positions.tolist(),
                "slot_mapping": b.meta.slot_mapping.tolist(), "seqlens_q": list(b.meta.seqlens_q),
                "context_lens": list(b.meta.context_lens), "logits_indices": b.logits_indices.tolist()}

    return types.SimpleNamespace(schedule=schedule, build_batch=build_batch)


def make(blocks=16, bs=4, seqs=4, budget=64, prefix=False):
    return Scheduler(EngineConfig(block_size=bs, num_kv_blocks=blocks, max_num_seqs=seqs,
                                  max_num_batched_tokens=budget, max_model_len=256, enable_prefix_caching=prefix,
                                  enable_chunked_prefill=False))       # lesson 04's prefill-first policy


def req(rid, n, max_tokens, base=0):
    return Request(str(rid), [(base + i) % 97 for i in range(n)], SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens)


def step(impl, s, token=3):
    out = impl.schedule(s)
    s.update_computed(out)
    for sr in out.scheduled:
        sr.request.output_token_ids.append(token)
        if len(sr.request.output_token_ids) >= sr.request.max_tokens:
            s.finish(sr.request, "length")
    s.check_invariants()
    return out


def ran(out):
    return [(x.request.request_id, x.num_tokens) for x in out.scheduled]


@pytest.mark.points(2)
@pytest.mark.exercise("schedule")
def test_admission_mixes_prefill_with_decodes(impl):
    s = make()
    s.add(req("a", 5, 4))
    assert ran(step(impl, s)) == [("a", 5)]
    s.add(req("b", 3, 4, base=20))
    assert ran(step(impl, s)) == [("a", 1), ("b", 3)]


@pytest.mark.points(2)
@pytest.mark.exercise("schedule")
def test_admission_limits_are_fcfs(impl):
    s = make(seqs=2, blocks=64)
    for i, n in enumerate([4, 4, 2]):
        s.add(req(i, n, 3, base=10 * i))
    assert ran(step(impl, s)) == [("0", 4), ("1", 4)]                     # max_num_seqs
    s = make(seqs=8, budget=10, blocks=64)
    for i, n in enumerate([5, 8, 2]):
        s.add(req(i, n, 3, base=10 * i))
    assert ran(step(impl, s)) == [("0", 5)]                               # budget; 2 may not jump the queue
    s = make(seqs=8, blocks=4)
    for i, n in enumerate([8, 8, 4]):
        s.add(req(i, n, 2, base=30 * i))
    assert ran(step(impl, s)) == [("0", 8), ("1", 8)]                     # blocks


@pytest.mark.points(2)
@pytest.mark.exercise("schedule")
def test_a_prompt_of_exactly_the_budget_is_admitted(impl):
    s = make(budget=8, blocks=64)
    s.add(req("a", 8, 1))      # one output token: its worst-case recompute is the prompt alone
    assert ran(step(impl, s)) == [("a", 8)], \
        "a prompt of exactly max_num_batched_tokens fits the budget (a longer one would wait forever)"
    s = make(budget=10, blocks=64)
    s.add(req("a", 4, 4))
    step(impl, s)
    s.add(req("b", 9, 1, base=30))
    assert ran(step(impl, s)) == [("a", 1), ("b", 9)], "1 decode + 9 prompt tokens = the budget of 10"


@pytest.mark.points(3)
@pytest.mark.exercise("schedule")
def test_newest_running_request_is_preempted(impl):
    s = make(blocks=6, seqs=8)
    for i in range(3):
        s.add(req(i, 8, 10, base=10 * i))
    step(impl, s)
    s.add(req("late", 2, 2))
    out = step(impl, s)
    assert [r.request_id for r in out.preempted] == ["2"]
    assert ran(out) == [("0", 1), ("1", 1)]                                # no admission after a preemption
    assert [r.request_id for r in s.waiting] == ["2", "late"]
    assert [r.request_id for r in s.running] == ["0", "1"]


@pytest.mark.points(3)
@pytest.mark.exercise("schedule")
@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_finish_and_free_every_block(impl, seed):
    rng = random.Random(seed)
    s = make(blocks=rng.randint(8, 14), bs=rng.choice([2, 4]), seqs=rng.randint(1, 5))
    reqs = []
    for i in range(12):
        r = req(i, rng.randint(1, 8), rng.randint(1, 8), base=7 * i)
        s.add(r)
        reqs.append(r)
    steps = 0
    while s.has_unfinished():
        step(impl, s)
        steps += 1
        assert steps < 2000, "no progress"
    assert all(r.is_finished and len(r.output_token_ids) == r.max_tokens for r in reqs)
    assert s.allocator.num_free == s.allocator.num_blocks and not s.allocator.tables


@pytest.mark.points(3)
@pytest.mark.exercise("build_batch")
def test_build_batch_flat_layout(impl):
    s = make(blocks=16)
    s.allocator = type(s.allocator)(16, 4, enable_prefix_caching=False, seed=3)   # shuffled block ids
    a, b = req("a", 6, 5), req("b", 3, 5, base=40)
    s.add(a)
    s.update_computed(Scheduler.schedule(s))
    a.output_token_ids.append(77)
    s.add(b)
    out = Scheduler.schedule(s)
    got = impl.build_batch(out.scheduled, s.allocator)
    ta, tb = s.allocator.tables["a"].block_ids, s.allocator.tables["b"].block_ids
    slot = lambda t, p: t[p // 4] * 4 + p % 4
    assert got["input_ids"] == [77] + b.prompt_token_ids
    assert got["positions"] == [6, 0, 1, 2]
    assert got["slot_mapping"] == [slot(ta, 6)] + [slot(tb, p) for p in range(3)]
    assert got["seqlens_q"] == [1, 3] and got["context_lens"] == [6, 0]
    assert got["logits_indices"] == [0, 3]


@pytest.mark.points(4)
@pytest.mark.exercise("schedule")
def test_student_scheduler_in_the_real_engine_equals_eager(impl, tiny_dirs):
    from minisys.engine.eager import EagerGenerator
    from minisys.engine.llm_engine import LLMEngine
    from minisys.model import load
    model, tok = load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged", quiet=True)
    prompts = [tok.encode(t) for t in ["the quick", "brown fox jumps", "over the lazy dog", "the"]]
    sps = [SamplingParams(temperature=0, max_tokens=5 + 4 * i, ignore_eos=True) for i in range(4)]
    ref = [EagerGenerator(model, tok).generate(p, sp).token_ids for p, sp in zip(prompts, sps)]
    engine = LLMEngine(model, tok, EngineConfig(block_size=2, num_kv_blocks=12, max_num_seqs=3,
                                                enable_chunked_prefill=False))
    engine.scheduler.schedule = lambda: impl.schedule(engine.scheduler)
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        engine.add_request(str(i), p, sp)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert [done[str(i)] for i in range(4)] == ref
    assert engine.stats.preemptions > 0
    assert engine.scheduler.allocator.num_free == 12
