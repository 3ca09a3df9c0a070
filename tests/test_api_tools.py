"""Tool calling on /v1/chat/completions: ``tools``, ``tool_choice``, ``parallel_tool_calls`` (in-process).

Three servers, all through the `openai` client or raw JSON:

* the tiny random model behind SmolLM2's chat template (no tool format): the
  tools are rendered in the Hermes format (oracle: the prompt written out by
  hand, sent to /v1/completions); bad tool fields are 400s naming them;
  "auto" is refused unless the server has a tool-call parser, and with one,
  a model that writes no call gets plain content, the same as "none";
* a scripted engine that "generates" hand-written text: the server reads the
  calls out of it (oracle: the calls written in the script), streamed and not
  (the client's accumulated deltas equal the non-streamed body).

Forced calls ("required", a named function) need structured outputs: see
tests/test_api_tools_forced.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json

import openai
import pytest

from minisys.engine.config import EngineConfig
from minisys.engine.outputs import CompletionOutput, RequestOutput
from minisys.server.async_engine import OutputSlot, RequestStream, _AsyncEngineBase
from minisys.server.tools import hermes

KEY = "sk-tools"
H = {"Authorization": f"Bearer {KEY}"}
# SmolLM2-135M-Instruct's chat template, as its GGUF carries it (test_smollm2_template_has_no_tool_format)
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny_llm(tiny_dirs, tmp_path_factory):
    """The tiny llama with a 2048-token context (the tools' system prompt is long in its small vocabulary)."""
    import shutil

    from minisys.llm import LLM
    d = tmp_path_factory.mktemp("tools") / "llama"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 2048}))
    llm = LLM(str(d), device="cpu", dtype="float32", quiet=True,
              engine_config=EngineConfig(num_kv_blocks=192, max_num_seqs=4))
    llm.tokenizer.chat_template = SMOL_TEMPLATE
    return llm


def _client(app):
    from fastapi.testclient import TestClient
    c = TestClient(app)
    return c, openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0)


class _Servers:
    """``servers[kind]`` -> (raw, openai) clients of one app; "plain" serves it without a tool-call parser,
    "hermes" with ``--tool-call-parser hermes`` (the same app, its parser switched for the call)."""

    def __init__(self, app, raw, oa) -> None:
        self.app, self.pair = app, (raw, oa)

    def __getitem__(self, kind: str):
        self.app.state.server.tool_call_parser = None if kind == "plain" else kind
        return self.pair


@pytest.fixture(scope="module")
def servers(tiny_llm):
    from minisys.server.app import build_app
    from minisys.server.async_engine import AsyncLLMEngine

    app = build_app(AsyncLLMEngine(tiny_llm.engine), tiny_llm.tokenizer, "tiny", api_key=KEY)
    raw, oa = _client(app)
    with raw:
        yield _Servers(app, raw, oa)


def test_smollm2_template_has_no_tool_format():
    from minisys.model.store import default_model_dir
    from minisys.model.tokenizer import Tokenizer
    tk = Tokenizer.from_dir(default_model_dir(quiet=True))
    assert tk.chat_template == SMOL_TEMPLATE and not tk.template_has_tools
    with pytest.raises(ValueError, match="no tool format"):
        tk.apply_chat_template(ASK, tools=TOOLS)


def test_a_template_with_a_tool_format_gets_the_tools_and_the_history():
    from minisys.model.tokenizer import Tokenizer
    tk = Tokenizer(None, "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                         "{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                         "<{{ c.function.name }} {{ c.function.arguments.city }}>{% endfor %};{% endfor %}")
    assert tk.template_has_tools
    msgs = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]
    assert tk.apply_chat_template(msgs, tools=TOOLS) == "[get_weather][add]user:Weather in Paris?;assistant:" \
        "<get_weather Paris>;"


