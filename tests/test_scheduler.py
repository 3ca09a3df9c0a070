"""Request state machine and the scheduler's step decision, without a model (fake tokens)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisys.engine.config import EngineConfig
from minisys.engine.request import ALLOWED_TRANSITIONS, IllegalTransition, Request, RequestStatus
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import Scheduler

W, R, P, F = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED, RequestStatus.FINISHED


def make_sched(blocks=16, block_size=4, max_num_seqs=4, batched=64, max_len=256, prefix=True):
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=batched, max_model_len=max_len, enable_prefix_caching=prefix,
                       enable_chunked_prefill=False)            # lesson 04's prefill-first policy
    s = Scheduler(cfg)
    s.allocator.debug = True
    return s


def req(rid, n_prompt, max_tokens, base=0):
    return Request(str(rid), [(base + i) % 50 for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens)


def run_step(s: Scheduler, token=7):
    """One step with a fake model: every scheduled request gets `token`; finish at max_tokens."""
    out = s.schedule()
    s.update_computed(out)
    for sr in out.scheduled:
        r = sr.request
        assert r.num_computed_tokens == r.num_tokens
        r.output_token_ids.append(token)
        if len(r.output_token_ids) >= r.max_tokens:
            s.finish(r, "length")
    s.check_invariants()
    return out


def drain(s, limit=10_000):
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < limit, "the scheduler made no progress"
    return steps


# ------------------------------------------------------------------ state machine
def test_transition_table_is_the_documented_one():
    assert ALLOWED_TRANSITIONS == {W: {R, F}, R: {P, F}, P: {W}, F: set()}


@pytest.mark.parametrize("src", list(RequestStatus))
@pytest.mark.parametrize("dst", list(RequestStatus))
def test_every_illegal_transition_raises(src, dst):
    r = req("a", 3, 2)
    r.status = src
    if dst in ALLOWED_TRANSITIONS[src]:
        r.transition(dst)
        assert r.status is dst
    else:
        with pytest.raises(IllegalTransition, match=f"{src.name} -> {dst.name}"):
            r.transition(dst)


def test_config_is_validated_once():
    with pytest.raises(ValueError, match="at most one"):
        EngineConfig(num_kv_blocks=4, kv_cache_bytes=10**6)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=">= max_num_seqs"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="kv_memory_fraction"):
        EngineConfig(kv_memory_fraction=1.5)
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        EngineConfig(enable_chunked_prefill="yes")
    with pytest.raises(ValueError, match="resolved"):
        Scheduler(EngineConfig())


# ------------------------------------------------------------------ admission
def test_prefills_and_decodes_mix_in_one_step_and_finished_leave_at_once():
    s = make_sched(max_num_seqs=4)
    s.add(req("a", 5, 3))
    out = run_step(s)
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 5)]
    s.add(req("b", 6, 1, base=10))
    out = run_step(s)                      # a decodes while b prefills, in one step
    assert [(x.request.request_id, x.num_tokens) for x in out.scheduled] == [("a", 1), ("b", 6)]
    assert [r.request_id for r in s.running] == ["a"]      # b finished after 1 token: retired now
    drain(s)
    assert s.allocator.num_free == s.allocator.num_blocks


def test_admission_respects_max_num_seqs_token_budget_and_fcfs():
    s = make_sched(max_num_seqs=2, batched=12, blocks=64)
    for i, n in enumerate([5, 5, 3]):
        s.add(req(i, n, 4, base=10 * i))
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]     # max_num_seqs
    s2 = make_sched(max_num_seqs=8, batched=12, blocks=64)
    for i, n in enumerate([5, 8, 3]):
        s2.add(req(i, n, 4, base=10 * i))
    out = run_step(s2)
    # 5 fits, 8 does not fit the remaining 7 tokens; FCFS: 3 does not jump the queue
    assert [x.request.request_id for x in out.scheduled] == ["0"]
    drain(s)
    drain(s2)


def test_admission_waits_for_blocks():
    s = make_sched(blocks=4, block_size=4, max_num_seqs=8)
    s.add(req("a", 8, 2))          # 2 blocks, grows to 3
    s.add(req("b", 8, 2, base=20))  # 2 blocks
    s.add(req("c", 4, 2, base=40))
    out = run_step(s)
    assert [x.request.request_id for x in out.scheduled] == ["a", "b"]
    drain(s)
    assert s.allocator.num_free == 4 and not s.waiting and not s.running


# ------------------------------------------------------------------ preemption
def test_newest_running_request_is_preempted_and_requeued_at_the_head():
    s = make_sched(blocks=6, block_size=4, max_num_seqs=8, prefix=False)
    for i in range(3):
        s.add(req(i, 8, 10, base=10 * i))  # 2 blocks each: the pool is full after admission
    run_step(s)
    assert [r.request_id for r in s.running] == ["0", "1", "2"]
    s.add(req("late", 2, 2))
    out = run_step(s)                      # every one needs a new block: "2" (newest) goes, then "1"
    assert [r.request_id for r in out.preempted] == ["2"]
    assert [r.request_id for r in s.waiting] == ["2", "late"]
    victim = out.preempted[0]
    assert victim.status is W and victim.num_computed_tokens == 0 and victim.output_token_ids == [7]
    assert victim.num_preemptions == 1 and s.num_preemptions == 1
    drain(s)
    assert s.num_preemptions >= 1 and s.allocator.num_free == 6


def test_a_lone_request_preempts_itself_only_when_it_cannot_fit_with_others():
    s = make_sched(blocks=3, block_size=4, max_num_seqs=8, prefix=False)
    s.add(req("a", 4, 9))                  # needs all 3 blocks at the end
    s.add(req("b", 4, 4, base=20))
    drain(s)
    assert s.num_preemptions >= 1 and s.allocator.num_free == 3


def test_requests_that_can_never_fit_are_refused_with_a_clear_error():
    s = make_sched(blocks=4, block_size=4, batched=64, max_len=256)
    with pytest.raises(ValueError, match="whole pool has 4"):
        s.add(req("big", 10, 10))          # 19 slots > 16
    with pytest.raises(ValueError, match="exceeds the model's context"):
        s.add(req("long", 200, 100))
    s2 = make_sched(blocks=64, batched=8)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        s2.add(req("wide", 6, 4))
    assert not s.has_unfinished() and not s2.has_unfinished()
    s.add(req("ok", 8, 9))                 # exactly 16 slots: fits
    drain(s)


def test_abort_in_any_state_frees_everything():
    s = make_sched(blocks=8, block_size=4, max_num_seqs=2)
    rs = [req(i, 5, 6, base=10 * i) for i in range(4)]
    for r in rs:
        s.add(r)
    run_step(s)
    s.finish(rs[0], "abort")               # running
    s.finish(rs[3], "abort")               # waiting
    assert rs[0].status is F and rs[0].finish_reason == "abort" and rs[3].status is F
    with pytest.raises(IllegalTransition):
        s.finish(rs[0], "abort")           # finished is terminal
    drain(s)
    assert s.allocator.num_free == 8 and all(r.is_finished for r in rs)


# ------------------------------------------------------------------ property: nothing is lost
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 3)),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops=ops, blocks=st.integers(4, 16), block_size=st.sampled_from([1, 2, 4]),
       max_num_seqs=st.integers(1, 5), prefix=st.booleans())
def test_random_streams_of_add_abort_step_lose_nothing_and_leak_no_block(ops, blocks, block_size, max_num_seqs, prefix):
    s = make_sched(blocks=blocks, block_size=block_size, max_num_seqs=max_num_seqs, batched=64, prefix=prefix)
    added, refused = [], []
    for op in ops:
        if op[0] == "add":
            r = req(len(added) + len(refused), op[1], op[2], base=3 * len(added))
            try:
                s.add(r)
                added.append(r)
            except ValueError:
                refused.append(r)
                assert r.status is W and r.request_id not in s.allocator.tables
        elif op[0] == "abort" and added:
            r = added[op[1] % len(added)]
            if not r.is_finished:
                s.finish(r, "abort")
        else:
            for _ in range(op[1]):
                run_step(s)
        s.check_invariants()
    drain(s)
    assert all(r.is_finished for r in added)
    assert all(r.finish_reason == "abort" or len(r.output_token_ids) == r.max_tokens for r in added)
    assert not s.waiting and not s.running and not s.allocator.tables
    assert s.allocator.num_free == s.allocator.num_blocks
    s.allocator.check_invariants()


# ------------------------------------------------------------------ abort cost
def test_finishing_many_waiting_sequences_is_linear_in_their_number():
    """Aborting a request's 10,000 queued sequences behind 10,000 others costs O(its sequences), not a
    scan of the queue per sequence (a deque's remove made this ~10^8 comparisons: seconds)."""
    import time
    s = make_sched(blocks=16, max_num_seqs=4)
    others = [req(f"o{i}", 4, 2) for i in range(10_000)]
    mine = [req(f"m{i}", 4, 2) for i in range(10_000)]
    for r in others + mine:
        s.add(r)
    t0 = time.perf_counter()
    for r in reversed(mine):                       # the worst order for a front-to-back scan
        s.finish(r, "abort")
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"finishing 10,000 waiting sequences took {elapsed:.2f} s"
    assert len(s.waiting) == 10_000 and s.waiting[0].request_id == "o0"
    assert [r.request_id for r in s.waiting][-1] == "o9999"
    s.check_invariants()


def test_waiting_queue_keeps_deque_order_and_refuses_a_double_entry():
    from minisys.engine.scheduler import WaitingQueue
    q = WaitingQueue()
    a, b, c = req("a", 4, 2), req("b", 4, 2), req("c", 4, 2)
    q.append(a), q.append(b), q.appendleft(c)
    assert [r.request_id for r in q] == ["c", "a", "b"] and q[0] is c and q[-1] is b and len(q) == 3
    with pytest.raises(ValueError, match="already waiting"):
        q.append(a)
    q.remove(a)
    with pytest.raises(ValueError, match="not waiting"):
        q.remove(a)
    assert q.popleft() is c and q.popleft() is b and not q
    with pytest.raises(IndexError):
        q.popleft()
