"""Text embeddings from the served model: mean-pooled last hidden states, L2-normalised.

    ids of one text -> model.hidden_states -> (T, C) -> mean over T -> / ||.||  -> (C,)

A teaching choice (lesson 16), stated: SmolLM2 is a causal LM, not an
embedding model trained with a contrastive loss, so these vectors are the
simplest thing the served model can give — the final-norm hidden states that
feed its LM head, averaged over every token of the text. Mean pooling (not the
last token) because with causal attention only the last token has seen the
whole text, and averaging gives every token a say. Normalised so that an
inner product is the cosine similarity (what the vector index searches).

Several texts run as one packed forward (one row per token, no KV cache);
each text attends only to itself (`AttentionMetadata` with one entry per text),
so a batch gives the same vectors as one text at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..attention import AttentionMetadata
from ..engine.request import check_prompt_ids

MAX_TOKENS_PER_FORWARD = 2048     # texts are packed into forwards of at most this many tokens


@dataclass
class EmbeddingOutput:
    """vLLM's name: one text's vector (``embedding``: C floats)."""

    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """vLLM's name: what `LLM.embed` returns per prompt, in input order."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


def check_embedding_input(ids: Sequence[int], vocab_size: int, max_len: int, where: str = "input") -> None:
    """ValueError (naming ``where``) for ids no forward can embed: empty, out of vocabulary, or longer
    than the model's context ``max_len`` (no truncation: the caller asked for all of it)."""
    try:
        check_prompt_ids(list(ids), vocab_size)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if len(ids) > max_len:
        raise ValueError(f"{where}: {len(ids)} tokens is more than the model's context ({max_len} tokens)")


def mean_pool(hidden: torch.Tensor, seqlens: Sequence[int], normalize: bool = True) -> torch.Tensor:
    """hidden: (sum(seqlens), C) rows of packed sequences -> (len(seqlens), C) fp32 means, L2-normalised.

    Invariant: row i is the mean of sequence i's rows only (segments never mix)."""
    if any(n <= 0 for n in seqlens):
        raise ValueError("every text must have at least one token to embed")
    segments = torch.split(hidden.float(), list(seqlens))                  # each (n_i, C)
    pooled = torch.stack([s.mean(dim=0) for s in segments])                # (B, C)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


@torch.inference_mode()
def embed_token_ids(model, batch: Sequence[Sequence[int]], normalize: bool = True,
                    max_tokens_per_forward: int = MAX_TOKENS_PER_FORWARD) -> torch.Tensor:
    """Token-id lists -> (B, C) fp32 embeddings (mean-pooled final hidden states).

    ``model``: a `LlamaModel` (anything with ``hidden_states(ids, positions, meta)`` and ``device``).
    Texts are packed greedily into forwards of at most ``max_tokens_per_forward`` tokens (a longer
    text runs alone)."""
    if not batch:
        return torch.empty(0, model.config.hidden_size)
    out: list[torch.Tensor] = []
    for group in _pack(batch, max_tokens_per_forward):
        seqlens = [len(ids) for ids in group]
        if any(n == 0 for n in seqlens):
            raise ValueError("every text must have at least one token to embed")
        ids = torch.tensor([t for g in group for t in g], dtype=torch.long, device=model.device)   # (T,)
        meta = AttentionMetadata(seqlens_q=seqlens, context_lens=[0] * len(seqlens))
        hidden = model.hidden_states(ids, meta.positions(model.device), meta)                   # (T, C)
        out.append(mean_pool(hidden, seqlens, normalize).cpu())
    return torch.cat(out)


def _pack(batch: Sequence[Sequence[int]], budget: int) -> list[list[Sequence[int]]]:
    """Consecutive groups of texts whose token counts sum to at most ``budget`` (order kept)."""
    groups: list[list[Sequence[int]]] = [[]]
    used = 0
    for ids in batch:
        if groups[-1] and used + len(ids) > budget:
            groups.append([])
            used = 0
        groups[-1].append(ids)
        used += len(ids)
    return groups