def test_tools_are_rendered_hermes_style_and_none_reads_no_calls(servers):
    """tool_choice none: the model sees the tools (vLLM renders them) and its text is content, verbatim:
    the same as /v1/completions of the prompt written out by hand."""
    c, oa = servers["plain"]
    system = hermes.tools_prompt(TOOLS)
    assert json.dumps(WEATHER) in system and "<tool_call>" in system
    prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
              f"<|im_start|>assistant\n")
    want = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0}, headers=H).json()
    got = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                     max_completion_tokens=6, temperature=0)
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    m = got.choices[0].message
    assert m.content == want["choices"][0]["text"] and not m.tool_calls
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"] == "length"


def test_history_with_tool_calls_and_results_is_rendered(servers):
    c, _ = servers["plain"]
    msgs = [{"role": "system", "content": "Be brief."}, *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20C"}]
    ids = c.post("/tokenize", json={"messages": msgs}, headers=H).json()["tokens"]
    text = c.post("/detokenize", json={"tokens": ids}, headers=H).json()["prompt"]
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                    "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                    "{\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>\n20C\n"
                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def _named(name):
    return {"type": "function", "function": {"name": name}}


BAD = [   # (extra body fields, the param the 400 names, a word of the message)
    ({"tools": []}, "tools", "empty"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "more than"),
    ({"tools": [{"type": "function", "function": {"name": "big", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "^a+$"} for i in range(3000)}}}}]},
     "tools", "bytes of function definitions"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools", "name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "same name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools",
     "not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools",
     "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]}, "tools", "tools.0.function.x"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": _named("nope")}, "tool_choice", "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": _named("add")}, "tool_choice", "needs tools"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "needs tools"),
    ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}], "tool_choice": "none"},
     "tools", "strict"),
    ({"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice"),          # "auto", the default
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages", "only an assistant"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages", "only a tool message"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages", "not JSON"),
]


@pytest.mark.parametrize("extra,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_tool_fields_are_400s_naming_them(servers, tiny_llm, extra, param, words):
    c, _ = servers["plain"]
    r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **extra}, headers=H)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert not tiny_llm.engine.has_unfinished()


@pytest.mark.parametrize("field,value", [("tools", TOOLS), ("tool_choice", "none"), ("parallel_tool_calls", True)])
def test_completions_refuse_the_tool_fields(servers, field, value):
    c, _ = servers["plain"]
    r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, field: value}, headers=H)
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_auto_when_the_model_writes_no_call_is_plain_content(servers):
    """With --tool-call-parser hermes, "auto" reads calls; the tiny random model writes none, so its text is
    content, the same as "none" (same prompt, greedy), streamed or not, finish_reason untouched."""
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_completion_tokens=12, temperature=0,
              extra_body={"skip_special_tokens": False, "ignore_eos": True})
    none = servers["plain"][1].chat.completions.create(tool_choice="none", **kw).choices[0]
    _, oa = servers["hermes"]
    auto = oa.chat.completions.create(**kw).choices[0]
    assert auto.message.content == none.message.content and not auto.message.tool_calls
    assert none.message.content.strip() and "<tool_call>" not in none.message.content
    assert auto.finish_reason == "length"
    text, calls = _accumulate(oa.chat.completions.create(stream=True, tool_choice="auto", **kw))
    assert text == none.message.content and calls == {}


# ------------------------------------------------------------------ scripted output through the server
class ScriptedEngine(_AsyncEngineBase):
    """An async engine whose every choice "generates" ``self.script`` (a list of text pieces), one piece
    per output, then stops: the model made to write exactly a given text."""

    max_model_len = 4096

    def __init__(self) -> None:
        super().__init__()
        self.script: list[str] = []

    async def add_request(self, request_id, prompt_ids, params, prompt=None, **meta) -> RequestStream:
        slot = OutputSlot()
        self._queues[request_id] = slot
        asyncio.get_running_loop().create_task(self._play(request_id, prompt, prompt_ids, params.n, list(self.script)))
        return RequestStream(request_id, slot)

    async def _play(self, rid, prompt, ids, n, pieces) -> None:
        for i in range(n):
            for j, piece in enumerate(pieces):
                await asyncio.sleep(0.002)
                last = j == len(pieces) - 1
                self._deliver(RequestOutput(rid, prompt, ids, [CompletionOutput(i, piece, [1], "stop" if last else None)],
                                            finished=last and i == n - 1))

    async def _run(self) -> None:
        await asyncio.Event().wait()

    def stats(self) -> dict:
        return {"num_requests_running": 0, "num_requests_waiting": 0, "num_requests_in_engine": len(self._queues),
                "kv_cache_usage_perc": 0.0, "engine_step_errors": 0}


