"""The JSON schemas that force a tool call through structured outputs (vLLM's, for the same choices).

``tool_choice: {"type": "function", "function": {"name": F}}``: the output is
F's arguments, so the schema is F's ``parameters``.

``tool_choice: "required"``: the output is a JSON array of at least one
``{"name": N, "parameters": {...}}``, each item one of the tools (its name
as a one-value enum, its parameters schema); at most one item when
``parallel_tool_calls`` is false.
"""
from __future__ import annotations

from typing import Any, Optional

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}   # OpenAI's: parameters left out


def named_schema(parameters: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The schema of a named function's output: its parameters (an empty object when it has none)."""
    return parameters if parameters is not None else dict(EMPTY_PARAMETERS)


def required_schema(tools: dict[str, Optional[dict[str, Any]]], parallel: bool = True) -> dict[str, Any]:
    """The schema of ``"required"``'s output, for ``tools`` ({name: parameters schema or None})."""
    if not tools:
        raise ValueError("tools is empty: tool_choice required needs at least one tool")
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [name]}, "parameters": named_schema(params)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, params in tools.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
