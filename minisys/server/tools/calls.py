"""What the tool-call parsers return: calls found in a whole text, and streamed deltas of them."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional


def new_call_id() -> str:
    """A tool call's id, OpenAI's shape (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


def arguments_text(arguments: Any) -> str:
    """A call's arguments as the JSON string OpenAI returns (non-ASCII kept as is)."""
    return json.dumps(arguments, ensure_ascii=False)


@dataclass
class ToolCall:
    """One function call: its name and its arguments as a JSON string (OpenAI's ``function.arguments``)."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass
class Parsed:
    """A whole output split into ``content`` (None when there is no text besides the calls) and ``calls``."""

    content: Optional[str]
    calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """A piece of call ``index``: its first piece carries ``id`` and ``name``, every piece some ``arguments``
    (concatenated in order they make the call's arguments)."""

    index: int
    arguments: str = ""
    id: Optional[str] = None
    name: Optional[str] = None


@dataclass
class StreamDelta:
    """What one `feed` / `finish` releases: content text and call pieces (either may be empty)."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)

    def __iadd__(self, other: "StreamDelta") -> "StreamDelta":
        self.content += other.content
        self.calls += other.calls
        return self


class ContentGate:
    """Content as it streams, held back while it is only whitespace.

    The content of an output with calls whose other text is only whitespace
    is None (OpenAI's null), so nothing is streamed for it; once a non-space
    character comes, everything held back goes out with it; an output with
    no calls keeps its text as it is (`flush`). Invariant: what `push` and
    `flush` released, concatenated, is `text_content` of the whole text.
    """

    def __init__(self) -> None:
        self.started, self.held = False, ""

    def push(self, text: str) -> str:
        if self.started:
            return text
        self.held += text
        if self.held.strip():
            self.started, out, self.held = True, self.held, ""
            return out
        return ""

    def flush(self, called: bool) -> str:
        """At the end: what is still held back, unless the output made calls."""
        out, self.held = ("" if called else self.held), ""
        return out


def text_content(text: str, called: bool) -> Optional[str]:
    """The content of a whole output: None when it made calls and the rest is only whitespace."""
    return None if called and not text.strip() else text
