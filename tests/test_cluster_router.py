"""The router over real replica processes (minisys/cluster): outputs, aborts, a replica's death, shutdown.

Oracles: greedy outputs through the router, under each policy, equal the
eager baseline (`LLM(engine="eager")`, one request at a time, no paging)
run in this process on the same tiny model; no KV block leaked means every
surviving replica's own counters (``GET /minisys/load``) say ``free_blocks
== total_blocks`` and nothing running or waiting once idle; "no orphans"
means the replicas' pids are gone (signal 0) after the router's shutdown.

One ``python -m minisys serve --replicas 2 --kv-connector gloo`` (a tiny
random llama) is started for the module: in-process routers of each policy
route over its replicas (one with ``prefill_replicas=1`` disaggregates:
replica 0 prefills, replica 1 pulls the KV and decodes); its own router
migrates a stream (``/minisys/cluster/migrate``) and drains a replica
(``/minisys/cluster/drain``): outputs equal the eager baseline token for
token, and every replica's ``/minisys/kv`` shows nothing leaked, held or
staged. The last test kills one replica and shuts the router down.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from minisys.bench.server_process import free_port, wait_healthy
from minisys.cli import build_parser
from minisys.cluster.policies import POLICIES, make_policy
from minisys.cluster.replica import Replica
from minisys.cluster.router import Router, build_router_app
from minisys.engine.sampling_params import SamplingParams

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHARED = "the quick brown fox jumps over the lazy dog " * 12         # 109 tokens: 6 full blocks of 16
PROMPTS = [SHARED + "the fox", SHARED + "the dog jumps", "the lazy dog", SHARED + "over"]
CHAT = [{"role": "system", "content": SHARED}, {"role": "user", "content": "the fox"}]
MAX_TOKENS = 12
LONG = 3000                  # tokens of a request meant to be cut: seconds of decoding
MIGRATED = 240               # output tokens of a request migrated mid-generation (~1 s of decoding; eager oracle)
MOVED = [SHARED + "move one", SHARED + "move two"]       # the prompts of the migrated requests
KV_BLOCKS = "512"            # room for one LONG request (188 blocks of 16) and the others


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    """A tiny random llama (4 layers) with a 4096-token context, so that a long generation stays in flight
    for seconds (long enough to kill, abort or collide with), and a chat template."""
    d = save_tiny_model(tmp_path_factory.mktemp("cluster") / "tiny", "llama", seed=4, num_hidden_layers=4,
                           max_position_embeddings=LONG + 256)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))
    return d


@pytest.fixture(scope="module")
def eager(model_dir):
    """The eager baseline (`LLM(engine="eager")`: no paging, no batching, no transfer): the oracle."""
    from minisys.llm import LLM
    return LLM(str(model_dir), device="cpu", dtype="float32", quiet=True, engine="eager")


def eager_text(eager, prompt: str, max_tokens: int) -> str:
    """The eager baseline's greedy text (computed once per prompt and length for the module)."""
    key = (id(eager), prompt, max_tokens)
    if key not in _EAGER:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        _EAGER[key] = eager.generate([prompt], params)[0].outputs[0].text
    return _EAGER[key]


_EAGER: dict = {}


@pytest.fixture(scope="module")
def expected(eager):
    """The eager baseline's greedy texts of PROMPTS and of CHAT, computed once for every policy."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return [o.outputs[0].text for o in eager.generate(PROMPTS, params)], eager.chat(CHAT, params)[0].outputs[0].text


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """``python -m minisys serve --replicas 2 --routing-policy round_robin``, started once for the module:
    the in-process routers of the first tests route over its replicas; the last test kills one and shuts
    the whole thing down."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("router") / "router.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minisys", "serve", "--model", str(model_dir), "--replicas",
                                 "2", "--routing-policy", "round_robin", "--num-kv-blocks", KV_BLOCKS, "--kv-connector", "gloo",
                                 "--port", str(port), "--shutdown-grace-s", "2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, 180, log_path)
        reps = [Replica(r["index"], r["url"], r["pid"]) for r in httpx.get(url + "/minisys/cluster").json()["replicas"]]
        yield SimpleNamespace(proc=proc, url=url, replicas=reps, urls=[r.url for r in reps])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def router_client(replicas, model_dir, policy: str) -> TestClient:
    from minisys.model.tokenizer import Tokenizer
    router = Router(replicas.replicas, make_policy(policy), Tokenizer.from_dir(model_dir), "tiny")   # not the owner
    return TestClient(build_router_app(router))


