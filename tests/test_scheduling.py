"""Lesson 08's scheduling policies on the scheduler alone (no model): fast, with generated workloads.

Oracles: QoE against a numerical integration of the two delivery curves;
fairness against service recomputed here from what each step scheduled
(prompt tokens x w_in + decode tokens x w_out), never the policy's own
counters; priority and Andes against their stated rules; the allocator's
invariants after every step of random streams with aborts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisys.engine.config import EngineConfig
from minisys.engine.request import Request, RequestStatus
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import Scheduler
from minisys.scheduling import QoESpec, fairness_bound, max_service_gap, qoe
from minisys.scheduling.qoe import qoe_numeric

W_IN, W_OUT = 1.0, 2.0


class StepClock:
    """A virtual clock: ``dt`` seconds per scheduler step."""

    def __init__(self, dt: float = 0.05) -> None:
        self.now, self.dt = 0.0, dt

    def __call__(self) -> float:
        return self.now


@dataclass
class Arrival:
    step: int
    client: str
    prompt_len: int
    max_tokens: int
    priority: int = 0


def config(policy: str, **kw) -> EngineConfig:
    base = dict(block_size=4, num_kv_blocks=48, max_num_seqs=4, max_num_batched_tokens=32,
                max_model_len=64, enable_chunked_prefill=True, scheduling_policy=policy)
    base.update(kw)
    return EngineConfig(**base)


class Sim:
    """Drive a `Scheduler` step by step; the "model" emits token 7 for every sampling request."""

    def __init__(self, cfg: EngineConfig, dt: float = 0.05) -> None:
        self.clock = StepClock(dt)
        self.sched = Scheduler(cfg, clock=self.clock)
        self.step_no = 0
        self.service: list[dict[str, float]] = []       # per step, recomputed here (the oracle)
        self.waiting_sets: list[set[str]] = []            # clients with waiting requests, per step
        self.token_times: dict[str, list[float]] = {}
        self.admitted_at: dict[str, float] = {}
        self.reqs: dict[str, Request] = {}
        self.outs = []

    def add(self, rid: str, a: Arrival) -> Request:
        req = Request(rid, [1 + (i % 50) for i in range(a.prompt_len)], SamplingParams(max_tokens=a.max_tokens),
                      max_tokens=a.max_tokens, client=a.client, priority=a.priority)
        self.sched.add(req)
        self.reqs[rid] = req
        return req

    def backlogged(self, x: str, y: str) -> list[bool]:
        return [x in w and y in w for w in self.waiting_sets]

    def step(self) -> None:
        s = self.sched
        self.waiting_sets.append({r.client_key for r in s.waiting})
        out = s.schedule()
        self.outs.append(out)
        served: dict[str, float] = {}
        sampled = []
        for x in out.scheduled:
            r = x.request
            self.admitted_at.setdefault(r.request_id, self.clock.now)
            prompt_phase = r.num_computed_tokens < r.num_tokens - 1 or not r.output_token_ids
            served[r.client_key] = served.get(r.client_key, 0.0) + (W_IN if prompt_phase else W_OUT) * x.num_tokens
            if x.samples:
                sampled.append(r)
        self.service.append(served)
        s.update_computed(out)
        self.clock.now += self.clock.dt
        for r in sampled:
            r.output_token_ids.append(7)
            self.token_times.setdefault(r.request_id, []).append(self.clock.now)
            if len(r.output_token_ids) >= r.max_tokens:
                s.finish(r, "length")
        s.check_invariants()
        self.step_no += 1

    def run(self, arrivals: list[Arrival], max_steps: int = 5000, until_idle: bool = True) -> None:
        pending = sorted(enumerate(arrivals), key=lambda x: x[1].step)
        k = 0
        while self.step_no < max_steps:
            while k < len(pending) and pending[k][1].step <= self.step_no:
                i, a = pending[k]
                self.add(str(i), a)
                k += 1
            if k == len(pending) and until_idle and not self.sched.has_unfinished():
                return
            self.step()
        if until_idle:
            raise AssertionError("the workload did not finish")


# ---------------------------------------------------------------------------------------------- QoE
@settings(max_examples=40, deadline=None)
@given(arrival=st.floats(0, 10), ttft=st.floats(0.05, 3), tds=st.floats(0.5, 20),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=12))
def test_qoe_closed_form_equals_the_integral_of_the_two_curves(arrival, ttft, tds, gaps):
    times = [arrival + sum(gaps[:i + 1]) for i in range(len(gaps))]
    spec = QoESpec(ttft, tds)
    assert qoe(arrival, times, spec) == pytest.approx(qoe_numeric(arrival, times, spec), abs=2e-3)


def test_qoe_is_one_when_on_time_and_drops_with_a_late_start_or_a_stall():
    spec = QoESpec(ttft=1.0, tds=4.0)
    on_time = [0.5 + 0.25 * i for i in range(10)]              # early and at pace: 1
    assert qoe(0.0, on_time, spec) == 1.0
    late = [5.0 + 0.25 * i for i in range(10)]                 # first token 4 s late
    stall = [1.0 + 0.25 * i for i in range(5)] + [6.0 + 0.25 * i for i in range(5)]
    assert qoe(0.0, late, spec) < qoe(0.0, stall, spec) < 1.0
    burst = [3.0] * 10                                          # all at once, late: the reader waited
    assert qoe(0.0, burst, spec) < 1.0


def test_qoe_refuses_a_bad_timeline():
    with pytest.raises(ValueError):
        qoe(1.0, [0.5])                                         # before the arrival
    with pytest.raises(ValueError):
        qoe(0.0, [2.0, 1.0])
    with pytest.raises(ValueError):
        QoESpec(ttft=-1)


# ---------------------------------------------------------------------------------------------- VTC
def heavy_and_light(steps: int = 400, ratio: int = 4) -> list[Arrival]:
    """Client a sends ``ratio`` x the requests of b; both keep requests queued the whole time."""
    out = []
    for t in range(0, steps, 2):
        out += [Arrival(t, "a", 6, 6) for _ in range(ratio)]
        out.append(Arrival(t, "b", 6, 6))
    return out


def bound(cfg: EngineConfig, max_prompt: int) -> float:
    max_batch_tokens = min(cfg.num_kv_blocks * cfg.block_size, cfg.max_num_seqs * cfg.max_model_len)
    return fairness_bound(W_IN, W_OUT, max_prompt, max_batch_tokens)


def test_vtc_keeps_two_backlogged_clients_within_the_bound_while_fcfs_drifts():
    gaps = {}
    for policy in ("fcfs", "vtc"):
        cfg = config(policy, max_model_len=16)
        sim = Sim(cfg)
        sim.run(heavy_and_light(), max_steps=800, until_idle=False)
        flags = sim.backlogged("a", "b")
        gaps[policy] = max_service_gap(sim.service, "a", "b", flags)
        assert sum(flags) > 500                                 # a long busy period
    limit = bound(config("vtc", max_model_len=16), 6)
    assert gaps["vtc"] <= limit
    assert gaps["fcfs"] > 5 * limit                              # grows with the busy period


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 60), st.sampled_from("abc"), st.integers(1, 20), st.integers(1, 10)),
                min_size=4, max_size=60))
def test_vtc_bound_holds_for_generated_arrival_streams(stream):
    cfg = config("vtc")
    sim = Sim(cfg)
    arrivals = [Arrival(t, c, p, m) for t, c, p, m in stream]
    sim.run(arrivals)
    limit = bound(cfg, max(a.prompt_len for a in arrivals))
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        assert max_service_gap(sim.service, x, y, sim.backlogged(x, y)) <= limit


def test_vtc_lifts_a_returning_client_to_the_backlogged_minimum():
    """Idle time is not banked: a client that comes back after others were served starts level."""
    sim = Sim(config("vtc"))
    sim.run([Arrival(0, "a", 8, 8) for _ in range(40)], max_steps=30, until_idle=False)
    pol = sim.sched.policy
    assert pol.counter("a") > 0 and pol.counter("b") == 0
    sim.add("late-b", Arrival(0, "b", 8, 8))
    assert pol.counter("b") == pol.counter("a")                 # the only backlogged client is a
    # b then shares with a instead of taking everything until it caught up
    before = dict(pol.counters)
    for _ in range(20):
        sim.step()
    got_a, got_b = pol.counter("a") - before["a"], pol.counter("b") - before["b"]
    assert got_a > 0 and got_b > 0


# ---------------------------------------------------------------------------------------------- priority
def test_priority_arrival_at_a_full_engine_preempts_a_lower_priority_request_and_starts_first():
    sim = Sim(config("priority", max_num_seqs=2))
    low = [sim.add(f"low{i}", Arrival(0, "x", 6, 20, priority=5)) for i in range(4)]
    for _ in range(3):
        sim.step()
    assert {r.request_id for r in sim.sched.running} == {"low0", "low1"}
    urgent = sim.add("urgent", Arrival(0, "y", 6, 4, priority=-1))
    sim.step()
    out = sim.outs[-1]
    assert urgent.status is RequestStatus.RUNNING
    assert [r.request_id for r in out.displaced] == ["low1"]     # the lowest priority, newest running one
    assert low[2].status is low[3].status is RequestStatus.WAITING   # it went before the earlier waiting ones
    sim.run([])
    assert all(r.is_finished for r in sim.reqs.values())


def test_priority_never_preempts_for_an_equal_or_lower_priority():
    sim = Sim(config("priority", max_num_seqs=2))
    for i in range(2):
        sim.add(f"r{i}", Arrival(0, "x", 6, 10, priority=1))
    sim.step()
    sim.add("same", Arrival(0, "x", 6, 10, priority=1))
    sim.add("lower", Arrival(0, "x", 6, 10, priority=3))
    sim.step()
    assert not sim.outs[-1].displaced and {r.request_id for r in sim.sched.running} == {"r0", "r1"}


# ---------------------------------------------------------------------------------------------- Andes
def burst(n: int, prompt: int = 6, max_tokens: int = 30) -> list[Arrival]:
    return [Arrival(0, f"c{i}", prompt, max_tokens) for i in range(n)]


def qoes(sim: Sim, spec: QoESpec) -> list[float]:
    return [qoe(r.arrival_time, sim.token_times[rid], spec) for rid, r in sim.reqs.items()]


def test_andes_raises_mean_qoe_over_fcfs_on_a_burst_three_times_the_batch():
    spec = QoESpec(ttft=1.0, tds=5.0)          # the engine steps at 20/s: 4x faster than a reader
    result = {}
    for policy in ("fcfs", "andes"):
        sim = Sim(config(policy, max_num_seqs=4, num_kv_blocks=128, max_model_len=128))
        sim.run(burst(12, max_tokens=60))
        q = qoes(sim, spec)
        result[policy] = (sum(q) / len(q), sum(v < 0.9 for v in q) / len(q), sim.step_no)
    assert result["andes"][0] > result["fcfs"][0] + 0.05         # measured: ~1.0 vs ~0.90
    assert result["fcfs"][1] > 0.25
    assert result["andes"][1] < result["fcfs"][1]
    assert result["andes"][2] >= result["fcfs"][2]               # pausing costs recompute steps


def test_andes_pauses_only_requests_far_ahead_of_their_reader():
    sim = Sim(config("andes", max_num_seqs=4, num_kv_blocks=128, max_model_len=128))
    pol = sim.sched.policy
    for i, a in enumerate(burst(12, max_tokens=60)):
        sim.add(str(i), a)
    paused = []
    while sim.sched.has_unfinished():
        sim.step()
        now = sim.clock.now - sim.clock.dt                        # the clock when that step was scheduled
        for r in sim.outs[-1].displaced:
            # the reader is still >= preempt_ahead_s behind its next token (due, with the tokens
            # delivered when it was paused: none was added to it in the step that paused it)
            paused.append(pol.due(r) - now)
    assert paused and min(paused) >= pol.preempt_ahead_s


def test_andes_starves_no_request_under_an_endless_stream():
    """An arrival every 3 steps, a little over what the seats can serve, long prompts among them:
    every request is admitted within the bound stated in `minisys.scheduling.andes` (or the run
    ends before its bound) -- nothing waits forever behind later, more urgent-looking work."""
    cfg = config("andes", max_num_seqs=4, num_kv_blocks=64)
    sim = Sim(cfg)
    stream = [Arrival(3 * t, f"c{t}", 6 if t % 7 else 40, 12) for t in range(300)]
    sim.run(stream, max_steps=900, until_idle=False)
    seats, max_tokens, dt, end = cfg.max_num_seqs, 12, sim.clock.dt, sim.clock.now
    checked = 0
    for r in sim.reqs.values():
        # k: requests that arrived before it and had not finished when it arrived (a request
        # arriving later, or paused later, is due after it)
        k = sum(1 for o in sim.reqs.values() if o is not r and o.arrival_time <= r.arrival_time
                and not (o.is_finished and sim.token_times[o.request_id][-1] <= r.arrival_time))
        limit = r.arrival_time + 1.0 + math.ceil((k + 1) / seats) * (max_tokens + 6) * dt
        if limit > end:
            continue
        checked += 1
        assert r.request_id in sim.admitted_at, f"request {r.request_id} was never admitted"
        assert sim.admitted_at[r.request_id] <= limit
    assert checked > 150
    assert sum(len(o.displaced) for o in sim.outs) > 0          # pausing did happen along the way


# ---------------------------------------------------------------------------------------------- all
@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc", "andes"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(stream=st.lists(st.tuples(st.integers(0, 40), st.sampled_from("abc"), st.integers(1, 30),
                                 st.integers(1, 12), st.integers(-2, 2), st.integers(0, 80)),
                       min_size=1, max_size=40))
def test_no_block_leaks_under_any_policy_with_aborts(policy, stream):
    """Random arrivals, priorities and aborts on a small pool (so blocks run out and preemption
    happens): invariants hold after every step, everything finishes, every block comes back."""
    cfg = config(policy, num_kv_blocks=12, max_num_seqs=3)
    sim = Sim(cfg)
    arrivals = [Arrival(t, c, p, m, pr) for t, c, p, m, pr, _ in stream]
    aborts = {str(i): at for i, (*_, at) in enumerate(stream) if at < 60}
    pending = sorted(enumerate(arrivals), key=lambda x: x[1].step)
    k = 0
    while sim.step_no < 3000:
        while k < len(pending) and pending[k][1].step <= sim.step_no:
            i, a = pending[k]
            sim.add(str(i), a)
            k += 1
        for rid, at in aborts.items():
            r = sim.reqs.get(rid)
            if r is not None and at == sim.step_no and not r.is_finished:
                sim.sched.finish(r, "abort")
        if k == len(pending) and not sim.sched.has_unfinished():
            break
        sim.step()
    assert k == len(pending) and not sim.sched.has_unfinished()
    assert sim.sched.allocator.num_free == cfg.num_kv_blocks
    assert all(r.is_finished for r in sim.reqs.values())


def test_the_server_flags_select_the_policy_and_its_knobs():
    import argparse

    from minisys.server.engine_args import add_engine_args, engine_config_from_args
    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = engine_config_from_args(p.parse_args(["--scheduling-policy", "vtc", "--vtc-output-weight", "3"]))
    assert cfg.scheduling_policy == "vtc" and cfg.vtc_output_weight == 3.0
    assert type(Scheduler(config("vtc", vtc_output_weight=3.0)).policy).__name__ == "VTCPolicy"
    with pytest.raises(SystemExit):
        p.parse_args(["--scheduling-policy", "lottery"])
    with pytest.raises(ValueError, match="vtc_input_weight"):
        EngineConfig(vtc_input_weight=0)
