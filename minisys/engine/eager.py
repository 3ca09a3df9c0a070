"""The eager baseline: one request at a time, the straightforward generate loop.

    prefill:  logits = model(prompt)           -> sample token 1
    decode:   logits = model(last token | KV)  -> sample token t+1   (with a KV cache)
              logits = model(whole sequence)   -> sample token t+1   (without one)

With a KV cache the keys and values of earlier tokens are kept in a
contiguous buffer reserved for the full ``prompt + max_tokens`` length, so
each decode step computes only the new token. Without a cache every step
recomputes the whole sequence: O(T^2) work for T tokens. Every lab measures
the serving engine against this loop.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..attention.base import AttentionMetadata
from ..kv.contiguous import ContiguousKVCache
from ..model.llama import LlamaModel
from ..model.tokenizer import Tokenizer
from ..sampling import History, make_generator, sample_next_token, sequence_seed
from ..structured.compiler import GrammarCompiler
from ..structured.mask import fill_bitmasks
from .output_processor import OutputProcessor, StepEvent
from .outputs import CompletionOutput
from .request import check_prompt_ids
from .sampling_params import SamplingParams


class EagerGenerator:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, use_kv_cache: bool = True) -> None:
        self.model, self.tokenizer, self.use_kv_cache = model, tokenizer, use_kv_cache

    @property
    def max_model_len(self) -> int:
        return self.model.config.max_position_embeddings

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse a prompt that cannot be served, with a message that says why."""
        check_prompt_ids(prompt_ids, self.model.config.vocab_size)
        params.check_vocab(self.model.config.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name) is not None:
                raise ValueError(f"{name} is not supported by the eager baseline: use the engine (--engine llm)")
        if params.structured_outputs is not None:
            self._grammars().compile(params.structured_outputs)     # ValueError naming the field
        need = len(prompt_ids) + (params.max_tokens or 1)
        if need > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{need} exceeds the model's context of {self.max_model_len} tokens")

    def _grammars(self) -> GrammarCompiler:
        """The structured-output compiler, built on first use and kept (its compile cache with it)."""
        if getattr(self, "_compiler", None) is None:
            self._compiler = GrammarCompiler.for_tokenizer(self.tokenizer, self.model.config.vocab_size)
        return self._compiler

    def stream(self, prompt_ids: list[int], params: SamplingParams, index: int = 0,
               generator: torch.Generator | None = None) -> Iterator[StepEvent]:
        """Yield one `StepEvent` per generated token until a stop condition holds.

        Sequence ``index`` of the request draws from its own generator, seeded as
        the engine seeds it (`minisys.sampling.sequence_seed`), unless one is given.
        """
        self.check_prompt(prompt_ids, params)
        device = self.model.device
        if generator is None and not params.greedy:
            generator = make_generator(sequence_seed(params.seed, index), device)
        max_new = params.max_tokens or (self.max_model_len - len(prompt_ids))
        cache = (ContiguousKVCache(self.model.config, len(prompt_ids) + max_new, 1,
                                   self.model.dtype, device) if self.use_kv_cache else None)
        so = params.structured_outputs
        matcher = self._grammars().matcher(so) if so is not None else None
        proc = OutputProcessor(self.tokenizer, params, len(prompt_ids), self.max_model_len, matcher)
        seq = list(prompt_ids)
        new_ids = seq                      # tokens to feed this step
        while True:
            logits = self._forward(seq, new_ids, cache)                      # (1, V)
            history = History(prompt_ids, seq[len(prompt_ids):], self.tokenizer.eos_token_ids)
            bitmask = fill_bitmasks([matcher]) if matcher is not None else None       # (1, W)
            token = int(sample_next_token(logits, params, generator, history, bitmask)[0])
            seq.append(token)
            event = proc.append(token)
            yield event
            if event.finish_reason is not None:
                return
            new_ids = [token]

    def _forward(self, seq: list[int], new_ids: list[int], cache: ContiguousKVCache | None) -> torch.Tensor:
        return next_token_logits(self.model, seq, new_ids if cache is not None else seq, cache)

    def generate(self, prompt_ids: list[int], params: SamplingParams, index: int = 0,
                 generator: torch.Generator | None = None,
                 on_token: Callable[[StepEvent], None] | None = None) -> CompletionOutput:
        """Run `stream` to the end and collect a `CompletionOutput`."""
        ids, text, last = [], "", None
        for last in self.stream(prompt_ids, params, index, generator):
            ids.append(last.token_id)
            text += last.text_delta
            if on_token:
                on_token(last)
        return CompletionOutput(index=index, text=text, token_ids=ids, finish_reason=last.finish_reason,
                                stop_reason=last.stop_reason)


def next_token_logits(model: LlamaModel, seq: list[int], feed: list[int],
                      cache: ContiguousKVCache | None) -> torch.Tensor:
    """Logits (1, V) for the token after `seq`, running the model on `feed` only.

    `feed` is the tail of `seq` the model has not seen yet: all of `seq`
    without a cache (recompute everything), just the new tokens with one
    (their keys/values are appended to the cache, earlier ones are read from it).
    """
    context = len(seq) - len(feed)
    meta = AttentionMetadata(seqlens_q=[len(feed)], context_lens=[context])
    ids = torch.tensor(feed, dtype=torch.long, device=model.device)
    return model(ids, meta.positions(model.device), meta, kv_cache=cache,
                 logits_indices=meta.last_token_indices(model.device))


def greedy_generate(model: LlamaModel, prompt_ids: list[int], max_new_tokens: int,
                    use_kv_cache: bool = True) -> list[int]:
    """The bare generation loop of lesson 01: greedy, no stop conditions, returns the new token ids."""
    cache = (ContiguousKVCache(model.config, len(prompt_ids) + max_new_tokens, 1, model.dtype, model.device)
             if use_kv_cache else None)
    seq, feed, out = list(prompt_ids), list(prompt_ids), []
    for _ in range(max_new_tokens):
        token = int(next_token_logits(model, seq, feed if use_kv_cache else seq, cache).argmax(-1))
        out.append(token)
        seq.append(token)
        feed = [token]
    return out
