"""Lesson 08's policies in the real engine and server (a tiny random Llama: the engine's code paths
are the model's size; test_scheduling.py covers the policies alone).

Policies change the order of work, never the text (greedy outputs equal the
eager baseline's under every policy, preemptions included); VTC keeps two
backlogged clients within the paper's bound on the real model while FCFS
drifts; the server honours ``user`` and ``priority`` and refuses bad values
with a 400 naming the field.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from minisys.engine.config import EngineConfig
from minisys.engine.eager import EagerGenerator
from minisys.engine.llm_engine import LLMEngine
from minisys.engine.sampling_params import SamplingParams
from minisys.scheduling import QoESpec, fairness_bound, max_service_gap

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
           "Explain what a KV cache is in one sentence.", "Hello"]


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(engine: LLMEngine, clock: StepClock | None = None, dt: float = 0.05) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
        if clock is not None:
            clock.now += dt
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    from minisys.model import load
    return load(str(tiny_dirs["llama"]), device="cpu", dtype=torch.float32, quiet=True)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc", "andes"])
def test_policies_change_order_never_text(tiny, policy):
    """A pool too small for everyone (preemptions), priorities and clients mixed, a slow reader
    (so Andes pauses requests): the greedy tokens equal the eager baseline's, request by request."""
    model, tok = tiny
    ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eager = EagerGenerator(model, tok)
    expected = {str(i): eager.generate(p, params).token_ids for i, p in enumerate(ids)}
    clock = StepClock()
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=6, max_num_seqs=3, scheduling_policy=policy,
                                                max_num_batched_tokens=64), clock=clock)
    for i, p in enumerate(ids):
        engine.add_request(str(i), p, params, client="ab"[i % 2], priority=[3, 1, 2, 0, 1][i],
                           qoe=QoESpec(ttft=0.0, tds=1.0))
    got = run(engine, clock)
    assert got == {k: list(v) for k, v in expected.items()}
    assert engine.stats.preemptions > 0
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks


def test_vtc_on_the_real_engine_keeps_the_light_client_within_the_bound(tiny):
    """Client a sends 4x client b's requests, all queued at once; the service each gets is
    measured per step from what the engine ran. VTC: within the paper's 2U over the backlogged
    period; FCFS: b waits for all of a's work and the gap exceeds that bound."""
    model, tok = tiny
    prompt = tok.encode("the quick brown fox")
    max_tokens = 6
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    gaps = {}
    for policy in ("fcfs", "vtc"):
        cfg = EngineConfig(max_num_seqs=4, scheduling_policy=policy, max_num_batched_tokens=64)
        engine = LLMEngine(model, tok, cfg)
        for i in range(32):
            engine.add_request(f"a{i}", prompt, params, client="a")
        for i in range(8):
            engine.add_request(f"b{i}", prompt, params, client="b")
        steps, flags, before = [], [], {}
        while engine.has_unfinished():
            waiting = {r.client_key for r in engine.scheduler.waiting}
            flags.append({"a", "b"} <= waiting)
            engine.step()
            totals = engine.stats.service.totals
            steps.append({c: totals.get(c, 0.0) - before.get(c, 0.0) for c in "ab"})
            before = dict(totals)
        gaps[policy] = max_service_gap(steps, "a", "b", flags)
    m = cfg.max_num_seqs * (len(prompt) + max_tokens)             # the most tokens the batch can hold
    limit = fairness_bound(cfg.vtc_input_weight, cfg.vtc_output_weight, len(prompt), m)
    assert gaps["vtc"] <= limit < gaps["fcfs"]


# ------------------------------------------------------------------ the server (in process, tiny model)
KEY = "sched-key"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def priority_app(tiny_app):
    with tiny_app(KEY, app_args={"metrics_open": True}, max_num_seqs=1, scheduling_policy="priority") as (c, llm):
        yield c, llm.engine


@pytest.mark.parametrize("field,value", [("priority", "high"), ("priority", 1.5), ("user", 7),
                                         ("expected_tds", 0), ("expected_ttft", -1.0)])
def test_bad_scheduling_fields_are_a_400_naming_the_field(priority_app, field, value):
    c, engine = priority_app
    r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, field: value}, headers=H)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert not engine.has_unfinished()


def test_server_honours_priority_and_counts_service_per_user(priority_app):
    """One seat: a long low-priority request runs, another waits; a priority -1 request arrives,
    preempts the running one and finishes first; /metrics shows each user's service."""
    c, engine = priority_app
    done: dict[str, float] = {}

    def post(name: str, **body) -> None:
        r = c.post("/v1/completions", headers=H, json={"prompt": "the quick brown", "temperature": 0,
                                                        "ignore_eos": True, **body})
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    threads = [threading.Thread(target=post, args=("long",), kwargs={"max_tokens": 150, "user": "alice",
                                                                     "priority": 5})]
    threads[0].start()
    deadline = time.monotonic() + 30
    while not engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    threads.append(threading.Thread(target=post, args=("waiting",), kwargs={"max_tokens": 3, "user": "bob",
                                                                            "priority": 5}))
    threads[1].start()
    while len(engine.scheduler.waiting) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads.append(threading.Thread(target=post, args=("urgent",), kwargs={"max_tokens": 3, "user": "carol",
                                                                           "priority": -1}))
    threads[2].start()
    for t in threads:
        t.join(120)
    assert set(done) == {"long", "waiting", "urgent"}
    assert done["urgent"] < done["waiting"] and done["urgent"] < done["long"]
    assert engine.stats.preemptions >= 1
    text = c.get("/metrics").text
    for user in ("alice", "bob", "carol"):
        assert f'minisys:client_service_tokens_total{{client="{user}",model_name="tiny"}}' in text
