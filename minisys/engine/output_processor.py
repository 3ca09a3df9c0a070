"""Turning a sequence's new tokens into streamed text and a finish decision.

`OutputProcessor` combines the incremental detokenizer and the stop checks,
and makes streaming safe with stop strings: text that could still turn out
to be the start of a stop string (the last ``len(longest stop) - 1``
characters) is held back until the next token settles it, so a stop string
is never leaked into the stream and the streamed deltas always add up to the
final text.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.tokenizer import Tokenizer
from ..structured.matcher import StructuredMatcher
from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams
from .stopping import StopDecision, check_stop


@dataclass
class StepEvent:
    """One generated token, as streamed: its id, the text it released, and whether it ended the output."""

    token_id: int
    text_delta: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OutputProcessor:
    """One sequence's output side: it owns the text (the token ids stay in the sequence's record).

    Invariant: the deltas returned by `append` (and collected by `take_delta`)
    add up to `text`, and, once finished, to the final text.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, num_prompt_tokens: int,
                 max_model_len: int, matcher: StructuredMatcher | None = None) -> None:
        """``matcher``: the sequence's structured-output grammar state; every appended token is accepted
        into it, and the output stops ("stop") once the grammar is complete (`StructuredMatcher.is_terminated`)."""
        self.params, self.tokenizer, self.matcher = params, tokenizer, matcher
        self.num_prompt_tokens, self.max_model_len = num_prompt_tokens, max_model_len
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.num_tokens = 0       # output tokens seen
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.emitted = 0          # characters of detok.text already streamed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.final_text: str | None = None   # set once finished (cut at a stop string)
        self._pending = ""        # released text not yet collected by `take_delta`

    @property
    def text(self) -> str:
        """The text released so far (the whole output once finished)."""
        return self.final_text if self.final_text is not None else self.detok.text[:self.emitted]

    def take_delta(self) -> str:
        """The text released since the last call (the streaming side's one copy of each delta)."""
        out, self._pending = self._pending, ""
        return out

    def append(self, token_id: int) -> StepEvent:
        if self.finish_reason is not None:
            raise RuntimeError("append() after the output finished")
        self.num_tokens += 1
        delta = self.detok.push(token_id)
        d = check_stop(token_id, self.num_tokens, self.detok.text, len(delta), self.params,
                       self.tokenizer.eos_token_ids, self.max_model_len, self.num_prompt_tokens)
        if self.matcher is not None:
            d = self._grammar_stop(token_id, d)
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.final_text = d.finish_reason, d.stop_reason, d.text or ""
            out = self.final_text[self.emitted:]
            self.emitted = len(self.final_text)
            self._pending += out
            return StepEvent(token_id, out, d.finish_reason, d.stop_reason)
        safe = max(self.emitted, len(self.detok.text) - self.holdback)
        out = self.detok.text[self.emitted:safe]
        self.emitted = safe
        self._pending += out
        return StepEvent(token_id, out)

    def _grammar_stop(self, token_id: int, d):
        """Accept the token into the grammar; stop when the grammar is complete. A token the mask did
        not allow (a grammar engine error: never sampled otherwise) aborts the sequence."""
        if not self.matcher.accept(token_id):
            return StopDecision("abort", f"structured output error: {(self.matcher.error or '').strip()[:300]}", self.detok.text)
        if d.finish_reason is None and self.matcher.is_terminated:
            return StopDecision("stop", None, self.detok.text)
        return d