def loads(replicas) -> list[dict]:
    return [httpx.get(url + "/minisys/load", timeout=5).json() for url in replicas.urls]


def wait_idle(replicas, timeout=20.0) -> list[dict]:
    """Every replica's load report once nothing runs or waits (or the last one after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = loads(replicas)
        if all(r["running"] == r["waiting"] == 0 for r in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def stream_text(lines) -> tuple[str, list[dict]]:
    """(text, events) of an SSE stream's ``data:`` lines (completions or chat)."""
    text, events = "", []
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        assert "minisys_migrated" not in ev, "the router forwarded its internal migration event"
        events.append(ev)
        for c in ev.get("choices", []):
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return text, events


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_outputs_through_the_router_equal_the_eager_baseline(cluster, model_dir, expected, policy):
    want, want_chat = expected
    with router_client(cluster, model_dir, policy) as client:
        before = client.get("/minisys/cluster").json()
        for prompt, text in zip(PROMPTS, want):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        with client.stream("POST", "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                                                            "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and stream_text(r.iter_lines())[0] == want[1]
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want_chat
        with client.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": MAX_TOKENS,
                                                                 "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and stream_text(r.iter_lines())[0] == want_chat
        routed = [rep["routed"] for rep in client.get("/minisys/cluster").json()["replicas"]]
        assert sum(routed) == 7 and [b["routed"] for b in before["replicas"]] == [0, 0]
        if policy == "round_robin":
            assert routed == [4, 3]
        bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": -1})
        assert bad.status_code == 400 and "temperature" in bad.text        # the replica's own 400, unchanged
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert 'minisys_router:replica_up{replica="1"} 1.0' in client.get("/metrics").text


def test_prefix_affinity_keeps_a_shared_prompt_on_one_replica_where_it_hits_the_cache(cluster, model_dir):
    replicas = cluster
    hits_before = [r["prefix_hits"] for r in loads(replicas)]
    with router_client(replicas, model_dir, "prefix_affinity") as client:
        for k in range(4):
            r = client.post("/v1/completions", json={"prompt": SHARED + f"the dog {k}", "max_tokens": 2})
            assert r.status_code == 200
        routed = [rep["routed"] for rep in client.get("/minisys/cluster").json()["replicas"]]
    assert sorted(routed) == [0, 4]
    home = routed.index(4)
    assert loads(replicas)[home]["prefix_hits"] - hits_before[home] >= 3 * 4     # 3 repeats x the 4 blocks of the key (at least)


def test_server_takes_x_request_id_and_refuses_one_in_flight(cluster):
    replicas = cluster
    url = replicas.urls[0]
    body = {"prompt": "the quick", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": "lesson14-a"}) as r:
            lines = r.iter_lines()                  # kept: dropping the iterator would close the stream
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["id"] == "lesson14-a"
            dup = c.post(url + "/v1/completions", json={**body, "stream": False}, headers={"X-Request-Id": "lesson14-a"})
            assert dup.status_code == 400 and dup.json()["error"]["code"] == "duplicate_request_id", dup.text
        bad = c.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "has space"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
        again = c.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2},
                       headers={"X-Request-Id": "lesson14-a"})      # free again once the first is gone
        assert again.status_code == 200 and again.json()["id"] == "lesson14-a"


