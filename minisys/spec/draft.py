"""A draft model proposer: a small model guesses k tokens, one forward each.

Any model sharing the target's tokenizer can draft (a local Hugging Face
directory, e.g. SmolLM2-135M drafting a larger SmolLM2). So that the path
runs out of the box with only the default model, `SelfDraftModel` drafts
with the target's own *first N layers* followed by its final norm and LM
head (the early-exit / "LayerSkip"-style self-draft): no extra weights, a
cost ratio of about N / num_layers, and an acceptance rate that tells how
much of the prediction the first layers already know.

Cache design (the simplest correct one): each request gets its own
*contiguous* KV cache for the draft (`ContiguousKVCache`, one slot sized for
prompt + max_tokens + k), remembered with the token ids it holds. On each
`propose` the draft keeps the longest common prefix of those tokens and the
request's current tokens (rejected drafts simply fall off: a contiguous
cache "rolls back" by forgetting a length), feeds the rest as one chunk, and
then feeds its own drafts one by one. Requests are drafted one after the
other (no batching of the draft): honest at batch 1, and the draft's cost
grows with the batch, one reason speculation pays less under load.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..attention.base import AttentionMetadata
from ..kv.contiguous import ContiguousKVCache
from ..model.llama import LlamaModel
from ..sampling import probs_from_logits, sample_categorical, uniforms
from .proposer import Proposal, Proposer


class SelfDraftModel(LlamaModel):
    """The target's embeddings, its first ``num_layers`` decoder layers, its final norm and LM head.

    A `LlamaModel` whose modules are the target's own (shared weights, no
    copy), so `forward`, `device` and `dtype` are the target's code.
    """

    def __init__(self, target: LlamaModel, num_layers: int) -> None:
        nn.Module.__init__(self)                 # not LlamaModel.__init__: no new weights
        if not 1 <= num_layers <= target.config.num_layers:
            raise ValueError(f"draft_layers must be in [1, {target.config.num_layers}], got {num_layers}")
        self.config = replace(target.config, num_layers=num_layers)
        self.rope = target.rope
        self.model = nn.Module()
        self.model.embed_tokens, self.model.norm = target.model.embed_tokens, target.model.norm
        self.model.layers = nn.ModuleList(list(target.model.layers)[:num_layers])  # layer_idx 0..N-1: fits the draft cache
        self.lm_head = target.lm_head
        self.attention = target.attention


@dataclass
class _DraftState:
    cache: ContiguousKVCache
    tokens: list[int]              # the token ids whose K/V the cache holds, in order


class DraftModelProposer(Proposer):
    """Drafts with ``model`` (a `LlamaModel` or `SelfDraftModel` with the target's vocabulary)."""

    name = "draft"

    def __init__(self, model, vocab_size: int | None = None) -> None:
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                             f"target's ({vocab_size}): a draft must share the target's tokenizer")
        self.model = model
        self._state: dict[str, _DraftState] = {}
        self.forwards = 0
        self.seconds = 0.0

    def release(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def propose(self, requests: list, ks: list[int]) -> list[Proposal]:
        t0 = time.perf_counter()
        out = [self._propose_one(r, k) if k > 0 else Proposal([]) for r, k in zip(requests, ks)]
        self.seconds += time.perf_counter() - t0
        return out

    def _state_for(self, req, k: int) -> _DraftState:
        need = min(req.num_prompt_tokens + req.max_tokens + k + 1, self.model.config.max_position_embeddings)
        st = self._state.get(req.request_id)
        if st is None or st.cache.max_len < need:
            st = _DraftState(ContiguousKVCache(self.model.config, need, 1, self.model.dtype, self.model.device), [])
            self._state[req.request_id] = st
        return st

    def _propose_one(self, req, k: int) -> Proposal:
        seq = req.all_token_ids
        st = self._state_for(req, k)
        keep = 0                                       # longest common prefix, leaving >= 1 token to feed
        while keep < min(len(st.tokens), len(seq) - 1) and st.tokens[keep] == seq[keep]:
            keep += 1
        st.tokens = seq[:keep]
        feed, tokens, probs = seq[keep:], [], []
        for j in range(k):
            logits = self._forward(st, feed)                               # (1, V)
            if req.params.greedy:
                tok = int(logits.argmax(-1))
            else:
                q = probs_from_logits(logits, req.params)                 # (1, V)
                tok = int(sample_categorical(q, uniforms(req.generator, 1, 1, q.device)[:, 0])[0])
                probs.append(q[0])
            tokens.append(tok)
            feed = [tok]
        return Proposal(tokens, torch.stack(probs) if probs else None)

    def _forward(self, st: _DraftState, feed: list[int]) -> torch.Tensor:
        meta = AttentionMetadata(seqlens_q=[len(feed)], context_lens=[len(st.tokens)])
        ids = torch.tensor(feed, dtype=torch.long, device=self.model.device)
        logits = self.model(ids, meta.positions(self.model.device), meta, kv_cache=st.cache,
                            logits_indices=meta.last_token_indices(self.model.device))
        st.tokens = st.tokens + list(feed)
        self.forwards += 1
        return logits
