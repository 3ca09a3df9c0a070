"""`GrammarCompiler`: a spec -> a fresh `StructuredMatcher`, compiling each distinct spec once.

Two caches, both keyed so that nothing is built twice:

* the llguidance tokenizer (the vocabulary's byte strings and the mask
  "slices": ~0.3 s for SmolLM2's 49152 tokens) is built once per
  (tokenizer, model vocabulary size) by `GrammarCompiler.for_tokenizer`;
* the compiled grammar of a spec is kept in an LRU of ``cache_size`` entries
  keyed by `StructuredOutputsParams.key` (kind + canonical text): a template
  matcher, never advanced; each sequence gets a `deep_copy` of it. Requests
  sharing a schema (a tool's, an app's) compile it once.

A spec that does not compile (a bad schema, regex or grammar) raises
ValueError naming the request field (`StructuredOutputsParams.field_name`);
a failed compile is not cached.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import torch

from .matcher import StructuredMatcher
from .params import StructuredOutputsParams

# Compact JSON (separators "," and ":", no free whitespace between tokens): a small model given
# free whitespace may emit newlines forever; vLLM's ``disable_any_whitespace`` does the same.
JSON_OPTIONS = {"whitespace_flexible": False}

_TOKENIZERS: dict[tuple[int, int], tuple[Any, "llguidance.LLTokenizer"]] = {}
_LOCK = threading.Lock()


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of a spec (not yet checked: `GrammarCompiler.compile` checks it)."""
    k = spec.kind
    if k == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
    if k == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if k == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if k == "choice":
        return llguidance.grammar_from("choice", json.dumps(spec.choice))
    return llguidance.grammar_from("grammar", spec.grammar)          # Lark or GBNF


class GrammarCompiler:
    """Compiles specs for one tokenizer; masks are ``vocab_size`` wide (the model's vocabulary, which
    may exceed the tokenizer's: the extra ids are never allowed)."""

    def __init__(self, ll_tokenizer: "llguidance.LLTokenizer", vocab_size: int, cache_size: int = 128) -> None:
        self.ll_tokenizer, self.vocab_size, self.cache_size = ll_tokenizer, vocab_size, cache_size
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()       # the eager server checks specs on the event loop, runs them on its thread
        self.compiles = 0          # cache misses (what the tests and the benchmark count)

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, cache_size: int = 128) -> "GrammarCompiler":
        """A compiler for a `minisys.model.tokenizer.Tokenizer`; its llguidance tokenizer is built once per
        (tokenizer, vocab_size) in the process."""
        key = (id(tokenizer), vocab_size)
        with _LOCK:
            hit = _TOKENIZERS.get(key)
            if hit is None or hit[0] is not tokenizer:
                ll = llguidance.LLTokenizer(tokenizer._tk.to_str(), n_vocab=vocab_size,
                                            eos_token=list(tokenizer.eos_token_ids) or None)
                hit = _TOKENIZERS[key] = (tokenizer, ll)
        return cls(hit[1], vocab_size, cache_size)

    def compile(self, spec: StructuredOutputsParams) -> "llguidance.LLMatcher":
        """The template matcher of ``spec`` (cached); ValueError naming the field if it does not compile."""
        key = spec.key()
        with self._lock:
            m = self._cache.get(key)
            if m is not None:
                self._cache.move_to_end(key)
                return m
        try:
            grammar = grammar_text(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{spec.field_name} is not a valid {spec.kind}: {e}") from None
        err = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if err:
            raise ValueError(f"{spec.field_name} is not a valid {_what(spec)}: {err.strip()[:300]}")
        m = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"{spec.field_name} is not a valid {_what(spec)}: {m.get_error()[:300]}")
        trial = StructuredMatcher(m.deep_copy(), self.vocab_size)      # the first mask, once, here: a grammar
        scratch = torch.zeros(trial.words, dtype=torch.int32)          # too complex for the lexer fails now
        trial.fill(scratch.data_ptr())                                 # (a 400), not at a sequence's first step
        if trial.error is not None:
            raise ValueError(f"{spec.field_name} is too complex a {_what(spec)}: {trial.error.strip()[:300]}")
        with self._lock:
            self.compiles += 1
            self._cache[key] = m
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return m

    def matcher(self, spec: StructuredOutputsParams) -> StructuredMatcher:
        """A fresh matcher for one sequence (a copy of the cached template, at the grammar's start)."""
        return StructuredMatcher(self.compile(spec).deep_copy(), self.vocab_size)


def _what(spec: StructuredOutputsParams) -> str:
    return {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
            "choice": "list of choices", "grammar": "grammar (Lark or GBNF)"}[spec.kind]