def test_client_disconnects_mid_stream_leave_no_block_behind(cluster, model_dir):
    replicas = cluster
    def aborted() -> float:
        total = 0.0
        for url in replicas.urls:
            for line in httpx.get(url + "/metrics").text.splitlines():
                if line.startswith("minisys:request_aborted_total"):
                    total += float(line.split()[-1])
        return total

    before = aborted()
    with router_client(replicas, model_dir, "least_loaded") as client:
        for k in range(4):
            with client.stream("POST", "/v1/completions", json={"prompt": SHARED + str(k), "max_tokens": LONG,
                                                                "ignore_eos": True, "stream": True}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))   # one token, then leave
    got = wait_idle(replicas)
    assert all(r["free_blocks"] == r["total_blocks"] == int(KV_BLOCKS) for r in got), got
    assert aborted() - before == 4


def kv_counters(urls) -> list[dict]:
    return [httpx.get(u + "/minisys/kv", timeout=10).json() for u in urls]


def assert_idle_no_leak(urls, timeout: float = 20.0) -> list[dict]:
    """Every replica's KV counters once idle: all blocks free, nothing held, staged or waiting to attach."""
    deadline = time.monotonic() + timeout
    while True:
        got = kv_counters(urls)
        idle = all(c["kv_blocks_free"] == c["kv_blocks_total"] and not c["held"] and not c["staged"]
                   and not c["attachable"] and not c["requests"] for c in got)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for c in got:
        assert c["kv_blocks_free"] == c["kv_blocks_total"], f"rank {c['rank']} leaked blocks: {c}"
        assert not c["held"] and not c["staged"] and not c["attachable"] and not c["requests"], c
    return got


# ------------------------------------------------------------ the router driving KV transfer (router_kv)
def test_disaggregated_outputs_through_the_router_equal_eager(cluster, model_dir, expected, eager):
    """An in-process router with ``prefill_replicas=1`` over the module's KV group: replica 0 prefills,
    replica 1 pulls the KV and decodes; completions, streamed or not, and a streamed chat."""
    from minisys.model.tokenizer import Tokenizer
    router = Router(cluster.replicas, make_policy("least_loaded"), Tokenizer.from_dir(model_dir), "tiny",
                    kv=True, prefill_replicas=1)
    want, want_chat = expected
    pulls = kv_counters(cluster.urls)[0]["pulls_served"]
    with TestClient(build_router_app(router)) as client:
        for prompt, text in zip(PROMPTS, want):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        with client.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                                            "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and stream_text(r.iter_lines())[0] == want[0]
        with client.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "max_tokens": MAX_TOKENS,
                                                                 "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and stream_text(r.iter_lines())[0] == want_chat
        one = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 1, "temperature": 0})
        assert one.status_code == 200 and one.json()["choices"][0]["text"] == \
            eager.generate([PROMPTS[1]], SamplingParams(max_tokens=1, temperature=0.0))[0].outputs[0].text
        bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                   "kv_transfer_params": {"do_remote_decode": True}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "kv_transfer_params"
        routed = [rep["routed"] for rep in client.get("/minisys/cluster").json()["replicas"]]
    n = len(PROMPTS) + 2
    assert routed == [n + 1, n], routed        # every request prefilled on 0; decoded on 1 (max_tokens 1: not)
    assert kv_counters(cluster.urls)[0]["pulls_served"] - pulls == n      # the KV really moved, n times
    assert_idle_no_leak(cluster.urls)


def _start_stream(client: httpx.Client, url: str, rid: str, prompt: str, max_tokens: int):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    cm = client.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": rid})
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    return cm, [first], lines


def _where(url: str, rid: str) -> int:
    return httpx.get(url + "/minisys/cluster").json()["requests"][rid]


