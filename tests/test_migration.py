"""Live migration (Llumnix, lesson 14): the copy-round plan, engines in two processes, two replica servers.

Oracles: the plan against a per-block rule and a simulated migration; migrated
greedy output against the eager baseline; migrated seeded sampling against
the same request unmigrated; every engine's free-block count after.
"""
from __future__ import annotations

import json
import random
import threading

import httpx
import torch
import pytest

from minisys.cluster.engine_host import HostError
from minisys.cluster.migration import plan_copy_round
from tests.kv_cluster_helpers import assert_no_leak, eager_tokens

PROMPT = [5, 6, 7, 8, 9, 10, 11]                # 7 tokens: computed = 7 after the prefill step
GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}


# ------------------------------------------------------------ the plan (pure)
def _oracle(computed: int, bs: int, copied: int, threshold: int, force: bool):
    """Per block: block i goes this round iff not copied yet and (final, or full now)."""
    total = -(-computed // bs)
    final = force or total - copied <= threshold
    return [i for i in range(total) if i >= copied and (final or (i + 1) * bs <= computed)], final


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_plan_matches_the_per_block_rule(bs):
    for computed in range(1, 5 * bs + 3):
        for copied in range(0, computed // bs + 1):
            for threshold in (1, 2, 3):
                for force in (False, True):
                    r = plan_copy_round(computed, bs, copied, threshold, force)
                    assert (r.block_indices, r.final) == _oracle(computed, bs, copied, threshold, force)


def test_a_simulated_migration_copies_every_block_once_and_only_full_ones_before_the_stop():
    rng = random.Random(0)
    for _ in range(300):
        bs, computed, threshold = rng.choice([1, 2, 4, 16]), rng.randint(1, 200), rng.randint(1, 3)
        copied, sent, rounds = 0, [], 0
        while True:
            r = plan_copy_round(computed, bs, copied, threshold, force_final=rounds >= 50)
            rounds += 1
            if not r.final:
                assert all((i + 1) * bs <= computed for i in r.block_indices), "a partial block copied early"
            sent += r.block_indices
            if r.final:
                break
            copied += len(r.block_indices)
            computed += rng.randint(0, 3 * bs)                   # decoding goes on during the round
        assert sent == list(range(-(-computed // bs))), "each block exactly once, in order"


def test_plan_refuses_nonsense():
    with pytest.raises(ValueError):
        plan_copy_round(8, 4, 3)                 # 3 copied, only 2 full
    with pytest.raises(ValueError):
        plan_copy_round(8, 4, 0, stop_threshold_blocks=0)


# ------------------------------------------------------------ two engines, two processes, gloo
@pytest.fixture
def hosts(kv_hosts):
    return kv_hosts


def _decode_to(hosts, rid: str, computed: int) -> None:
    while hosts.call(0, "num_computed", rid) < computed:
        hosts.call(0, "step")


def _migrate(hosts, rid: str, schedule: list[int]) -> dict:
    """Round by round: before round i the source decodes until ``schedule[i]`` tokens have K/V."""
    for target in schedule:
        _decode_to(hosts, rid, target)
        done = hosts.call(0, "migrate_step", rid, 1)
        if done:
            return done
    raise AssertionError(f"migration of {rid} not done after {len(schedule)} rounds")


@pytest.mark.parametrize("name, schedule, rounds", [
    ("first-decode", [7, 7], [1, 1]),            # right after the prefill: 1 full block, then the partial one
    ("during-a-copy-round", [9, 14, 15], [2, 1, 1]),   # blocks fill while round 1 is copied: a 2nd round, then stop
    ("block-boundary", [9, 12], [2, 1]),         # the stop lands where the last block is exactly full
])
def test_migrated_greedy_equals_eager(hosts, tiny_dirs, name, schedule, rounds):
    rid = f"g-{name}"
    hosts.call(0, "add", rid, PROMPT, GREEDY)
    hosts.call(0, "step")                                         # the prefill
    result = _migrate(hosts, rid, schedule)
    assert result["round_blocks"] == rounds
    assert hosts.call(0, "output", rid) is None                   # gone from the source
    hosts.call(1, "run")
    assert hosts.call(1, "output", rid)["token_ids"] == eager_tokens(tiny_dirs["llama"], PROMPT, GREEDY)
    assert_no_leak(hosts)


def test_migrated_seeded_sampling_equals_unmigrated(hosts):
    params = {"temperature": 0.9, "top_p": 0.95, "seed": 11, "max_tokens": 24, "ignore_eos": True}
    hosts.call(0, "add", "ref", PROMPT, params)
    hosts.call(0, "run")
    hosts.call(0, "add", "s", PROMPT, params)
    hosts.call(0, "step")
    _migrate(hosts, "s", [10, 13, 18, 18])
    hosts.call(1, "run")
    assert hosts.call(1, "output", "s")["token_ids"] == hosts.call(0, "output", "ref")["token_ids"]
    assert_no_leak(hosts)


def test_abort_mid_migration_leaks_nothing_on_either_engine(hosts):
    hosts.call(0, "add", "x", PROMPT, GREEDY)
    hosts.call(0, "step")
    _decode_to(hosts, "x", 13)
    assert hosts.call(0, "migrate_step", "x", 1) is False          # round 1 staged on rank 1
    assert hosts.call(1, "counts")["staged"] == 1
    assert hosts.call(0, "abort", "x")
    with pytest.raises(HostError, match="MigrationAbandoned"):
        hosts.call(0, "migrate_step", "x", 1)
    assert_no_leak(hosts)                                           # rank 1 dropped its staged copy


def test_a_finished_request_cannot_migrate(hosts):
    hosts.call(0, "add", "f", PROMPT, {**GREEDY, "max_tokens": 3})
    hosts.call(0, "run")
    with pytest.raises(HostError, match="KeyError"):
        hosts.call(0, "migrate_step", "f", 1)
    assert_no_leak(hosts)


# ------------------------------------------------------------ two replica servers, HTTP, SmolLM2
def _sse(lines):
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_http_migrated_chat_stream_equals_unmigrated(kv_replicas):
    src, dst = kv_replicas
    body = {"messages": [{"role": "user", "content": "Tell me a story about a fox."}], "max_tokens": 32,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    ref = httpx.post(dst + "/v1/chat/completions", json=plain, timeout=120).json()
    text, first, moved, result = "", threading.Event(), None, {}

    def migrate():
        first.wait(60)
        result["r"] = httpx.post(src + "/minisys/migrate", json={"request_id": "mig-1", "dst_rank": 1}, timeout=60)

    t = threading.Thread(target=migrate)
    t.start()
    with httpx.stream("POST", src + "/v1/chat/completions", json=body, headers={"X-Request-Id": "mig-1"},
                      timeout=120) as r:
        for ev in _sse(r.iter_lines()):
            if "minisys_migrated" in ev:
                moved = ev["minisys_migrated"]
                continue
            for c in ev["choices"]:
                text += c["delta"].get("content") or ""
                if text:
                    first.set()
    t.join()
    assert result["r"].status_code == 200, result["r"].text
    assert moved == {"request_id": "mig-1", "dst_rank": 1}
    events = []
    with httpx.stream("GET", dst + "/minisys/attach/mig-1", timeout=120) as r:
        events = list(_sse(r.iter_lines()))
    assert not any(c["delta"].get("role") for e in events for c in e["choices"])     # no second role chunk
    text += "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == ref["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == ref["usage"]
    assert httpx.get(dst + "/minisys/attach/mig-1", timeout=30).status_code == 404    # attached once
    for url in kv_replicas:
        c = httpx.get(url + "/minisys/kv", timeout=30).json()
        assert c["kv_blocks_free"] == c["kv_blocks_total"] and not c["requests"] and not c["staged"], c


def test_http_migrate_refusals(kv_replicas):
    src, _ = kv_replicas
    r = httpx.post(src + "/minisys/migrate", json={"request_id": "nobody", "dst_rank": 1}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(src + "/minisys/migrate", json={"request_id": "x", "dst_rank": 0}, timeout=30)
    assert r.status_code == 400 and "dst_rank" in r.json()["error"]["message"]


def test_a_stalled_migration_is_dropped_at_the_destination_and_a_refusal_is_an_answer():
    """The destination's side alone (a fake transport, a fake engine): begin, stage, expire."""
    import types

    from minisys.cluster import kv_transfer as kt

    class Conn(kt.KVConnector):
        rank, world_size = 1, 2

        def __init__(self):
            self.sent, self.stop = [], threading.Event()

        def send(self, dst, header, tensors=(), tag=kt.CTRL_TAG):
            self.sent.append((dst, header, tag))
            return 0

        def recv(self, src=None, tag=kt.CTRL_TAG, timeout_s=None):
            self.stop.wait()                      # the listener idles; the test calls the handlers itself
            raise RuntimeError("closed")

    alloc = types.SimpleNamespace(num_free=3)
    engine = types.SimpleNamespace(scheduler=types.SimpleNamespace(allocator=alloc), speculator=None,
                                   request_ids=lambda: [], held_ids=lambda: [])
    conn = Conn()
    agent = kt.KVAgent(conn, lambda fn: fn(engine))
    try:
        agent._handle(0, {"op": "migrate_begin", "request_id": "big", "num_blocks": 4, "reply_tag": 7}, ())
        assert "4 KV blocks needed, 3 free" in conn.sent[-1][1]["error"] and conn.sent[-1][2] == 7
        agent._handle(0, {"op": "migrate_begin", "request_id": "r", "num_blocks": 2, "reply_tag": 8}, ())
        assert conn.sent[-1][1] == {"ok": True} and agent.num_staged == 1
        k = torch.zeros(2, 1, 4, 1, 1)
        agent._handle(0, {"op": "migrate_blocks", "request_id": "r", "block_indices": [0]}, (k, k))
        agent._expire_staged()
        assert agent.num_staged == 1                                    # not overdue yet
        agent._staged[(0, "r")].deadline = 0.0
        agent._expire_staged()
        assert agent.num_staged == 0                                    # dropped: its source went silent
        agent._handle(0, {"op": "migrate_final", "request_id": "r", "block_indices": [], "block_size": 4,
                          "snapshot": None, "reply_tag": 9}, (k[:, :0], k[:, :0]))
        assert "never begun here, or timed out" in conn.sent[-1][1]["error"]
    finally:
        conn.stop.set()
