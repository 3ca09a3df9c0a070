"""Parsers of forced tool calls: the output structured outputs produced for ``tool_choice``
"required" or a named function (`schema`).

Named function F: the whole output is F's arguments; streamed, the first delta
carries the call's id and name, every delta a fragment of the arguments as
it is generated.

"required": the output is ``[{"name": N, "parameters": {...}}, ...]``. A
scanner follows the JSON (strings, escapes, nesting) character by character
and releases each call when its array item closes. Text it cannot read as
such an array (cut short by ``max_tokens``, or not matching the schema) ends
the calls: from there on everything is content, released at `finish`. The
oracle for a complete output is ``json.loads``.
"""
from __future__ import annotations

import json
from typing import Optional

from .calls import Parsed, StreamDelta, ToolCall, ToolCallDelta, arguments_text, new_call_id, text_content


def collect(parser, text: str) -> Parsed:
    """A stream parser fed the whole ``text`` at once, as a `Parsed` (the non-streamed response)."""
    d = parser.feed(text)
    d += parser.finish()
    calls: dict[int, ToolCall] = {}
    for c in d.calls:
        if c.index not in calls:
            calls[c.index] = ToolCall(c.name or "", "", c.id or new_call_id())
        calls[c.index].arguments += c.arguments
    return Parsed(text_content(d.content, bool(calls)), [calls[i] for i in sorted(calls)])


class NamedParser:
    """The output of a named function's forced call: all of it is that call's arguments."""

    def __init__(self, name: str) -> None:
        self.name, self.id = name, None

    def feed(self, text: str) -> StreamDelta:
        if self.id is None:
            self.id = new_call_id()
            return StreamDelta(calls=[ToolCallDelta(0, text, self.id, self.name)])
        return StreamDelta(calls=[ToolCallDelta(0, text)] if text else [])

    def finish(self) -> StreamDelta:
        return self.feed("") if self.id is None else StreamDelta()


class RequiredParser:
    """The output of ``"required"``: an array of ``{"name", "parameters"}``, released item by item."""

    def __init__(self, names: set[str], parallel: bool = True) -> None:
        self.names, self.parallel = names, parallel
        self.text, self.pos = "", 0           # all text so far; the next character to scan
        self.consumed = 0                     # text[:consumed] is calls and JSON punctuation
        self.depth, self.in_string, self.escape = 0, False, False
        self.item_start: Optional[int] = None
        self.closed = self.failed = False
        self.num_calls = 0

    def feed(self, text: str) -> StreamDelta:
        self.text += text
        out = StreamDelta()
        while self.pos < len(self.text) and not self.failed:
            call = self._step(self.text[self.pos])
            self.pos += 1
            if call is not None:
                out.calls.append(call)
        return out

    def _step(self, ch: str) -> Optional[ToolCallDelta]:
        """Scan one character; a finished, valid item -> its call (None otherwise, or when dropped)."""
        if self.item_start is not None:                    # inside an item: follow strings and nesting
            if self.in_string:
                self.escape, self.in_string = (False, True) if self.escape else (ch == "\\", ch != '"')
                return None
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1:
                    return self._item(self.text[self.item_start:self.pos + 1])
            return None
        if ch.isspace() or (ch == "," and self.depth == 1 and self.num_calls):
            return None
        if self.closed:
            self.failed = True
        elif self.depth == 0 and ch == "[":
            self.depth = 1                          # not consumed: an array with no valid item is content
        elif self.depth == 1 and ch == "{":
            self.item_start, self.depth = self.pos, 2
        elif self.depth == 1 and ch == "]" and self.num_calls:
            self.depth, self.closed, self.consumed = 0, True, self.pos + 1
        else:
            self.failed = True
        return None

    def _item(self, item: str) -> Optional[ToolCallDelta]:
        self.item_start = None
        try:
            obj = json.loads(item)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict) or obj.get("name") not in self.names or \
                not isinstance(obj.get("parameters"), dict):
            self.failed = True
            return None
        self.consumed = self.pos + 1
        if not self.parallel and self.num_calls:
            return None
        self.num_calls += 1
        return ToolCallDelta(self.num_calls - 1, arguments_text(obj["parameters"]), new_call_id(), obj["name"])

    def finish(self) -> StreamDelta:
        """Whatever was not read as calls (a cut-short or off-schema output) as content, else nothing."""
        rest = self.text[self.consumed:]
        self.consumed = len(self.text)
        return StreamDelta(content=rest if rest.strip() or not self.num_calls else "")
