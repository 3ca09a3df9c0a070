"""Incremental detokenization that never emits half a character.

Byte-level BPE tokens are bytes, not characters: an emoji or a CJK character
can span several tokens, and decoding a prefix yields U+FFFD for the
incomplete tail. We decode a small window of recent tokens and only emit text
once it no longer ends in U+FFFD (the scheme of TGI and vLLM).
"""
from __future__ import annotations

from ..model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Keeps only the decode window (the tokens from ``prefix_offset`` on), not the whole sequence:
    the sequence's token ids live in its record (`Request`); this object owns the emitted text."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.window: list[int] = []  # tokens from the start of the context window to the newest
        self.read_offset = 0         # window[:read_offset] were already emitted (kept as decode context)
        self.text = ""               # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly '')."""
        self.window.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        prefix = decode(self.window[:self.read_offset])
        full = decode(self.window)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.window = self.window[self.read_offset:]      # the emitted tail becomes the next context
            self.read_offset = len(self.window)
            self.text += delta
            return delta
        return ""