def test_a_stream_migrated_by_the_router_equals_eager(cluster, eager):
    url = cluster.url
    prompt = MOVED[0]
    before = [c["migrations_in"] for c in kv_counters(cluster.urls)]
    with httpx.Client(timeout=120) as c:
        cm, got, lines = _start_stream(c, url, "mig-1", prompt, MIGRATED)
        src = _where(url, "mig-1")
        r = c.post(url + "/minisys/cluster/migrate", json={"request_id": "mig-1", "dst": 1 - src})
        assert r.status_code == 200, r.text
        assert r.json()["src"] == src and r.json()["dst_rank"] == 1 - src and r.json()["blocks"] > 0
        assert _where(url, "mig-1") == 1 - src
        text, events = stream_text(got + list(lines))
        cm.__exit__(None, None, None)
        bad = c.post(url + "/minisys/cluster/migrate", json={"request_id": "mig-1", "dst": 7})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "dst"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert text == eager_text(eager, prompt, MIGRATED)
    after = [c["migrations_in"] for c in kv_counters(cluster.urls)]
    assert after[1 - src] - before[1 - src] == 1
    assert_idle_no_leak(cluster.urls)


def test_drain_moves_the_running_requests_and_they_complete_correctly(cluster, eager):
    url = cluster.url
    prompts = MOVED
    with httpx.Client(timeout=120) as c:
        streams = [_start_stream(c, url, f"drain-{k}", p, MIGRATED) for k, p in enumerate(prompts)]
        where = [_where(url, f"drain-{k}") for k in range(2)]
        assert sorted(where) == [0, 1]                       # round robin: one on each replica
        r = c.post(url + "/minisys/cluster/drain", json={"replica": 0})
        assert r.status_code == 200, r.text
        rep = r.json()
        mine = f"drain-{where.index(0)}"
        assert [m["request_id"] for m in rep["moved"]] == [mine] and not rep["not_moved"], rep
        assert rep["moved"][0]["dst_rank"] == 1
        after = c.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2})   # drained: not routed there
        assert after.status_code == 200
        states = httpx.get(url + "/minisys/cluster").json()["replicas"]
        assert not states[0]["in_rotation"] and states[1]["in_rotation"]
        for k, (cm, got, lines) in enumerate(streams):
            text, events = stream_text(got + list(lines))
            cm.__exit__(None, None, None)
            assert text == eager_text(eager, prompts[k], MIGRATED), f"drain-{k}"
        assert c.post(url + "/minisys/cluster/undrain", json={"replica": 0}).status_code == 200
    assert kv_counters(cluster.urls)[0]["requests"] == []
    assert_idle_no_leak(cluster.urls)


