"""The online-metrics recorder: OpenAI stream chunks -> a `RequestTrace` (lesson 07).

One JSON chunk at a time (`record_chunk`), stamped with the time of the
network read that completed it; `metrics.summarize` turns the traces into
vLLM's TTFT, TPOT, ITL, E2EL and goodput. Works for ``/v1/completions``
chunks (``choices[i].text``) and ``/v1/chat/completions`` chunks
(``choices[i].delta.content``).

Invariants: a chunk is one arrival iff it carries non-empty text (a role
header or an incomplete UTF-8 character is not an arrival); ``usage``, when
the server sends it, is the source of the token counts; an ``error`` object
fails the request and nothing after it is recorded by the caller.
"""
from __future__ import annotations

from .metrics import RequestTrace


def chunk_text(payload: dict) -> str:
    """The text a completion or chat-completion chunk carries (all choices)."""
    parts = []
    for choice in payload.get("choices") or []:
        parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def record_chunk(trace: RequestTrace, payload: dict, now: float) -> str:
    """Apply one JSON chunk to ``trace``; returns its text.

    An event with text is one arrival (``token_times``), stamped with the
    time of the network read that completed it (two events in one read are
    two arrivals at one time: vLLM's client counts them the same way); an
    event with empty text (a role header, a UTF-8 character not yet
    complete) is not an arrival.
    ``usage`` sets the token counts; an ``error`` object fails the request.
    """
    if isinstance(payload.get("error"), dict):
        trace.error = payload["error"].get("message") or "error"
        return ""
    text = chunk_text(payload)
    if text:
        trace.token_times.append(now)
    usage = payload.get("usage")
    if usage:
        trace.output_tokens = int(usage.get("completion_tokens") or 0)
        trace.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    return text
