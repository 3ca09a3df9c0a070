"""Forced tool calls: ``tool_choice: "required"`` and a named function, through structured outputs.

SmolLM2-135M-Instruct behind the in-process server, through the `openai`
client. Oracles: the ``jsonschema`` library validates each call's arguments
against the tool's own ``parameters``; the streamed deltas, added up as a
client adds them, equal the non-streamed reply (greedy, so the same text).

Needs `minisys.structured` (the engine's structured outputs); skipped only
when that package is absent.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

KEY = "sk-forced"
UNIT = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_unit", "description": "Choose the temperature unit",
                                           "parameters": UNIT}},
         {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": CITY}}]
SCHEMAS = {"set_unit": UNIT, "get_weather": CITY}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
KW = dict(model="smol", messages=ASK, tools=TOOLS, temperature=0, max_completion_tokens=48)


@pytest.fixture(scope="module")
def oa(smol):
    from fastapi.testclient import TestClient

    from minisys.engine.config import EngineConfig
    from minisys.engine.llm_engine import LLMEngine
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    model, tok = smol
    engine = LLMEngine(model, tok, EngineConfig(num_kv_blocks=128, max_num_seqs=4))
    with TestClient(build_app(AsyncLLMEngine(engine), tok, "smol", api_key=KEY)) as c:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0), c


def _streamed(stream):
    """(content, [(name, arguments)], finish_reasons) added up from the deltas, as a client does."""
    text, calls, finish = "", {}, []
    for chunk in stream:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:        # OpenAI's first piece: id, type, name, empty arguments
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    calls[d.index] = [d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None
                calls[d.index][1] += d.function.arguments or ""
            finish += [ch.finish_reason] if ch.finish_reason else []
    return text or None, [tuple(calls[i]) for i in sorted(calls)], finish


def _check_calls(message, names):
    assert message.tool_calls, message
    for t in message.tool_calls:
        assert t.function.name in names and t.id.startswith("call_")
        jsonschema.validate(json.loads(t.function.arguments), SCHEMAS[t.function.name])
    return [(t.function.name, t.function.arguments) for t in message.tool_calls]


def test_a_named_function_is_called_with_valid_arguments(oa):
    client, _ = oa
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(tool_choice=choice, **KW).choices[0]
    calls = _check_calls(r.message, {"get_weather"})
    assert len(calls) == 1 and r.message.content is None and r.finish_reason == "stop"    # OpenAI's: "stop"
    assert _streamed(client.chat.completions.create(tool_choice=choice, stream=True, **KW)) == \
        (None, calls, ["stop"])


def test_required_calls_one_or_more_tools_with_valid_arguments(oa):
    client, _ = oa
    r = client.chat.completions.create(tool_choice="required", **KW).choices[0]
    calls = _check_calls(r.message, set(SCHEMAS))
    assert r.message.content is None and r.finish_reason == "tool_calls"
    assert _streamed(client.chat.completions.create(tool_choice="required", stream=True, **KW)) == \
        (None, calls, ["tool_calls"])


def test_required_without_parallel_calls_makes_exactly_one(oa):
    client, _ = oa
    r = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **KW).choices[0]
    assert len(_check_calls(r.message, set(SCHEMAS))) == 1


def test_a_forced_call_with_another_output_constraint_is_a_400(oa):
    _, c = oa
    body = {**KW, "messages": ASK, "tool_choice": "required", "response_format": {"type": "json_object"}}
    r = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("tool_choice", "response_format"), r.text


def test_a_tool_schema_structured_outputs_cannot_compile_is_a_400_naming_tools(oa):
    _, c = oa
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    for choice in ({"type": "function", "function": {"name": "f"}}, "required"):
        body = {**KW, "tools": [*TOOLS, bad], "tool_choice": choice}
        r = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
        assert "function.parameters" in r.json()["error"]["message"]
