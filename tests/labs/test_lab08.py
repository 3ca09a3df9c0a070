"""Lab 08 tests: the VTC counter rules, the QoE of a delivered-token timeline, Andes' greedy choice.

Oracles: counter values, picks and QoE worked out by hand from the stated
rules; QoE against an exact integration of the two delivery curves written
here (breakpoints of both staircases, not the closed form); fairness against
the service recomputed here from what each step of the real `Scheduler`
scheduled (prompt tokens x w_in + decode tokens x w_out), never the policy's
own counters, compared with the paper's bound 2U; Andes against its stated
rules and, on a burst, mean QoE (by the exact integral) above FCFS's. Only the
scheduler runs (no model), plus one tiny-model run inside the real engine.
"""
from __future__ import annotations

import random
import types

import pytest

from minisys.engine.config import EngineConfig
from minisys.engine.request import Request
from minisys.engine.sampling_params import SamplingParams
from minisys.engine.scheduler import Scheduler, WaitingQueue
from minisys.scheduling.policy import SchedulingPolicy
from minisys.scheduling.qoe import QoESpec

W_IN, W_OUT = 1.0, 2.0


def reference_impl():
    from minisys.scheduling.andes import AndesPolicy
    from minisys.scheduling.qoe import qoe as qoe_closed_form
    from minisys.scheduling.vtc import VTCPolicy

    def qoe(arrival, token_times, ttft=1.0, tds=5.0):
        return qoe_closed_form(arrival, token_times, QoESpec(ttft, tds))

    def andes(clock, ttft=1.0, tds=5.0, preempt_ahead_s=2.0):
        return AndesPolicy(clock, QoESpec(ttft, tds), preempt_ahead_s)

    # the rules by name too, so that the grader's guard also refuses a notebook calling them as
    # plain functions (e.g. VTCPolicy.pick(self, waiting) from a class of its own)
    rules = (VTCPolicy.on_arrival, VTCPolicy.pick, VTCPolicy.charge,
             AndesPolicy.due, AndesPolicy.pick, AndesPolicy.displace)
    return types.SimpleNamespace(VTC=VTCPolicy, qoe=qoe, Andes=andes, rules=rules)


# ------------------------------------------------------------------ helpers (the oracles)
class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exact_qoe(arrival, times, ttft, tds):
    """∫ min(A, E) / ∫ E over [arrival, T], integrating the two staircases exactly between breakpoints."""
    n = len(times)
    due = [arrival + ttft + j / tds for j in range(n)]
    end = max(times[-1], due[-1])
    points = sorted({arrival, end, *times, *due})
    num = den = 0.0
    for lo, hi in zip(points, points[1:]):
        a = sum(t <= lo for t in times)          # A and E are constant on [lo, hi)
        e = sum(d <= lo for d in due)
        num += min(a, e) * (hi - lo)
        den += e * (hi - lo)
    if den == 0:
        return 1.0 if times[-1] <= due[-1] else 0.0
    return num / den


def request(rid, client="", prompt=6, max_tokens=6, arrival=0, arrival_time=0.0, delivered=0, qoe=None):
    r = Request(str(rid), [1 + i % 50 for i in range(prompt)], SamplingParams(max_tokens=max_tokens),
                max_tokens=max_tokens, client=client, qoe=qoe)
    r.arrival, r.arrival_time = arrival, arrival_time
    r.output_token_ids = [7] * delivered
    return r


def queue(*reqs):
    q = WaitingQueue()
    for r in reqs:
        q.append(r)
    return q


def config(**kw) -> EngineConfig:
    base = dict(block_size=4, num_kv_blocks=48, max_num_seqs=4, max_num_batched_tokens=32,
                max_model_len=64, enable_chunked_prefill=True)
    base.update(kw)
    return EngineConfig(**base)


