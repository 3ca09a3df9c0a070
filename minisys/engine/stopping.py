"""Deciding when a sequence is finished, and cutting stop strings from its text."""
from __future__ import annotations

from dataclasses import dataclass

from .sampling_params import SamplingParams


@dataclass
class StopDecision:
    finish_reason: str | None = None      # "stop" | "length" | None (keep going)
    stop_reason: int | str | None = None
    text: str | None = None               # the output text, cut at a stop string


def check_stop(last: int, num_output_tokens: int, text: str, new_text_len: int, params: SamplingParams,
               eos_token_ids: tuple[int, ...], max_total_tokens: int | None = None,
               num_prompt_tokens: int = 0) -> StopDecision:
    """Check the stop conditions after appending the newest token ``last`` (the ``num_output_tokens``-th).

    `text` is the output text so far and `new_text_len` how many of its last
    characters arrived with this token; a stop string can only end inside
    those, so we search just the tail (a stop string spanning tokens is found
    because we search from up to len(stop) - 1 characters before the new text).
    """
    if not params.ignore_eos and last in eos_token_ids:
        return StopDecision("stop", last if last in params.stop_token_ids else None, text)
    if last in params.stop_token_ids:
        return StopDecision("stop", last, text)
    for s in params.stop:
        start = max(0, len(text) - new_text_len - len(s) + 1)
        idx = text.find(s, start)
        if idx != -1:
            end = idx + len(s) if params.include_stop_str_in_output else idx
            return StopDecision("stop", s, text[:end])
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return StopDecision("length", None, text)
    if max_total_tokens is not None and num_prompt_tokens + num_output_tokens >= max_total_tokens:
        return StopDecision("length", None, text)
    return StopDecision()
