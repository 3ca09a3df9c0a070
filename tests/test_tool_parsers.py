"""Tool-call parsing and forcing, without a model (`minisys.server.tools`).

Oracles: the Hermes stream parser (a state machine) against the whole-text
parser (a regular expression), fed at every split point and one character at
a time; the "required" parser against ``json.loads`` of the output; the forced
schemas against the ``jsonschema`` library's validator.
"""
from __future__ import annotations

import json

import jsonschema
import pytest

from minisys.server.tools import hermes, schema
from minisys.server.tools.calls import Parsed, StreamDelta
from minisys.server.tools.forced import NamedParser, RequiredParser, collect
from minisys.server.tools.mode import ToolMode

NAMES = {"get_weather", "add"}
W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
A = '{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}'

HERMES_CASES = [
    # (text, expected content, expected [(name, arguments dict)])
    ("Just text, no call.", "Just text, no call.", []),
    (f"<tool_call>\n{W}\n</tool_call>", None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    (f"Let me check. <tool_call>{W}</tool_call>", "Let me check. ", [("get_weather", {"city": "Paris", "unit": "c"})]),
    (f"<tool_call>{W}</tool_call>\n<tool_call>{A}</tool_call>\n", None,
     [("get_weather", {"city": "Paris", "unit": "c"}), ("add", {"a": 1, "b": [2, "}"]})]),
    ("<tool_call>{not json}</tool_call> then", "<tool_call>{not json}</tool_call> then", []),
    (f"a<tool_call>{{bad</tool_call>b<tool_call>{A}</tool_call>", "a<tool_call>{bad</tool_call>b",
     [("add", {"a": 1, "b": [2, "}"]})]),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),                  # not one of the tools
    ('<tool_call>{"name": "add", "arguments": "1+2"}</tool_call>',
     '<tool_call>{"name": "add", "arguments": "1+2"}</tool_call>', []),                 # arguments not an object
    (f"cut short <tool_call>{W[:20]}", f"cut short <tool_call>{W[:20]}", []),           # unclosed block
    ("ends with <tool_ca", "ends with <tool_ca", []),                                   # a partial tag is text
    ("< tool_call> <tool_call <", "< tool_call> <tool_call <", []),
    (f"<tool_call><tool_call>{W}</tool_call>", f"<tool_call><tool_call>{W}</tool_call>", []),   # nested open
    ("  \n ", "  \n ", []),                                                           # no calls: text as is
    (f"<tool_call>{json.dumps({'name': 'add', 'arguments': {'s': 'é ✓ </tool'}})}</tool_call>", None,
     [("add", {"s": "é ✓ </tool"})]),
]


def _calls(parsed: Parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_parse_of_hand_written_outputs(text, content, calls):
    p = hermes.parse(text, NAMES)
    assert p.content == content and _calls(p) == calls
    assert all(c.id.startswith("call_") for c in p.calls) and len({c.id for c in p.calls}) == len(p.calls)


def _streamed(parser, pieces: list[str]) -> Parsed:
    """Accumulate a stream parser's deltas as an OpenAI client does (calls by index, arguments appended)."""
    total = StreamDelta()
    for piece in pieces:
        total += parser.feed(piece)
    total += parser.finish()
    calls: dict[int, list] = {}
    for d in total.calls:
        if d.index not in calls:
            assert d.id is not None and d.name is not None, "a call's first delta carries its id and name"
            calls[d.index] = [d.name, ""]
        else:
            assert d.id is None and d.name is None
        calls[d.index][1] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    from minisys.server.tools.calls import ToolCall
    return Parsed(total.content if total.content or not calls else None, [ToolCall(n, a) for n, a in calls.values()])


def _splits(text: str):
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_stream_equals_whole_text_parse_at_every_split(text, content, calls):
    whole = hermes.parse(text, NAMES)
    for pieces in _splits(text):
        got = _streamed(hermes.HermesStreamParser(NAMES), pieces)
        assert got.content == whole.content, pieces
        assert [(c.name, c.arguments) for c in got.calls] == [(c.name, c.arguments) for c in whole.calls], pieces


def test_parallel_false_keeps_only_the_first_call():
    text = f"<tool_call>{W}</tool_call><tool_call>{A}</tool_call>"
    assert [c.name for c in hermes.parse(text, NAMES, parallel=False).calls] == ["get_weather"]
    assert [c.name for c in _streamed(hermes.HermesStreamParser(NAMES, parallel=False), list(text)).calls] \
        == ["get_weather"]


# ------------------------------------------------------------------ forced: required / named
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = {"get_weather": WEATHER, "add": None}


def test_required_schema_accepts_calls_and_rejects_the_rest():
    s = schema.required_schema(TOOLS)
    jsonschema.Draft202012Validator.check_schema(s)
    ok = [[{"name": "get_weather", "parameters": {"city": "Paris"}}],
          [{"name": "add", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}]]
    bad = [[], [{"name": "nope", "parameters": {}}], [{"name": "get_weather", "parameters": {}}],
           [{"name": "add"}], {"name": "add", "parameters": {}}, [{"name": "add", "parameters": {}, "x": 1}]]
    for v in ok:
        jsonschema.validate(v, s)
    for v in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(v, s)
    one = schema.required_schema(TOOLS, parallel=False)
    jsonschema.validate(ok[0], one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok[1], one)


def test_named_schema_is_the_functions_parameters():
    assert schema.named_schema(WEATHER) == WEATHER
    jsonschema.validate({}, schema.named_schema(None))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema.named_schema(None))