class Sim:
    """Drive a real `Scheduler` with ``policy`` step by step; the "model" emits token 7.

    Service per step is recomputed here from what ran (a step feeding tokens
    before the last known one, or a request with no output yet, is prompt work)."""

    def __init__(self, cfg: EngineConfig, make_policy, dt: float = 0.05) -> None:
        self.clock = Clock()
        self.dt = dt
        self.policy = make_policy(self.clock)
        self.sched = Scheduler(cfg, clock=self.clock, policy=self.policy)
        self.step_no = 0
        self.service: list[dict[str, float]] = []
        self.waiting_sets: list[set[str]] = []
        self.token_times: dict[str, list[float]] = {}
        self.reqs: dict[str, Request] = {}
        self.outs = []
        self.paused_ahead: list[float] = []     # displaced: how far ahead of its reader (default spec 1 s, 5/s)

    def add(self, rid, client, prompt, max_tokens):
        r = Request(str(rid), [1 + (i + len(self.reqs)) % 50 for i in range(prompt)],
                    SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens, client=client)
        self.sched.add(r)
        self.reqs[r.request_id] = r
        self.token_times[r.request_id] = []
        return r

    def step(self):
        s = self.sched
        self.waiting_sets.append({r.client_key for r in s.waiting})
        out = s.schedule()
        self.outs.append(out)
        for r in out.displaced:
            self.paused_ahead.append(r.arrival_time + 1.0 + len(r.output_token_ids) / 5.0 - self.clock.now)
        served, sampled = {}, []
        for x in out.scheduled:
            r = x.request
            prompt_work = r.num_computed_tokens < r.num_tokens - 1 or not r.output_token_ids
            served[r.client_key] = served.get(r.client_key, 0.0) + (W_IN if prompt_work else W_OUT) * x.num_tokens
            if r.num_computed_tokens + x.num_tokens == r.num_tokens:
                sampled.append(r)
        assert out.num_tokens <= s.config.max_num_batched_tokens
        self.service.append(served)
        s.update_computed(out)
        self.clock.now += self.dt
        for r in sampled:
            r.output_token_ids.append(7)
            self.token_times[r.request_id].append(self.clock.now)
            if len(r.output_token_ids) >= r.max_tokens:
                s.finish(r, "length")
        s.check_invariants()
        self.step_no += 1

    def run(self, arrivals, max_steps=5000, until_idle=True):
        todo = sorted(enumerate(arrivals), key=lambda x: x[1][0])
        k = 0
        while self.step_no < max_steps:
            while k < len(todo) and todo[k][1][0] <= self.step_no:
                i, (_, client, prompt, max_tokens) = todo[k]
                self.add(i, client, prompt, max_tokens)
                k += 1
            if k == len(todo) and until_idle and not self.sched.has_unfinished():
                return
            self.step()
        assert not until_idle, "the workload did not finish"

    def max_gap(self, a, b):
        """max over intervals in one stretch where both are backlogged of |W_a - W_b|."""
        worst, inside = 0.0, False
        for served, waiting in zip(self.service, self.waiting_sets):
            if not {a, b} <= waiting:
                inside = False
                continue
            if not inside:
                d = lo = hi = 0.0
                inside = True
            d += served.get(a, 0.0) - served.get(b, 0.0)
            lo, hi = min(lo, d), max(hi, d)
            worst = max(worst, hi - lo)
        return worst

    def backlogged_steps(self, a, b):
        return sum({a, b} <= w for w in self.waiting_sets)


def two_u(cfg: EngineConfig, longest_prompt: int) -> float:
    """The paper's bound 2U, U = w_in L_in + w_out M; M = the most tokens the running batch can hold."""
    m = min(cfg.num_kv_blocks * cfg.block_size, cfg.max_num_seqs * cfg.max_model_len)
    return 2 * (W_IN * longest_prompt + W_OUT * m)


