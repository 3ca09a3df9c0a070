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
def app(tiny_dirs):
    from fastapi.testclient import TestClient

    from minisys.llm import LLM
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    llm = LLM(str(tiny_dirs["llama"]), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=64, max_num_seqs=4))
    with TestClient(build_app(AsyncLLMEngine(llm.engine), llm.tokenizer, "tiny", api_key=KEY)) as c:
        yield c, llm


BASE = {"prompt": "the", "max_tokens": 2, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("field,value", [
    ("frobnicate", 1), ("response_format", {"type": "json_object"}), ("tools", []), ("tool_choice", "none"),
    ("guided_json", {}), ("structured_outputs", {"json": {}}), ("prompt_logprobs", 1),
    ("truncate_prompt_tokens", 4), ("echo", True), ("logprobs", 2), ("top_logprobs", 2),
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
    extra = {"metadata": {"run": "a"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
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