@pytest.fixture(scope="module")
def scripted(tiny_llm):
    from minisys.server.app import build_app
    engine = ScriptedEngine()
    c, oa = _client(build_app(engine, tiny_llm.tokenizer, "tiny", api_key=KEY, tool_call_parser="hermes"))
    with c:
        yield engine, oa


def _accumulate(stream):
    """A streamed reply's content and {index: [id, name, arguments]}, added up from the deltas."""
    text, calls, finish = "", {}, []
    for chunk in stream:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                assert len(ch.delta.tool_calls) == 1 and not ch.delta.content      # one piece per chunk
                if d.index not in calls:        # OpenAI's first piece: id, type, name, empty arguments
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == "", d
                    calls[d.index] = [d.id, d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None and d.function.arguments, d
                calls[d.index][2] += d.function.arguments
            finish += [ch.finish_reason] if ch.finish_reason else []
    _accumulate.finish = finish
    return text, calls


W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
A = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
SCRIPTS = [   # (pieces, content, [(name, arguments)], finish_reason)
    (["Let me", " look. <tool", f"_call>\n{W[:9]}", f"{W[9:]}\n</tool_call>"], "Let me look. ",
     [("get_weather", {"city": "Paris"})], "tool_calls"),
    ([f"<tool_call>{W}</tool_call>\n<tool_call>", A, "</tool_call>"], None,
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})], "tool_calls"),
    (["<tool_call>{\"name\": \"get_weather\", \"arguments\": {ci", "ty}}</tool_call> sorry"],
     '<tool_call>{"name": "get_weather", "arguments": {city}}</tool_call> sorry', [], "stop"),
    (["It is sunny."], "It is sunny.", [], "stop"),
]


@pytest.mark.parametrize("pieces,content,calls,finish", SCRIPTS, ids=["text+call", "two", "malformed", "text"])
def test_auto_reads_the_calls_the_model_writes(scripted, pieces, content, calls, finish):
    engine, oa = scripted
    engine.script = pieces
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.message.content == content and choice.finish_reason == finish
    got = [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls or []]
    assert got == calls
    assert all(t.id.startswith("call_") and t.type == "function" for t in choice.message.tool_calls or [])
    text, streamed = _accumulate(oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True))
    assert text == (content or "") and _accumulate.finish == [finish]
    assert [(name, json.loads(args)) for _, name, args in streamed.values()] == calls


def test_parallel_tool_calls_false_keeps_the_first_call(scripted):
    engine, oa = scripted
    engine.script = [f"<tool_call>{W}</tool_call><tool_call>{A}</tool_call>"]
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_weather"]
    _, streamed = _accumulate(oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, stream=True,
                                                         parallel_tool_calls=False))
    assert [name for _, name, _ in streamed.values()] == ["get_weather"]


def test_each_choice_has_its_own_parser(scripted):
    engine, oa = scripted
    engine.script = [f"ok <tool_call>{W[:20]}", f"{W[20:]}</tool_call>"]
    r = oa.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, n=2)
    assert [(c.index, c.message.content, c.message.tool_calls[0].function.name) for c in r.choices] == \
        [(0, "ok ", "get_weather"), (1, "ok ", "get_weather")]
    assert r.choices[0].message.tool_calls[0].id != r.choices[1].message.tool_calls[0].id


def test_the_auto_flags_come_together():
    from minisys.server.launch import add_serve_args, tool_call_parser
    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert tool_call_parser(p.parse_args([])) is None
    assert tool_call_parser(p.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"])) == "hermes"
    for one in (["--enable-auto-tool-choice"], ["--tool-call-parser", "hermes"]):
        with pytest.raises(ValueError, match="go together"):
            tool_call_parser(p.parse_args(one))
    with pytest.raises(SystemExit):
        p.parse_args(["--tool-call-parser", "mistral"])