# ------------------------------------------------------------------ VTC
@pytest.mark.points(1)
@pytest.mark.exercise("VTC")
def test_vtc_charge_counts_weighted_tokens(impl):
    pol = impl.VTC(Clock(), 1.0, 2.0)
    a = request("a1", "a")
    pol.charge(a, 5, 0)
    assert pol.counter("a") == 5                      # 5 prompt tokens x w_in
    pol.charge(a, 0, 3)
    assert pol.counter("a") == 11                     # + 3 decode tokens x w_out
    pol.charge(request("b1", "b"), 2, 1)
    assert pol.counter("b") == 4 and pol.counter("a") == 11
    other = impl.VTC(Clock(), 0.5, 3.0)
    other.charge(a, 4, 2)
    assert other.counter("a") == 8                    # 4 x 0.5 + 2 x 3


@pytest.mark.points(2)
@pytest.mark.exercise("VTC")
def test_vtc_pick_and_lift_by_hand(impl):
    """One hand-worked history of arrivals, picks and charges (the scheduler's calls, made here)."""
    pol, q = impl.VTC(Clock()), WaitingQueue()

    def arrive(r):
        q.append(r)
        pol.on_arrival(r, q)

    def admit():
        r = pol.pick(q)
        q.remove(r)
        return r

    a1 = request("a1", "a")
    arrive(a1)
    assert pol.counter("a") == 0                      # nobody to be lifted to
    assert admit() is a1
    pol.charge(a1, 10, 0)
    pol.charge(a1, 0, 5)                              # a = 10 + 5 x 2 = 20
    assert pol.counter("a") == 20
    b1 = request("b1", "b")
    arrive(b1)                                        # no one else waits: lifted to the last picked (a)
    assert pol.counter("b") == 20
    assert admit() is b1
    pol.charge(b1, 4, 0)                              # b = 24
    a2, a3 = request("a2", "a"), request("a3", "a")
    arrive(a2)                                        # queue empty, last picked b: a lifted 20 -> 24
    assert pol.counter("a") == 24
    pol.charge(a1, 0, 3)                              # a1 still running: a = 30
    arrive(a3)                                        # a already backlogged: no lift
    assert pol.counter("a") == 30
    c1 = request("c1", "c")
    arrive(c1)                                        # lifted to the backlogged minimum, a's 30
    assert pol.counter("c") == 30
    assert admit() is a2                              # tie 30/30: the earlier in the queue
    pol.charge(a2, 6, 0)                              # a = 36
    assert admit() is c1                              # c (30) < a (36)
    pol.charge(c1, 0, 2)                              # c = 34
    d1 = request("d1", "d")
    pol.charge(d1, 100, 0)                            # d was served before (counter 100)
    arrive(d1)                                        # a lift never lowers a counter
    assert pol.counter("d") == 100
    assert admit() is a3                              # a (36) < d (100)
    assert admit() is d1


@pytest.mark.points(1)
@pytest.mark.exercise("VTC")
def test_vtc_pick_takes_the_earliest_request_of_the_smallest_counter(impl):
    pol = impl.VTC(Clock())
    reqs = [request(f"{c}{i}", c) for i, c in enumerate("abab")]
    q = queue(*reqs)
    for r in reqs:
        pol.on_arrival(r, q)
    pol.charge(reqs[0], 7, 0)                         # a = 7, b = 0
    assert pol.pick(q) is reqs[1]                     # b's earliest
    pol.charge(reqs[1], 9, 0)                         # b = 9
    assert pol.pick(q) is reqs[0]


@pytest.mark.points(3)
@pytest.mark.exercise("VTC")
def test_vtc_keeps_a_heavy_and_a_light_client_within_2u_in_the_real_scheduler(impl):
    """Client heavy sends 4x light's requests; both stay backlogged. Service measured from the steps."""
    cfg = config(max_model_len=16)
    arrivals = [(t, c, 6, 6) for t in range(0, 300, 2) for c in ["heavy"] * 4 + ["light"]]
    gaps = {}
    for name, make in (("fcfs", SchedulingPolicy), ("vtc", impl.VTC)):
        sim = Sim(cfg, make)
        sim.run(arrivals, max_steps=300, until_idle=False)
        assert sim.backlogged_steps("heavy", "light") > 250
        gaps[name] = sim.max_gap("heavy", "light")
        if name == "vtc":
            total = {c: sum(s.get(c, 0.0) for s in sim.service) for c in ("heavy", "light")}
    limit = two_u(cfg, 6)
    assert gaps["vtc"] <= limit
    assert gaps["fcfs"] > 3 * limit                   # the gap FCFS lets grow, for scale
    assert total["light"] > 0.8 * total["heavy"]      # equal shares, not 1:4


