"""KV transfer between engines (lesson 14): disaggregated prefill/decode over a real gloo group.

Two engines in two processes (`minisys.cluster.engine_host`, started with the
process layer of lesson 13); the oracle is the eager baseline. Then the same
through two replica servers' HTTP endpoints, on the real SmolLM2 model.
"""
from __future__ import annotations

import argparse
import json

import httpx
import pytest

from minisys.cluster.engine_host import HostError
from minisys.cluster.kv_transfer import kv_bytes_per_token
from minisys.engine.kv_handoff import check_transferable
from minisys.engine.sampling_params import SamplingParams
from minisys.server.kv_args import kv_config_from_args
from tests.kv_cluster_helpers import assert_no_leak, eager_tokens, smol_eager_text

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52]]   # 7 and 13 tokens


@pytest.fixture
def hosts(kv_hosts):
    return kv_hosts


def test_disaggregated_greedy_equals_eager_and_frees_the_prefill(hosts, tiny_dirs):
    params = {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}
    for i, prompt in enumerate(PROMPTS):
        rid = f"d{i}"
        hosts.call(0, "add", rid, prompt, params, hold=True)
        hosts.call(0, "run")
        pre = hosts.call(0, "output", rid)
        assert pre["finished"] and len(pre["token_ids"]) == 1
        assert pre["kv_transfer_params"]["num_computed_tokens"] == len(prompt)
        assert hosts.call(0, "counts")["held"] == [rid]               # KV held for the pull
        hosts.call(1, "pull_import", 0, rid)
        hosts.call(1, "run")
        assert hosts.call(1, "output", rid)["token_ids"] == eager_tokens(tiny_dirs["llama"], prompt, params)
    assert_no_leak(hosts)


def test_disaggregated_seeded_sampling_equals_colocated(hosts):
    params = {"temperature": 1.0, "seed": 7, "max_tokens": 16, "ignore_eos": True}
    hosts.call(0, "add", "s-ref", PROMPTS[0], params)
    hosts.call(0, "run")
    hosts.call(0, "add", "s", PROMPTS[0], params, hold=True)
    hosts.call(0, "run")
    hosts.call(1, "pull_import", 0, "s")
    hosts.call(1, "run")
    assert hosts.call(1, "output", "s")["token_ids"] == hosts.call(0, "output", "s-ref")["token_ids"]
    assert_no_leak(hosts)


def test_held_kv_is_freed_by_timeout_or_abort_and_a_late_pull_fails(hosts):
    params = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
    hosts.call(0, "add", "t", PROMPTS[1], params, hold=True)
    hosts.call(0, "add", "a", PROMPTS[0], params, hold=True)
    hosts.call(0, "run")
    assert sorted(hosts.call(0, "counts")["held"]) == ["a", "t"]
    assert hosts.call(0, "abort", "a")
    assert hosts.call(0, "expire_held", 1e6) == ["t"]                 # past its deadline
    with pytest.raises(HostError, match="not held here"):
        hosts.call(1, "pull_import", 0, "t")
    assert_no_leak(hosts)


def test_a_finished_prefill_holds_nothing(hosts):
    hosts.call(0, "add", "one", PROMPTS[0], {"temperature": 0.0, "max_tokens": 1}, hold=True)
    hosts.call(0, "run")
    out = hosts.call(0, "output", "one")
    assert out["finished"] and out["kv_transfer_params"] is None
    assert_no_leak(hosts)


@pytest.mark.parametrize("field, value", [("n", 2), ("logprobs", 1), ("prompt_logprobs", 0)])
def test_untransferable_requests_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        check_transferable(SamplingParams(**{field: value}))


def _args(**kw):
    base = {"kv_connector": "gloo", "kv_rank": 0, "kv_world_size": 2, "kv_master_port": 1234,
            "kv_master_addr": "127.0.0.1", "kv_hold_timeout_s": 30.0, "kv_attach_timeout_s": 30.0, "engine": "llm"}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, engine_flags, name", [
    ({"engine": "eager"}, {}, "--engine"),
    ({}, {"tensor_parallel_size": 2}, "--tensor-parallel-size"),
    ({}, {"speculative_method": "ngram"}, "speculative"),
    ({"kv_master_port": None}, {}, "--kv-master-port"),
    ({"kv_connector": None}, {}, "--kv-connector"),
])
def test_unsupported_flag_combinations_are_refused_by_name(kw, engine_flags, name):
    with pytest.raises(ValueError, match=name):
        kv_config_from_args(_args(**kw), engine_flags)


