"""Tool calling for /v1/chat/completions (OpenAI's ``tools`` / ``tool_choice``, as vLLM serves them).

One job per module:

    calls.py     what a parser returns: `ToolCall`, `Parsed` (whole text), `StreamDelta` (streamed)
    schema.py    the JSON schema that forces a call: ``"required"`` (an array of {name, parameters})
                 and a named function (its parameters), for structured outputs
    hermes.py    the Hermes format: tools rendered into a system prompt for a chat template that has
                 no tool format, and the ``<tool_call>{...}</tool_call>`` parser ("auto")
    forced.py    the parsers of forced output ("required" / named), whole and streamed
    mode.py      one request's tool mode: which parser, which finish_reason

Invariant of every parser: feeding a text in any pieces (`feed` ... `finish`)
gives deltas whose concatenation equals what `parse` returns for the whole
text: the same content and the same calls (ids aside).
"""
from .calls import Parsed, StreamDelta, ToolCall, ToolCallDelta, new_call_id
from .mode import TOOL_CALL_PARSERS, ToolMode

__all__ = ["Parsed", "StreamDelta", "ToolCall", "ToolCallDelta", "new_call_id", "TOOL_CALL_PARSERS", "ToolMode"]
