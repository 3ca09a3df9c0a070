"""Lesson 16, compound AI: embeddings (vs transformers), the vector index (vs numpy brute force),
the course corpus, retrieval-augmented generation and its document KV reuse (vs recomputing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minisys.rag.embed import embed_token_ids, mean_pool

TEXTS = ["The prefix cache reuses full KV blocks of a shared prompt prefix.",
         "Paris is the capital of France.", "x", "Continuous batching admits new requests every step."]


def _hf_embedding(hf_model, ids: list[int]) -> torch.Tensor:
    """The oracle: transformers' LlamaModel last_hidden_state (after the final norm), mean, L2-normalised."""
    with torch.no_grad():
        h = hf_model.model(torch.tensor([ids])).last_hidden_state[0]         # (T, C)
    return torch.nn.functional.normalize(h.float().mean(0), dim=-1)


def test_embeddings_are_transformers_mean_pooled_last_hidden_state(smol, hf_smol):
    model, tok = smol
    ids = [tok.encode(t) for t in TEXTS]
    ours = embed_token_ids(model, ids)                                       # one packed forward
    assert ours.shape == (len(TEXTS), model.config.hidden_size)
    for i, x in enumerate(ids):
        torch.testing.assert_close(ours[i], _hf_embedding(hf_smol[0], x), atol=1e-4, rtol=0)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_packing_never_mixes_texts(smol):
    model, tok = smol
    ids = [tok.encode(t) for t in TEXTS]
    together = embed_token_ids(model, ids)
    apart = embed_token_ids(model, ids, max_tokens_per_forward=1)            # one text per forward
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)


def test_mean_pool_is_a_per_segment_mean():
    h = torch.arange(12, dtype=torch.float32).view(6, 2)
    got = mean_pool(h, [1, 2, 3], normalize=False)
    want = torch.stack([h[:1].mean(0), h[1:3].mean(0), h[3:].mean(0)])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="at least one token"):
        mean_pool(h, [6, 0])
