"""One request's tool mode: what ``tool_choice`` asks for and how its output is read.

    "none"       no calls are read: the output is content (the tools are still shown to the model)
    "auto"       the model may call: ``--tool-call-parser`` (hermes) reads calls from its text
    "required"   structured outputs force an array of one or more calls (`schema.required_schema`)
    named        structured outputs force the arguments of that function (`schema.named_schema`)

finish_reason is ``"tool_calls"`` when "auto" or "required" returned calls and
generation stopped by itself; a named function keeps ``"stop"`` (OpenAI's
behaviour); ``"length"`` always stays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from . import forced, hermes, schema
from .calls import Parsed

TOOL_CALL_PARSERS = ("hermes",)          # --tool-call-parser choices


@dataclass
class ToolMode:
    """``kind``: none / auto / required / named; ``tools``: {name: parameters schema or None};
    ``name``: the named function; ``parallel``: False keeps at most one call."""

    kind: str
    tools: dict[str, Optional[dict[str, Any]]]
    name: Optional[str] = None
    parallel: bool = True

    @property
    def reads_calls(self) -> bool:
        return self.kind != "none"

    def forced_schema(self) -> Optional[dict[str, Any]]:
        """The JSON schema structured outputs must enforce (None: generation is not forced)."""
        if self.kind == "required":
            return schema.required_schema(self.tools, self.parallel)
        if self.kind == "named":
            return schema.named_schema(self.tools[self.name])
        return None

    def stream_parser(self):
        """A fresh parser with ``feed(text) -> StreamDelta`` and ``finish() -> StreamDelta``."""
        names = set(self.tools)
        if self.kind == "auto":
            return hermes.HermesStreamParser(names, self.parallel)
        if self.kind == "required":
            return forced.RequiredParser(names, self.parallel)
        if self.kind == "named":
            return forced.NamedParser(self.name)
        raise ValueError(f"tool_choice {self.kind!r} reads no calls")

    def parse(self, text: str) -> Parsed:
        """A whole output -> content and calls."""
        if self.kind == "auto":
            return hermes.parse(text, set(self.tools), self.parallel)
        return forced.collect(self.stream_parser(), text)

    def finish_reason(self, reason: Optional[str], called: bool) -> Optional[str]:
        if called and reason == "stop" and self.kind in ("auto", "required"):
            return "tool_calls"
        return reason