@pytest.mark.points(3)
@pytest.mark.exercise("VTC")
@pytest.mark.parametrize("seed", range(3))
def test_vtc_bound_holds_for_random_streams_of_three_clients(impl, seed):
    rng = random.Random(seed)
    cfg = config()
    arrivals = [(rng.randint(0, 60), rng.choice("abc"), rng.randint(1, 20), rng.randint(1, 10))
                for _ in range(rng.randint(30, 60))]
    sim = Sim(cfg, impl.VTC)
    sim.run(arrivals)
    assert all(len(sim.token_times[r]) == sim.reqs[r].max_tokens for r in sim.reqs)
    assert sim.sched.allocator.num_free == cfg.num_kv_blocks
    limit = two_u(cfg, max(p for _, _, p, _ in arrivals))
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        assert sim.max_gap(x, y) <= limit


@pytest.mark.points(1)
@pytest.mark.exercise("VTC")
def test_vtc_a_returning_client_shares_instead_of_taking_everything(impl):
    """Idle time is not banked: after a served alone for a while, b comes back and they alternate."""
    sim = Sim(config(), impl.VTC)
    sim.run([(0, "a", 8, 8)] * 40, max_steps=30, until_idle=False)
    sim.add("late-b", "b", 8, 8)
    sim.add("late-b2", "b", 8, 8)
    before = len(sim.service)
    for _ in range(30):
        sim.step()
    got = {c: sum(s.get(c, 0.0) for s in sim.service[before:]) for c in "ab"}
    assert got["a"] > 0 and got["b"] > 0
    assert abs(got["a"] - got["b"]) <= two_u(config(), 8)


# ------------------------------------------------------------------ QoE
@pytest.mark.points(2)
@pytest.mark.exercise("qoe")
def test_qoe_by_hand(impl):
    assert impl.qoe(0.0, [2.0, 2.5, 3.0], 1.0, 2.0) == pytest.approx(1 / 3)     # every token 1 s late
    assert impl.qoe(0.0, [1.0, 1.5, 3.5, 4.0], 1.0, 2.0) == pytest.approx(2 / 3)  # a 1.5 s stall
    assert impl.qoe(0.0, [0.2, 0.3, 0.4], 1.0, 2.0) == pytest.approx(1.0)       # early: read on schedule
    assert impl.qoe(10.0, [11.0, 11.2, 11.4], 1.0, 5.0) == pytest.approx(1.0)   # exactly on time
    assert impl.qoe(0.0, [3.0, 3.0, 3.0], 1.0, 2.0) == pytest.approx(0.0)        # all at once, at the end
    assert impl.qoe(0.0, [1.0], 1.0, 5.0) == 1.0                                 # one token, on time
    assert impl.qoe(0.0, [2.0], 1.0, 5.0) == pytest.approx(0.0)                  # one token, late


@pytest.mark.points(3)
@pytest.mark.exercise("qoe")
@pytest.mark.parametrize("seed", range(3))
def test_qoe_equals_the_integral_of_the_two_curves(impl, seed):
    rng = random.Random(seed)
    for _ in range(150):
        arrival = rng.uniform(0, 10)
        ttft, tds = rng.uniform(0.05, 3), rng.uniform(0.5, 20)
        t, times = arrival, []
        for _ in range(rng.randint(1, 15)):
            t += rng.choice([0.0, rng.uniform(0, 0.3), rng.uniform(0, 3)])
            times.append(t)
        got = impl.qoe(arrival, times, ttft, tds)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(exact_qoe(arrival, times, ttft, tds), abs=1e-9)


