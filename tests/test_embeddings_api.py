"""POST /v1/embeddings through the official `openai` client (in-process app, tiny random model).

The vectors must equal `LLM.embed` on the same model, and an independent
recomputation: the final-norm hidden states of a plain, unpacked forward
(`LlamaModel.hidden_states` on one text), mean-pooled and normalised with
torch ops here. tests/test_rag.py checks the pooled vectors against
transformers on the real model.
"""
from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch


KEY = "sk-emb"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def env(tiny_app):
    with tiny_app(KEY) as (c, llm):
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0), c, llm


def _recompute(llm, ids: list[int]) -> np.ndarray:
    """One text alone through the model, pooled with torch ops (the route packs texts together)."""
    from minisys.attention import AttentionMetadata
    meta = AttentionMetadata(seqlens_q=[len(ids)], context_lens=[0])
    h = llm.model.hidden_states(torch.tensor(ids), meta.positions(), meta).float()      # (T, C)
    v = h.mean(0)
    return (v / v.norm()).numpy()


def test_the_openai_client_gets_llm_embed_vectors(env):
    client, _, llm = env
    texts = ["the quick brown fox", "lazy dog", "the"]
    r = client.embeddings.create(model="tiny", input=texts)        # the client asks for base64 and decodes it
    assert r.object == "list" and r.model == "tiny" and [d.index for d in r.data] == [0, 1, 2]
    ids = [llm.tokenizer.encode(t) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    mine = llm.embed(texts)
    for d, m, x in zip(r.data, mine, ids):
        got = np.asarray(d.embedding, dtype=np.float32)
        assert got.shape == (llm.model.config.hidden_size,)
        np.testing.assert_allclose(got, np.asarray(m.outputs.embedding), atol=1e-6, rtol=0)
        np.testing.assert_allclose(got, _recompute(llm, x), atol=1e-5, rtol=0)
        assert m.prompt_token_ids == x


def test_float_and_base64_encodings_agree_and_token_ids_work(env):
    client, c, llm = env
    ids = llm.tokenizer.encode("over the lazy dog")
    f = client.embeddings.create(model="tiny", input=[ids], encoding_format="float").data[0].embedding
    raw = c.post("/v1/embeddings", json={"input": ids, "encoding_format": "base64"}, headers=H).json()
    b = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert isinstance(f, list) and len(f) == len(b)
    np.testing.assert_array_equal(np.asarray(f, dtype=np.float32), b)
    np.testing.assert_allclose(b, _recompute(llm, ids), atol=1e-5, rtol=0)
    assert raw["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}


@pytest.mark.parametrize("body,param,words", [
    ({"input": "x", "dimensions": 8}, "dimensions", "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"input": "x", "truncate": True}, "truncate", "truncate"),
    ({"input": []}, "input", "empty"),
    ({"input": ""}, "input", "empty"),
    ({"input": [3, 10**6]}, "input", "outside the vocabulary"),
    ({"input": list(range(1, 300))}, "input", "context"),                     # the tiny model's context: 256
    ({"input": ["a", "the " * 400]}, "input", "input[1]"),
])
def test_bad_requests_are_400s_naming_the_field(env, body, param, words):
    _, c, llm = env
    r = c.post("/v1/embeddings", json=body, headers=H)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param, err
    assert c.get("/health").status_code == 200
    assert c.post("/v1/embeddings", json={"input": "still serving"}, headers=H).status_code == 200


def test_wrong_model_is_404_and_a_key_is_required(env):
    _, c, _ = env
    assert c.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"}, headers=H).status_code == 404
    assert c.post("/v1/embeddings", json={"input": "x"}).status_code == 401
    r = c.post("/v1/embeddings", json={"input": "x", "dimensions": 96, "user": "alice"}, headers=H)
    assert r.status_code == 200                                                # = the hidden size: accepted
    doc = c.get("/openapi.json").json()
    body = doc["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"]["EmbeddingRequest"]["additionalProperties"] is False and body
