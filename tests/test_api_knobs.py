"""What real clients send: strict request fields, the sampling knobs, the small routes.

In-process (fastapi TestClient over the tiny random model): a field minisys
does not implement is a 400 naming it; the cosmetic fields real clients send
(`IGNORED_FIELDS`) are accepted.
"""
from __future__ import annotations

import pytest

from minisys.engine.config import EngineConfig
from minisys.server.protocol import IGNORED_FIELDS

KEY = "sk-knobs"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(tiny_app):
    with tiny_app(KEY) as (c, llm):
        yield c, llm


BASE = {"prompt": "the", "max_tokens": 2, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("field,value", [
    ("frobnicate", 1),
    ("guided_decoding_backend", "xgrammar"), ("guided_whitespace_pattern", " "),
    ("reasoning_effort", "low")])
def test_a_field_minisys_does_not_implement_is_a_400_naming_it(app, field, value):
    c, llm = app
    for path, body in (("/v1/completions", BASE), ("/v1/chat/completions", CHAT)):
        r = c.post(path, json={**body, field: value}, headers=H)
        assert r.status_code == 400, (path, field, r.text)
        err = r.json()["error"]
        assert field in err["message"] and err["param"] == field, err
    assert not llm.engine.has_unfinished()


def test_unknown_fields_inside_messages_and_stream_options_are_refused(app):
    c, _ = app
    r = c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "hi", "name": "x"}]},
               headers=H)
    assert r.status_code == 400 and "messages.0.name" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={**BASE, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
               headers=H)
    assert r.status_code == 400 and "stream_options.x" in r.json()["error"]["message"]


def test_the_cosmetic_fields_clients_send_are_accepted(app):
    c, _ = app
    extra = {"metadata": {"run": "a"}, "store": False, "service_tier": "auto",
             "user": "alice", "stream_options": None}
    assert set(extra) - {"user", "stream_options"} == set(IGNORED_FIELDS)
    plain = c.post("/v1/completions", json=BASE, headers=H).json()
    r = c.post("/v1/completions", json={**BASE, **extra}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain["choices"][0]["text"]
    r = c.post("/v1/completions", json={**BASE, "store": "yes"}, headers=H)       # typed all the same
    assert r.status_code == 400 and r.json()["error"]["param"] == "store"


def test_openapi_says_request_bodies_are_closed(app):
    c, _ = app
    schemas = c.get("/openapi.json").json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions"):
        assert schemas[name]["additionalProperties"] is False, name
    assert set(IGNORED_FIELDS) <= set(schemas["CompletionRequest"]["properties"])


# ------------------------------------------------------------------ the sampling knobs
KNOB_PARAMS = [dict(temperature=0, repetition_penalty=1.5), dict(temperature=0.9, seed=3, frequency_penalty=1.0,
               presence_penalty=0.5, min_p=0.05), dict(temperature=0, logit_bias={7: 5.0, 9: -100.0}),
               dict(temperature=0.7, seed=11, min_tokens=6), dict(temperature=0.8, seed=5)]


def test_knobs_through_the_engine_equal_the_eager_baseline(app, tiny_dirs):
    """One batch mixing every knob with a plain row: the engine's batched sampler == the eager loop."""
    from minisys.engine.sampling_params import SamplingParams
    from minisys.llm import LLM
    _, llm = app
    eager = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True, engine="eager")
    prompts = ["the cat sat", "once upon", "a b c"]
    params = [SamplingParams(max_tokens=8, n=2 if k.get("seed") else 1, **k) for k in KNOB_PARAMS]
    for p in params:
        got = llm.generate(prompts, p, use_tqdm=False)
        want = eager.generate(prompts, p, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]


def test_the_server_honours_the_knobs_and_refuses_bad_values_naming_them(app):
    c, llm = app
    ids = c.post("/v1/completions", json={**BASE, "max_tokens": 4, "logit_bias": {"5": 100}}, headers=H).json()
    assert ids["choices"][0]["text"] == llm.tokenizer.decode([5] * 4)
    rep = c.post("/v1/completions", json={**BASE, "max_tokens": 6, "ignore_eos": True, "logit_bias": {"5": 100},
                                          "frequency_penalty": 2.0, "repetition_penalty": 1.2}, headers=H)
    assert rep.status_code == 200 and rep.json()["usage"]["completion_tokens"] == 6
    for field, value in [("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", -2.5),
                         ("repetition_penalty", 0), ("logit_bias", {"x": 1}), ("logit_bias", {"1": 200}),
                         ("logit_bias", {"99999999": 1}), ("min_tokens", -1), ("min_tokens", 50)]:
        r = c.post("/v1/completions", json={**BASE, field: value}, headers=H)
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] == field or field in r.json()["error"]["message"], r.text
    assert not llm.engine.has_unfinished()


def test_speculative_decoding_refuses_the_history_knobs_naming_them(tiny_dirs):
    from minisys.engine.sampling_params import SamplingParams
    from minisys.llm import LLM
    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=32, speculative_method="ngram"))
    for k in ("repetition_penalty", "presence_penalty", "min_tokens"):
        with pytest.raises(ValueError, match=f"^{k} is not supported with speculative decoding"):
            llm.engine.add_request("r", [1, 2, 3], SamplingParams(**{k: 1.5 if k != "min_tokens" else 2}))
    assert not llm.engine.has_unfinished()
    llm.engine.add_request("ok", [1, 2, 3], SamplingParams(min_p=0.1, max_tokens=2))   # min_p: in p and q alike


# ------------------------------------------------------------------ the small routes
def test_models_retrieve_tokenize_detokenize_version_behind_the_key(app):
    c, llm = app
    card = c.get("/v1/models/tiny", headers=H)
    assert card.status_code == 200 and card.json()["id"] == "tiny" and card.json()["object"] == "model"
    other = c.get("/v1/models/gpt-4o", headers=H)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    tok = c.post("/tokenize", json={"prompt": "the cat sat"}, headers=H).json()
    assert tok["tokens"] == llm.tokenizer.encode("the cat sat") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == llm.engine.config.max_model_len
    back = c.post("/detokenize", json={"tokens": tok["tokens"]}, headers=H).json()
    assert back == {"prompt": "the cat sat"}
    usage = c.post("/v1/completions", json={**BASE, "prompt": "the cat sat"}, headers=H).json()["usage"]
    assert usage["prompt_tokens"] == tok["count"]           # what /v1/completions counts
    assert c.get("/version", headers=H).json()["version"]
    for path, body in [("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
                       ("/tokenize", {}), ("/tokenize", {"prompt": "x", "add_special_tokens": True}),
                       ("/tokenize", {"prompt": "x", "frob": 1}), ("/detokenize", {"tokens": [-1]}),
                       ("/detokenize", {"tokens": [10 ** 9]}), ("/detokenize", {"tokens": "x"})]:
        r = c.post(path, json=body, headers=H)
        assert r.status_code == 400 and r.json()["error"]["param"], (path, body, r.text)
    for method, path in [("get", "/v1/models/tiny"), ("get", "/version"), ("post", "/tokenize"),
                         ("post", "/detokenize")]:
        assert getattr(c, method)(path).status_code == 401, path
    doc = c.get("/openapi.json").json()
    for path in ("/v1/models/{model_id}", "/version", "/tokenize", "/detokenize"):
        op = next(iter(doc["paths"][path].values()))
        assert op["security"] == [{"bearer": []}] and "401" in op["responses"], path
    assert doc["paths"]["/tokenize"]["post"]["requestBody"]["required"]