@pytest.mark.points(1)
@pytest.mark.exercise("qoe")
def test_qoe_never_rises_when_a_token_before_the_last_comes_later(impl):
    """With the end T fixed (the last token untouched), a later token can only lose reading time.
    (Delaying the *last* token moves T and adds the same area to both curves: see the lesson.)"""
    rng = random.Random(5)
    for _ in range(200):
        times = sorted(rng.uniform(0, 6) for _ in range(rng.randint(2, 10)))
        j = rng.randrange(len(times) - 1)
        later = list(times)
        later[j] = rng.uniform(times[j], times[j + 1])
        assert impl.qoe(0.0, later, 1.0, 2.0) <= impl.qoe(0.0, times, 1.0, 2.0) + 1e-12


# ------------------------------------------------------------------ Andes
@pytest.mark.points(1)
@pytest.mark.exercise("Andes")
def test_andes_due_is_the_next_tokens_due_time(impl):
    pol = impl.Andes(Clock(), ttft=1.0, tds=5.0, preempt_ahead_s=2.0)
    assert pol.due(request(0, arrival_time=3.0)) == pytest.approx(4.0)                 # e_1 = a + ttft
    assert pol.due(request(1, arrival_time=3.0, delivered=10)) == pytest.approx(6.0)   # e_11 = a + 1 + 10/5
    own = request(2, arrival_time=3.0, delivered=4, qoe=QoESpec(ttft=0.5, tds=2.0))
    assert pol.due(own) == pytest.approx(5.5)                                          # the request's own spec


@pytest.mark.points(1)
@pytest.mark.exercise("Andes")
def test_andes_picks_the_earliest_due_then_the_earliest_arrival(impl):
    pol = impl.Andes(Clock(5.0))
    ahead = request("ahead", arrival=0, arrival_time=0.0, delivered=30)    # due 7.0
    fresh = request("fresh", arrival=1, arrival_time=4.5)                  # due 5.5
    older = request("older", arrival=2, arrival_time=1.0, delivered=15)    # due 5.0
    assert pol.pick(queue(ahead, fresh, older)) is older
    twin_a = request("twin_a", arrival=3, arrival_time=4.0)               # due 5.0, later arrival
    assert pol.pick(queue(twin_a, ahead, older)) is older
    assert pol.pick(queue(ahead, fresh)) is fresh


@pytest.mark.points(2)
@pytest.mark.exercise("Andes")
def test_andes_displaces_only_a_request_far_enough_ahead(impl):
    clock = Clock(10.0)
    pol = impl.Andes(clock, ttft=1.0, tds=5.0, preempt_ahead_s=2.0)
    cand = request("cand", arrival=9, arrival_time=9.5)                     # due 10.5
    near = request("near", arrival=0, arrival_time=5.0, delivered=25)       # due 11.0: 1 s ahead
    far = request("far", arrival=1, arrival_time=2.0, delivered=50)         # due 13.0: 3 s ahead
    edge = request("edge", arrival=2, arrival_time=3.0, delivered=40)       # due 12.0: exactly 2 s ahead
    assert pol.displace(cand, [near, far, edge]) is far                     # the one furthest ahead
    assert pol.displace(cand, [near, edge]) is edge                         # >= preempt_ahead_s
    assert pol.displace(cand, [near]) is None                               # only 1 s ahead: keep it
    assert pol.displace(cand, []) is None
    late_cand = request("late", arrival=10, arrival_time=12.5)             # due 13.5, after far
    assert pol.displace(late_cand, [near, far]) is None                     # never for someone due later
    clock.now = 11.5                                                         # far is now 1.5 s ahead
    assert pol.displace(cand, [near, far]) is None
    lenient = impl.Andes(clock, ttft=1.0, tds=5.0, preempt_ahead_s=0.5)
    assert lenient.displace(cand, [near, far]) is far


def burst_qoe(sim, ttft=1.0, tds=5.0):
    return [exact_qoe(r.arrival_time, sim.token_times[rid], ttft, tds) for rid, r in sim.reqs.items()]


