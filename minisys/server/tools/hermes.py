"""The Hermes tool format (NousResearch's Hermes 2 Pro, vLLM's ``--tool-call-parser hermes``).

The model is shown the tools as JSON inside ``<tools></tools>`` and calls
one by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Rendering (for a chat template without a tool format, such as SmolLM2's):
`render_conversation` puts `tools_prompt` into the system message (after its
text, or as a new first message), an assistant message's ``tool_calls`` into
its content as ``<tool_call>`` blocks, and a tool message's content inside
``<tool_response></tool_response>``; the template then renders plain
role/content messages.

Parsing ("auto"): a ``<tool_call>...</tool_call>`` block whose body is a JSON
object with a ``name`` among the request's tools and an object of
``arguments`` is a call; everything else (text around the calls, a block that
is not valid JSON or names no tool, an unclosed block) is content, verbatim.
With ``parallel=False`` only the first call is kept (later ones are dropped,
as vLLM drops them). `parse` reads a whole text with a regular expression;
`HermesStreamParser` reads it piece by piece with a small state machine (the
two are independent, and the tests hold one against the other).
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from .calls import ContentGate, Parsed, StreamDelta, ToolCall, ToolCallDelta, arguments_text, new_call_id, \
    text_content

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), re.DOTALL)

PROMPT = ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
          "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
          "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
          "For each function call return a json object with function name and arguments within "
          "<tool_call></tool_call> XML tags as follows:\n"
          "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>")


# ------------------------------------------------------------------ rendering
def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system prompt that shows ``tools`` (OpenAI's ``{"type": "function", "function": {...}}``)."""
    return PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def render_conversation(messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]]
                        ) -> list[dict[str, str]]:
    """Role/content messages in the Hermes format, for a template that knows only role and content.

    ``messages``: dicts with ``role``, ``content`` (a string), and for an assistant ``tool_calls``
    (OpenAI's shape, ``arguments`` already a dict or list), for a tool its ``tool_call_id``.
    """
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            blocks = [call_block(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        if m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ------------------------------------------------------------------ parsing
def call_of(block: str, names: set[str]) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) of a block's body, or None if it is not a call of one of ``names``."""
    try:
        obj = json.loads(block)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments"), dict):
        return None
    return obj["name"], arguments_text(obj["arguments"])


def parse(text: str, names: set[str], parallel: bool = True) -> Parsed:
    """A whole output -> content and calls (the module's rules), by regular expression."""
    pieces, calls, at = [], [], 0
    for m in _BLOCK.finditer(text):
        pieces.append(text[at:m.start()])
        at = m.end()
        call = call_of(m.group(1), names)
        if call is None:
            pieces.append(m.group(0))
        elif parallel or not calls:
            calls.append(ToolCall(*call))
    pieces.append(text[at:])
    return Parsed(text_content("".join(pieces), bool(calls)), calls)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``tag`` (0: none)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class HermesStreamParser:
    """`parse`, piece by piece. Outside a block it releases content up to a possible start of ``<tool_call>``;
    inside one it waits for ``</tool_call>``, then releases the call (one delta: id, name and the whole
    arguments) or, if the block is not a call, the block as content."""

    def __init__(self, names: set[str], parallel: bool = True) -> None:
        self.names, self.parallel = names, parallel
        self.buf, self.inside, self.num_calls = "", False, 0
        self.gate = ContentGate()

    def feed(self, text: str) -> StreamDelta:
        self.buf += text
        out = StreamDelta()
        while True:
            if not self.inside:
                i = self.buf.find(OPEN)
                if i < 0:
                    cut = len(self.buf) - _partial_suffix(self.buf, OPEN)
                    out.content += self.gate.push(self.buf[:cut])
                    self.buf = self.buf[cut:]
                    return out
                out.content += self.gate.push(self.buf[:i])
                self.buf, self.inside = self.buf[i + len(OPEN):], True
            else:
                j = self.buf.find(CLOSE)
                if j < 0:
                    return out
                block, self.buf, self.inside = self.buf[:j], self.buf[j + len(CLOSE):], False
                out += self._block(block)

    def _block(self, block: str) -> StreamDelta:
        call = call_of(block, self.names)
        if call is None:
            return StreamDelta(content=self.gate.push(OPEN + block + CLOSE))
        if not self.parallel and self.num_calls:
            return StreamDelta()
        self.num_calls += 1
        name, arguments = call
        return StreamDelta(calls=[ToolCallDelta(self.num_calls - 1, arguments, new_call_id(), name)])

    def finish(self) -> StreamDelta:
        """The rest: held-back text, or an unclosed block, as content."""
        rest, self.buf = (OPEN if self.inside else "") + self.buf, ""
        self.inside = False
        return StreamDelta(content=self.gate.push(rest) + self.gate.flush(bool(self.num_calls)))
