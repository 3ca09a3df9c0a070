"""The token-count lower bound that lets the server refuse a prompt too long for the context without
tokenizing it (`Tokenizer.min_tokens`). Oracle: the tokenizer's own count."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from minisys.model.store import default_model_dir
from minisys.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir(quiet=True))


# pieces that make long tokens: runs of spaces, dashes, newlines, digits, multi-byte characters, special tokens
_piece = st.sampled_from([" ", "-", "\n", "=", "a", "é", "漢", "🙂", "0", "<|im_start|>", "<|im_end|>", "    "])
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)      # no lone surrogates


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.one_of(_piece, _text), max_size=60), repeat=st.integers(1, 120))
def test_min_tokens_never_exceeds_the_true_count(tok, parts, repeat):
    text = "".join(p * (repeat if i % 3 == 0 else 1) for i, p in enumerate(parts))
    assert tok.min_tokens(text) <= len(tok.encode(text))


def test_bytes_the_tokenizer_drops_are_not_counted(tok):
    """SmolLM2's vocabulary lacks some control bytes: they make no token, so they cannot raise the bound."""
    assert b"\x16" in tok.dropped_bytes and b"a" not in tok.dropped_bytes
    for b in tok.dropped_bytes:
        if b < 0x80:                                         # an ASCII byte is a whole character
            assert tok.encode(chr(b) * 50) == [] and tok.min_tokens(chr(b) * 50) == 0
    for b in range(0x80):
        if bytes([b]) not in tok.dropped_bytes:
            assert tok.encode(chr(b)), f"byte {b:#x} is kept: it must make a token"


def test_the_bound_is_tight_for_the_longest_token(tok):
    longest = max(range(tok.vocab_size), key=lambda i: len(tok.decode([i], False).encode("utf-8")))
    text = tok.decode([longest], False)
    assert len(text.encode("utf-8")) == tok.max_token_bytes and tok.min_tokens(text) == 1


class _Spy:
    """The HF tokenizer, counting encode calls."""

    def __init__(self, inner) -> None:
        self.inner, self.encodes = inner, 0

    def encode_batch(self, *a, **k):
        self.encodes += 1
        return self.inner.encode_batch(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_over_the_limit_is_refused_without_tokenizing_and_a_fitting_text_never_is(tok):
    spy = _Spy(tok._tk)
    t = Tokenizer(spy, tok.chat_template, tok.bos_token, tok.eos_token)
    text = "message 1 " * 2000
    n = len(t.encode(text))
    assert t.encode(text, limit=n) == t.encode(text)              # exactly at the limit: tokenized, not refused
    before = spy.encodes
    with pytest.raises(ValueError, match="over the model's context of 1000 tokens"):
        t.encode(text * 200, limit=1000)                           # 4 MB: refused by the bound alone
    assert spy.encodes == before