@pytest.mark.points(3)
@pytest.mark.exercise("Andes")
def test_andes_raises_mean_qoe_over_fcfs_on_a_burst_in_the_real_scheduler(impl):
    """12 readers at once, 4 seats, 60 tokens each; a seat makes 20 tokens/s, a reader reads 5."""
    cfg = config(num_kv_blocks=128, max_model_len=128)
    result = {}
    for name, make in (("fcfs", SchedulingPolicy), ("andes", impl.Andes)):
        sim = Sim(cfg, make)
        sim.run([(0, f"r{i}", 6, 60) for i in range(12)])
        q = burst_qoe(sim)
        result[name] = (sum(q) / len(q), sum(v < 0.9 for v in q))
        assert all(len(sim.token_times[r]) == 60 for r in sim.reqs)
        assert sim.sched.allocator.num_free == cfg.num_kv_blocks
        if name == "andes":
            assert sim.paused_ahead, "Andes never paused anyone on a burst 3x the seats"
            assert min(sim.paused_ahead) >= 2.0 - 1e-9   # only readers >= preempt_ahead_s behind
    assert result["andes"][0] > result["fcfs"][0] + 0.05
    assert result["andes"][1] < result["fcfs"][1]


@pytest.mark.points(2)
@pytest.mark.exercise("Andes")
def test_andes_starves_nobody_under_a_steady_stream(impl):
    """An arrival every 3 steps, a little over what 4 seats serve: every request that arrived in
    the first 100 steps gets its first token, and every request ever admitted finishes or runs."""
    sim = Sim(config(num_kv_blocks=64), impl.Andes)
    stream = [(3 * t, f"c{t}", 6 if t % 7 else 40, 12) for t in range(120)]
    sim.run(stream, max_steps=420, until_idle=False)
    for rid, r in sim.reqs.items():
        if r.arrival_time < 100 * sim.dt:
            assert sim.token_times[rid], f"request {rid} (arrived at {r.arrival_time:.2f} s) never got a token"


# ------------------------------------------------------------------ the real engine
def run_in_engine(make_policy, tiny_dirs):
    """Policies change the order of work, never the text: greedy outputs equal the eager baseline's."""
    import torch

    from minisys.engine.eager import EagerGenerator
    from minisys.engine.llm_engine import LLMEngine
    from minisys.model import load
    model, tok = load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, attention_backend="paged",
                      quiet=True)
    words = "the quick brown fox jumps over the lazy dog ".split()
    prompts = [tok.encode(" ".join(words * k)) for k in (1, 2, 1, 3, 1)]
    sps = [SamplingParams(temperature=0, max_tokens=6 + 2 * i, ignore_eos=True) for i in range(5)]
    ref = [EagerGenerator(model, tok).generate(p, sp).token_ids for p, sp in zip(prompts, sps)]
    clock = Clock()
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_kv_blocks=40, max_num_seqs=2,
                                                max_num_batched_tokens=16, enable_chunked_prefill=True),
                       clock=clock, policy=make_policy(clock))
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        engine.add_request(str(i), p, sp, client="ab"[i % 2])
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        clock.now += 0.1
    assert [done[str(i)] for i in range(5)] == ref
    assert engine.scheduler.allocator.num_free == 40
    return engine


@pytest.mark.points(1)
@pytest.mark.exercise("VTC")
def test_student_vtc_in_the_real_engine_keeps_the_eager_text(impl, tiny_dirs):
    run_in_engine(impl.VTC, tiny_dirs)


@pytest.mark.points(1)
@pytest.mark.exercise("Andes")
def test_student_andes_in_the_real_engine_keeps_the_eager_text(impl, tiny_dirs):
    engine = run_in_engine(lambda c: impl.Andes(c, ttft=0.1, tds=5.0, preempt_ahead_s=0.1), tiny_dirs)
    assert engine.scheduler.num_preemptions > 0          # pausing (recompute) happened and kept the text
