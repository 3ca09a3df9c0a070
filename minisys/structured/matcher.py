"""`StructuredMatcher`: one sequence's position in its grammar.

Invariant: the matcher has consumed exactly the sequence's output tokens
(``num_accepted == len(output_token_ids)``), so the mask it fills is the set
of tokens that keep the output a prefix of some string of the grammar. A
preempted sequence keeps its output tokens and its matcher (recompute only
rebuilds K/V), so the invariant survives preemption with nothing to redo.

`is_terminated`: the grammar admits no further token (a JSON value closed,
a choice complete); the sequence then stops ("stop"). EOS is allowed by the
mask only where the grammar accepts (a complete output that could go on,
e.g. after ``[0-9]+``).
"""
from __future__ import annotations

import llguidance


class StructuredMatcher:
    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int) -> None:
        self._m, self.vocab_size = matcher, vocab_size
        self.num_accepted = 0

    @property
    def words(self) -> int:
        """int32 words per bitmask row: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (and the matcher in an error state) if it was not allowed."""
        ok = self._m.consume_token(token)
        if ok:
            self.num_accepted += 1
        return ok

    def fill(self, ptr: int) -> None:
        """Write this matcher's allowed-token bitmask (`words` int32) at address ``ptr`` (see `mask.fill_bitmasks`)."""
        self._m.unsafe_compute_mask_ptr(ptr, self.words * 4)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""
        if num_tokens:
            self._m.rollback(num_tokens)
            self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        """No token can follow (the output is complete): the sequence must stop."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete string of the grammar (EOS allowed)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    @property
    def llmatcher(self) -> "llguidance.LLMatcher":
        return self._m