def test_a_replica_without_connector_refuses_kv_transfer_params(tiny_app):
    with tiny_app(None) as (client, _):
        for path, body in [("/v1/completions", {"prompt": "the fox"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
            r = client.post(path, json={**body, "max_tokens": 2, "kv_transfer_params": {"do_remote_decode": True}})
            assert r.status_code == 400 and "kv_transfer_params" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "the fox", "max_tokens": 2},
                        headers={"X-Request-Id": "no spaces allowed"})
        assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "the fox", "max_tokens": 2}, headers={"X-Request-Id": "r-1"})
        assert r.status_code == 200 and r.json()["id"] == "r-1"          # the router's id is the request's


def test_bytes_per_token_formula():
    import torch
    assert kv_bytes_per_token(30, 3, 64, torch.float32) == 2 * 30 * 3 * 64 * 4      # SmolLM2: 46,080 B


# ------------------------------------------------------------ two replica servers, HTTP, the real model
@pytest.fixture
def replicas(kv_replicas):
    return kv_replicas


def _kv(url):
    return httpx.get(url + "/minisys/kv", timeout=30).json()


def test_http_disaggregated_equals_eager_on_smollm2(replicas, smol):
    pre_url, dec_url = replicas
    body = {"prompt": "Write a story about a fox:", "max_tokens": 16, "temperature": 0}
    ref = httpx.post(dec_url + "/v1/completions", json=body, timeout=120).json()
    pre = httpx.post(pre_url + "/v1/completions", json={**body, "kv_transfer_params": {"do_remote_decode": True}},
                     timeout=120).json()
    kvp = pre["kv_transfer_params"]
    assert kvp["do_remote_prefill"] and kvp["remote_rank"] == 0 and pre["usage"]["completion_tokens"] == 1
    assert _kv(pre_url)["held"] == [kvp["remote_request_id"]]
    dec = httpx.post(dec_url + "/v1/completions", json={**body, "kv_transfer_params": kvp}, timeout=120).json()
    assert dec["choices"][0]["text"] == ref["choices"][0]["text"]
    assert dec["choices"][0]["text"] == smol_eager_text(smol, dec_url, {"prompt": body["prompt"]}, 16)
    assert dec["usage"] == ref["usage"]
    again = httpx.post(dec_url + "/v1/completions", json={**body, "kv_transfer_params": kvp}, timeout=120)
    assert again.status_code == 409 and "not held" in again.json()["error"]["message"]    # pulled once only
    pre = httpx.post(pre_url + "/v1/completions", json={**body, "kv_transfer_params": {"do_remote_decode": True}},
                     timeout=120).json()
    other = httpx.post(dec_url + "/v1/completions", timeout=120,
                       json={**body, "max_tokens": 8, "kv_transfer_params": pre["kv_transfer_params"]})
    assert other.status_code == 400 and "max_tokens" in other.json()["error"]["message"]   # not the same request
    for url in replicas:
        c = _kv(url)
        assert c["kv_blocks_free"] == c["kv_blocks_total"] and not c["held"] and not c["requests"], c


def test_http_disaggregated_chat_streamed_from_the_decode_replica(replicas):
    pre_url, dec_url = replicas
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
    ref = httpx.post(pre_url + "/v1/chat/completions", json=body, timeout=120).json()
    pre = httpx.post(pre_url + "/v1/chat/completions", json={**body, "kv_transfer_params": {"do_remote_decode": True}},
                     timeout=120).json()
    text = ""
    with httpx.stream("POST", dec_url + "/v1/chat/completions", timeout=120,
                      json={**body, "stream": True, "kv_transfer_params": pre["kv_transfer_params"]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
    assert text == ref["choices"][0]["message"]["content"]
    streamed_prefill = httpx.post(pre_url + "/v1/chat/completions", timeout=60,
                                  json={**body, "stream": True, "kv_transfer_params": {"do_remote_decode": True}})
    assert streamed_prefill.status_code == 400 and "stream" in streamed_prefill.json()["error"]["message"]