REQUIRED_OK = [
    '[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
    ' [ {"parameters": {"city": "a\\"]}[,"}, "name": "get_weather"} ,\n{"name":"add","parameters":{"x":[1,{"y":2}]}} ] ',
]


@pytest.mark.parametrize("text", REQUIRED_OK)
def test_required_parser_matches_json_loads(text):
    expect = [(o["name"], o["parameters"]) for o in json.loads(text)]
    for pieces in _splits(text):
        got = _streamed(RequiredParser(set(TOOLS)), pieces)
        assert got.content is None and [(c.name, json.loads(c.arguments)) for c in got.calls] == expect, pieces
    p = collect(RequiredParser(set(TOOLS)), text)
    assert p.content is None and [(c.name, json.loads(c.arguments)) for c in p.calls] == expect


@pytest.mark.parametrize("text,ncalls,content", [
    ('[{"name": "add", "parameters": {}}, {"name": "get_wea', 1, ', {"name": "get_wea'),    # cut by max_tokens
    ('[{"name": "nope", "parameters": {}}]', 0, '[{"name": "nope", "parameters": {}}]'),
    ('{"name": "add", "parameters": {}}', 0, '{"name": "add", "parameters": {}}'),
    ('[{"name": "add", "parameters": {}}] trailing', 1, ' trailing'),
    ('[,]', 0, '[,]'),
])
def test_required_parser_off_schema_text_becomes_content(text, ncalls, content):
    whole = collect(RequiredParser(set(TOOLS)), text)
    assert (len(whole.calls), whole.content) == (ncalls, content)
    for pieces in _splits(text):
        got = _streamed(RequiredParser(set(TOOLS)), pieces)
        assert (len(got.calls), got.content) == (ncalls, content), pieces


def test_named_parser_streams_the_arguments_as_they_come():
    text = '{"city": "Par\\"is"}'
    p = collect(NamedParser("get_weather"), text)
    assert p.content is None and [(c.name, c.arguments) for c in p.calls] == [("get_weather", text)]
    parser = NamedParser("get_weather")
    deltas = [parser.feed(ch) for ch in text] + [parser.finish()]
    assert deltas[0].calls[0].name == "get_weather" and deltas[0].calls[0].id.startswith("call_")
    assert all(len(d.calls) == 1 and d.calls[0].arguments == ch for d, ch in zip(deltas, text))
    assert _streamed(NamedParser("f"), []).calls[0].arguments == ""        # nothing generated: one empty call


def test_mode_finish_reason_and_forced_schema():
    auto, named = ToolMode("auto", TOOLS), ToolMode("named", TOOLS, name="get_weather")
    assert auto.forced_schema() is None and named.forced_schema() == WEATHER
    assert auto.finish_reason("stop", True) == "tool_calls" and auto.finish_reason("stop", False) == "stop"
    assert auto.finish_reason("length", True) == "length" and named.finish_reason("stop", True) == "stop"
    assert ToolMode("required", TOOLS).finish_reason("stop", True) == "tool_calls"


# ------------------------------------------------------------------ rendering
def test_hermes_rendering_of_tools_calls_and_results():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "P"}}}]},
            {"role": "tool", "content": "20C", "tool_call_id": "call_1"}]
    out = hermes.render_conversation(msgs, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[0]["content"].startswith("Be brief.\n\n") and json.dumps(tools[0]) in out[0]["content"]
    assert hermes.parse(out[2]["content"], {"get_weather"}).calls[0].arguments == '{"city": "P"}'
    assert out[3]["content"] == "<tool_response>\n20C\n</tool_response>"
    assert hermes.render_conversation(msgs[1:2], tools)[0]["role"] == "system"           # a new first message
    assert hermes.render_conversation(msgs[1:2], None) == msgs[1:2]
