"""Incremental detokenization that never emits half a character.

Byte-level BPE tokens are bytes, not characters: an emoji or a CJK character
can span several tokens, and decoding a prefix yields U+FFFD for the
incomplete tail. We decode a small window of recent tokens and only emit text
once it no longer ends in U+FFFD (the scheme of TGI and vLLM).
"""
from __future__ import annotations

from ..model.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0   # start of the window decoded for context
        self.read_offset = 0     # tokens before this were already emitted
        self.text = ""           # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly '')."""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""
