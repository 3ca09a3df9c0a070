"""The router over real replica processes (minisys/cluster): outputs, aborts, a replica's death, shutdown.

Oracles: greedy outputs through the router, under each policy, equal the
eager baseline (`LLM(engine="eager")`, one request at a time, no paging)
run in this process on the same tiny model; no KV block leaked means every
surviving replica's own counters (``GET /minisys/load``) say ``free_blocks
== total_blocks`` and nothing running or waiting once idle; "no orphans"
means the replicas' pids are gone (signal 0) after the router's shutdown.

One ``python -m minisys serve --replicas 2`` (a tiny random llama) is
started for the module: in-process routers of each policy route over its
replicas, and the last test kills one replica and shuts the router down.
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
def expected(model_dir):
    """The eager baseline's greedy texts of PROMPTS and of CHAT, computed once for every policy."""
    from minisys.llm import LLM
    eager = LLM(str(model_dir), device="cpu", dtype="float32", quiet=True, engine="eager")
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
                                 "2", "--routing-policy", "round_robin", "--num-kv-blocks", KV_BLOCKS,
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_replica_killed_mid_stream_fails_its_client_only_and_shutdown_leaves_no_replica(cluster):
    """Last of the module's cluster tests: it kills replica 0, then stops the router."""
    url, proc, pids = cluster.url, cluster.proc, [r.pid for r in cluster.replicas]
    body = {"prompt": "the quick", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, \
            c.stream("POST", url + "/v1/completions", json=body) as doomed, \
            c.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 100}) as other:
        doomed_lines, other_lines = doomed.iter_lines(), other.iter_lines()
        next(line for line in doomed_lines if line.startswith("data: "))     # mid-stream on replica 0 (1st turn)
        next(line for line in other_lines if line.startswith("data: "))      # mid-stream on replica 1
        plain: dict = {}                                                      # a non-streamed one on replica 0
        waiter = threading.Thread(target=lambda: plain.update(r=httpx.post(
            url + "/v1/completions", json={**body, "stream": False}, timeout=60)))
        waiter.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/minisys/cluster").json()["replicas"][0]["in_flight"] < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)
        waiter.join(30)
        assert plain["r"].status_code == 502 and plain["r"].json()["error"]["code"] == "replica_failed"
        text, events = stream_text(doomed_lines)
        assert "error" in events[-1] and events[-1]["error"]["code"] == "replica_failed", events[-1:]
        assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))
        text, events = stream_text(other_lines)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 10
    while httpx.get(url + "/minisys/cluster").json()["replicas"][0]["alive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    reps = httpx.get(url + "/minisys/cluster").json()["replicas"]
    assert [r["alive"] for r in reps] == [False, True]
    for _ in range(3):                                      # the router keeps serving, on the survivor
        r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
    assert httpx.get(url + "/health").status_code == 200
    survivor = httpx.get(reps[1]["url"] + "/minisys/load").json()
    assert survivor["free_blocks"] == survivor["total_blocks"] and survivor["running"] == 0
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
