"""The router driving KV transfer (minisys/cluster/router_kv.py): disaggregation, migration, drain.

Oracles: greedy outputs through the router, disaggregated or migrated
mid-generation (by the router's migrate or drain endpoint), equal the eager
baseline (`LLM(engine="eager")`, no paging, no transfer) run here on the same
tiny model; the KV really moved is read from the replicas' own counters
(``/minisys/kv``: pulls served, migrations in); no leak means every replica's
``/minisys/kv`` says all blocks free, nothing held, staged or waiting to be
attached once idle.

One ``python -m minisys serve --replicas 2 --kv-connector gloo`` (a tiny
random llama) for the module: its own router migrates and drains; an
in-process router with ``prefill_replicas=1`` over the same two replicas
disaggregates (replica 0 prefills, replica 1 decodes). The last test kills a
replica and shuts the router down.
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
from minisys.cluster.policies import make_policy
from minisys.cluster.replica import Replica
from minisys.cluster.router import Router, build_router_app
from minisys.engine.sampling_params import SamplingParams

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHARED = "the quick brown fox jumps over the lazy dog " * 6
PROMPTS = [SHARED + "the fox", "the lazy dog"]
CHAT = [{"role": "system", "content": SHARED}, {"role": "user", "content": "the fox"}]
MAX_TOKENS = 12
LONG = 1500                  # output tokens of a request meant to migrate mid-generation (seconds of decoding)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    d = save_tiny_model(tmp_path_factory.mktemp("cluster-kv") / "tiny", "llama", seed=4, num_hidden_layers=4,
                        max_position_embeddings=LONG + 256)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))
    return d


@pytest.fixture(scope="module")
def eager(model_dir):
    from minisys.llm import LLM
    return LLM(str(model_dir), device="cpu", dtype="float32", quiet=True, engine="eager")


def eager_text(eager, prompt: str, max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return eager.generate([prompt], params)[0].outputs[0].text


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("router-kv") / "router.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minisys", "serve", "--model", str(model_dir), "--replicas",
                                 "2", "--routing-policy", "round_robin", "--kv-connector", "gloo",
                                 "--num-kv-blocks", "512", "--port", str(port), "--shutdown-grace-s", "2"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, 180, log_path)
        reps = [Replica(r["index"], r["url"], r["pid"]) for r in httpx.get(url + "/minisys/cluster").json()["replicas"]]
        yield SimpleNamespace(proc=proc, url=url, replicas=reps, urls=[r.url for r in reps])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


def stream_text(lines) -> tuple[str, list[dict]]:
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


def test_disaggregated_outputs_through_the_router_equal_eager(cluster, model_dir, eager):
    from minisys.model.tokenizer import Tokenizer
    router = Router(cluster.replicas, make_policy("least_loaded"), Tokenizer.from_dir(model_dir), "tiny",
                    kv=True, prefill_replicas=1)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    want = [o.outputs[0].text for o in eager.generate(PROMPTS, params)]
    want_chat = eager.chat(CHAT, params)[0].outputs[0].text
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
    assert routed == [5, 4], routed            # 5 prefills on replica 0, 4 decodes on 1 (max_tokens 1 ended there)
    assert kv_counters(cluster.urls)[0]["pulls_served"] - pulls == 4     # the KV really moved, 4 times
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
    prompt = SHARED + "migrate me"
    before = [c["migrations_in"] for c in kv_counters(cluster.urls)]
    with httpx.Client(timeout=120) as c:
        cm, got, lines = _start_stream(c, url, "mig-1", prompt, LONG)
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
    assert text == eager_text(eager, prompt, LONG)
    after = [c["migrations_in"] for c in kv_counters(cluster.urls)]
    assert after[1 - src] - before[1 - src] == 1
    assert_idle_no_leak(cluster.urls)


def test_drain_moves_the_running_requests_and_they_complete_correctly(cluster, eager):
    url = cluster.url
    prompts = [SHARED + "drain one", SHARED + "drain two"]
    with httpx.Client(timeout=120) as c:
        streams = [_start_stream(c, url, f"drain-{k}", p, LONG // 2) for k, p in enumerate(prompts)]
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
            assert text == eager_text(eager, prompts[k], LONG // 2), f"drain-{k}"
        assert c.post(url + "/minisys/cluster/undrain", json={"replica": 0}).status_code == 200
    assert kv_counters(cluster.urls)[0]["requests"] == []
    assert_idle_no_leak(cluster.urls)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_destination_that_dies_fails_the_move_not_the_stream_and_shutdown_stops_all(cluster, eager):
    """Last: kills replica 1 while a stream on replica 0 is being moved to it, then stops the router."""
    url, pids = cluster.url, [r.pid for r in cluster.replicas]
    prompt = SHARED + "stay"
    with httpx.Client(timeout=120) as c:
        cm, got, lines = _start_stream(c, url, "stay-0", prompt, LONG // 2)
        if _where(url, "stay-0") != 0:                      # round robin: move it to 0 first
            assert c.post(url + "/minisys/cluster/migrate", json={"request_id": "stay-0", "dst": 0}).status_code == 200
        result: dict = {}
        mover = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + "/minisys/cluster/migrate", json={"request_id": "stay-0", "dst": 1}, timeout=200)))
        os.kill(pids[1], signal.SIGKILL)
        mover.start()
        mover.join(200)
        assert not mover.is_alive(), "the migration to a dead replica hung"
        assert result["r"].status_code in (400, 502), result["r"].text       # refused or failed: not moved
        text, events = stream_text(got + list(lines))
        cm.__exit__(None, None, None)
    assert text == eager_text(eager, prompt, LONG // 2)          # it went on decoding on its source
    assert_idle_no_leak(cluster.urls[:1])
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a replica outlived the router"


def test_router_kv_flags_are_refused_by_name(capsys):
    from minisys.cli import build_parser
    from minisys.server.launch import serve
    for argv, named in [(["--replicas", "2", "--prefill-replicas", "1"], "--kv-connector"),
                        (["--replicas", "2", "--kv-connector", "gloo", "--prefill-replicas", "2"], "--prefill-replicas"),
                        (["--replicas", "2", "--kv-connector", "gloo", "--kv-rank", "0"], "--kv-rank")]:
        assert serve(build_parser().parse_args(["serve", *argv])) == 2
        assert named in capsys.readouterr().err
