"""Structured outputs: constrain a sequence's tokens to a JSON schema, a regex, a choice or a grammar.

    spec    = StructuredOutputsParams(json={"type": "object", ...})   # vLLM's shape (params.py)
    compiler= GrammarCompiler.for_tokenizer(tokenizer, vocab_size)      # tokenizer info built once (compiler.py)
    matcher = compiler.matcher(spec)        # compiled once per distinct spec (LRU), one matcher per sequence
    masks   = fill_bitmasks([matcher, ...]) # (R, ceil(V/32)) int32, bit t of row r: token t allowed (mask.py)
    logits  = apply_token_mask(logits, rows, masks)   # disallowed tokens -> -inf, vectorized
    matcher.accept(token)                   # after sampling; matcher.is_terminated -> the sequence stops

The grammar engine is llguidance (chosen by measurement over xgrammar:
bench/results/structured_library.json, `minisys.bench.structured_library`).
"""
from .compiler import GrammarCompiler
from .mask import RowMasks, allowed_token_ids, apply_token_mask, fill_bitmasks, MaskFiller
from .matcher import StructuredMatcher
from .params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams", "GrammarCompiler", "StructuredMatcher", "RowMasks", "MaskFiller",
           "apply_token_mask", "fill_bitmasks", "allowed_token_ids"]
