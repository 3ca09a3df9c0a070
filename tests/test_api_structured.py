"""Structured outputs over the OpenAI routes: the `openai` client's ``parse`` helper, LangChain's
``with_structured_output(method="json_schema")``, vLLM's ``structured_outputs`` / ``guided_*`` fields.

In-process app (fastapi TestClient as the clients' HTTP transport) over SmolLM2. Oracles: the
client libraries' own parsing into the pydantic model, ``jsonschema`` on the raw content, ``re``.
"""
from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from minisys.engine.config import EngineConfig

KEY = "sk-structured"
H = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.slow


class Address(BaseModel):
    city: str = Field(max_length=10)
    country: Literal["UK", "FR", "US"]


class Person(BaseModel):
    """A person and where they live."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    languages: list[Literal["en", "fr", "de"]] = Field(max_length=2)
    address: Address


@pytest.fixture(scope="module")
def env(smol):
    from fastapi.testclient import TestClient

    from minisys.engine.llm_engine import LLMEngine
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    model, tok = smol
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=128, max_num_seqs=8))
    with TestClient(build_app(AsyncLLMEngine(engine), tok, "smol", api_key=KEY)) as c:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0), c, engine


MSG = [{"role": "user", "content": "Give the name, age, languages and address of a famous scientist."}]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_openai_parse_helper_returns_a_valid_pydantic_object(env, temperature):
    client, _, _ = env
    r = client.chat.completions.parse(model="smol", messages=MSG, response_format=Person, max_tokens=100,
                                      temperature=temperature, seed=1)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Person)                     # the client's own parse + validation
    jsonschema.validate(json.loads(msg.content), Person.model_json_schema())


def test_langchain_with_structured_output_json_schema(env):
    from langchain_openai import ChatOpenAI
    _, c, _ = env
    llm = ChatOpenAI(model="smol", base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0,
                     temperature=0, max_tokens=100)
    out = llm.with_structured_output(Person, method="json_schema").invoke(MSG[0]["content"])
    assert isinstance(out, Person)


CAT = [{"role": "user", "content": "Reply with a JSON object describing a cat, with keys name and age."}]


@pytest.mark.parametrize("path,base", [("/v1/chat/completions", {"messages": CAT}),
                                       ("/v1/completions", {"prompt": '{"name": "Tom", "age": 3}\n'})])
def test_vllm_fields_and_json_object_on_both_routes(env, path, base):
    _, c, _ = env
    text = (lambda r: r["choices"][0]["message"]["content"]) if "chat" in path else \
        (lambda r: r["choices"][0]["text"])
    cases = [({"response_format": {"type": "json_object"}}, lambda s: isinstance(json.loads(s), dict)),
             ({"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}}, lambda s: re.fullmatch("[0-9]{4}-[0-9]{2}", s)),
             ({"structured_outputs": {"choice": ["red", "green"]}}, lambda s: s in ("red", "green")),
             ({"guided_choice": ["up", "down"]}, lambda s: s in ("up", "down")),
             ({"guided_regex": "[A-Z]{3}"}, lambda s: re.fullmatch("[A-Z]{3}", s)),
             ({"guided_json": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}},
              lambda s: 1 <= len(json.loads(s)) <= 3),
             ({"structured_outputs": {"grammar": 'start: "ab" | "cd"'}}, lambda s: s in ("ab", "cd")),
             ({"response_format": {"type": "text"}}, lambda s: isinstance(s, str))]
    for extra, ok in cases:
        r = c.post(path, json={**base, **extra, "max_tokens": 60, "temperature": 0}, headers=H)
        assert r.status_code == 200, (extra, r.text)
        assert ok(text(r.json())), (extra, text(r.json()))


def test_streamed_deltas_add_up_to_valid_json(env):
    client, _, _ = env
    schema = Person.model_json_schema()
    stream = client.chat.completions.create(model="smol", messages=MSG, max_tokens=100, temperature=0, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "p", "schema": schema}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("extra,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format.json_schema.schema is required"),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format.type"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "structured_outputs.regex"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json": {}, "disable_any_whitespace": True}}, "structured_outputs",
     "structured_outputs.disable_any_whitespace"),
    ({"guided_json": "{oops"}, "guided_json", "guided_json is not valid JSON"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "guided_decoding_backend"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "give one"),
])
def test_bad_structured_requests_are_a_400_naming_the_field(env, extra, param, words):
    _, c, engine = env
    for path, base in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "x"})):
        r = c.post(path, json={**base, **extra, "max_tokens": 4}, headers=H)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["param"] == param, err
    assert not engine.has_unfinished()
    assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=H).status_code == 200


def test_structured_outputs_with_speculative_decoding_is_a_400(smol):
    from fastapi.testclient import TestClient

    from minisys.engine.llm_engine import LLMEngine
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    model, tok = smol
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=64, speculative_method="ngram"))
    with TestClient(build_app(AsyncLLMEngine(engine), tok, "smol", api_key=KEY)) as c:
        r = c.post("/v1/chat/completions", headers=H, json={
            "messages": MSG, "max_tokens": 4, "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "speculative decoding" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "response_format"
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=H).status_code == 200