def test_the_rebalancer_moves_a_stream_from_the_busier_replica(cluster, model_dir, eager):
    """An in-process router with rebalancing (every 0.1 s, freeness gap 50): two streams placed on replica
    0 (replica 1 drained meanwhile), then replica 1 back: one stream moves there, both equal eager."""
    from minisys.model.tokenizer import Tokenizer
    router = Router(cluster.replicas, make_policy("least_loaded"), Tokenizer.from_dir(model_dir), "tiny", kv=True)
    router.rebalance = (0.1, 50.0)
    prompts = MOVED
    with TestClient(build_router_app(router)) as client:
        router.states[1].in_rotation = False
        streams = []
        for k, p in enumerate(prompts):
            cm = client.stream("POST", "/v1/completions", headers={"X-Request-Id": f"rb-{k}"},
                               json={"prompt": p, "max_tokens": MIGRATED, "temperature": 0, "ignore_eos": True,
                                     "stream": True})
            lines = cm.__enter__().iter_lines()
            streams.append((cm, [next(line for line in lines if line.startswith("data: "))], lines))
        assert set(router.active[f"rb-{k}"].replica for k in range(2)) == {0}
        router.states[1].in_rotation = True
        for k, (cm, got, lines) in enumerate(streams):
            text, _ = stream_text(got + list(lines))
            cm.__exit__(None, None, None)
            assert text == eager_text(eager, prompts[k], MIGRATED), f"rb-{k}"
        assert router.rebalanced >= 1
    assert_idle_no_leak(cluster.urls)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_replica_killed_mid_stream_fails_its_client_only_and_shutdown_leaves_no_replica(cluster):
    """Last of the module's cluster tests: it kills the replica D of a stream (while the other replica's
    stream is being migrated to D: the move fails, that stream goes on), then stops the router."""
    url, proc, pids = cluster.url, cluster.proc, [r.pid for r in cluster.replicas]
    body = {"prompt": "the quick", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, \
            c.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": "doomed"}) as doomed, \
            c.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 1000},
                     headers={"X-Request-Id": "other"}) as other:
        doomed_lines, other_lines = doomed.iter_lines(), other.iter_lines()
        next(line for line in doomed_lines if line.startswith("data: "))     # mid-stream on replica d
        next(line for line in other_lines if line.startswith("data: "))      # mid-stream on the other one
        d = _where(url, "doomed")
        assert _where(url, "other") == 1 - d                                  # round robin's next turn
        plain: dict = {}                                                      # a non-streamed one on replica d
        waiter = threading.Thread(target=lambda: plain.update(r=httpx.post(
            url + "/v1/completions", json={**body, "stream": False}, timeout=60)))
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/minisys/cluster").json()["replicas"][d]["in_flight"] < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        moving: dict = {}                     # the other stream sent to replica d as it dies: not moved, not lost
        mover = threading.Thread(target=lambda: moving.update(r=httpx.post(
            url + "/minisys/cluster/migrate", json={"request_id": "other", "dst": d}, timeout=200)))
        os.kill(pids[d], signal.SIGKILL)
        mover.start()
        waiter.join(30)
        mover.join(200)
        assert not mover.is_alive(), "a migration to a dead replica hung"
        assert moving["r"].status_code in (400, 502), moving["r"].text
        assert plain["r"].status_code == 502 and plain["r"].json()["error"]["code"] == "replica_failed"
        text, events = stream_text(doomed_lines)
        assert "error" in events[-1] and events[-1]["error"]["code"] == "replica_failed", events[-1:]
        assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))
        text, events = stream_text(other_lines)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 10
    while httpx.get(url + "/minisys/cluster").json()["replicas"][d]["alive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    reps = httpx.get(url + "/minisys/cluster").json()["replicas"]
    assert [r["alive"] for r in reps] == [i != d for i in range(2)]
    for _ in range(3):                                      # the router keeps serving, on the survivor
        r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    survivor = httpx.get(reps[1 - d]["url"] + "/minisys/load").json()
    assert survivor["free_blocks"] == survivor["total_blocks"] and survivor["running"] == 0
    assert_idle_no_leak([reps[1 - d]["url"]])              # nothing held or staged by the failed move either
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a replica outlived the router"


def test_replica_flags_it_cannot_take_are_refused_by_name(capsys):
    from minisys.server.launch import serve
    for argv, named in [(["--replicas", "2", "--engine", "eager"], "--engine eager"),
                        (["--replicas", "2", "--tensor-parallel-size", "2"], "--tensor-parallel-size"),
                        (["--routing-policy", "round_robin"], "--routing-policy"),
                        (["--replicas", "0"], "--replicas")]:
        assert serve(build_parser().parse_args(["serve", *argv])) == 2
        assert named in capsys.readouterr().err


def test_router_kv_flags_are_refused_by_name(capsys):
    from minisys.server.launch import serve
    for argv, named in [(["--replicas", "2", "--prefill-replicas", "1"], "--kv-connector"),
                        (["--replicas", "2", "--kv-connector", "gloo", "--prefill-replicas", "2"], "--prefill-replicas"),
                        (["--replicas", "2", "--kv-connector", "gloo", "--kv-rank", "0"], "--kv-rank"),
                        (["--replicas", "2", "--rebalance-every-s", "1"], "--kv-connector"),
                        (["--rebalance-every-s", "1"], "--rebalance-every-s")]:
        assert serve(build_parser().parse_args(["serve", *argv])) == 2
        assert named in capsys.readouterr().err
