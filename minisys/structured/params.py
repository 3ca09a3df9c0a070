"""`StructuredOutputsParams`: what a request's output must match (vLLM's ``StructuredOutputsParams``).

Exactly one of the constraints is set:

* ``json``: a JSON schema (a dict, or a string holding one); the output is a JSON value valid against it;
* ``regex``: the whole output matches the regular expression (Rust ``regex`` syntax, anchored);
* ``choice``: the output is exactly one of the strings;
* ``grammar``: a context-free grammar, Lark or GBNF (llama.cpp) syntax;
* ``json_object``: True: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).

``origin`` (not vLLM's; not part of the spec's identity) is the request field the spec came from
(``structured_outputs``, ``response_format``, ``guided_json`` ...), so every error names the field the
client actually sent.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_SPEC_BYTES = 64 << 10      # a grammar's canonical text: bounds compile time and the cache's memory


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    origin: str = field(default="structured_outputs", compare=False, repr=False)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"{self.origin}: give exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"{self._name('json')} is not valid JSON: {e}") from None
            except RecursionError:
                raise ValueError(f"{self._name('json')} is nested too deeply") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"{self._name('json')} must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{self._name(name)} must be a non-empty string, got {v!r}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError(f"{self._name('choice')} must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"{self._name('json_object')} must be a boolean, got {self.json_object!r}")
        size = len(self.key()[1])
        if size > MAX_SPEC_BYTES:
            raise ValueError(f"{self.field_name}: {size} bytes is more than minisys compiles ({MAX_SPEC_BYTES}); "
                             "every distinct grammar is compiled and cached")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of `KINDS`."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def _name(self, kind: str) -> str:
        """The request field to name for constraint ``kind``: ``structured_outputs.json``, or the origin
        itself when it already names one field (``response_format.json_schema.schema``, ``guided_regex``)."""
        return self.origin if "." in self.origin or self.origin.startswith("guided_") else f"{self.origin}.{kind}"

    @property
    def field_name(self) -> str:
        """The request field to name in an error about this spec's constraint."""
        return self._name(self.kind)

    def key(self) -> tuple[str, str]:
        """The spec's identity for the compile cache: (kind, canonical text)."""
        k = self.kind
        if k == "json":
            try:
                return k, _json.dumps(self.json, sort_keys=True, separators=(",", ":"))
            except RecursionError:
                raise ValueError(f"{self._name('json')} is nested too deeply") from None
        if k == "choice":
            return k, _json.dumps(self.choice)
        if k == "json_object":
            return k, ""
        return k, getattr(self, k)
