"""Every attention backend against the reference formula (the oracle).

Property tests draw random packed batches: 1-4 sequences, each with 1-48 new
tokens and 0-80 cached ones (so prefills, chunked prefills and decode steps
mix), GQA ratios 1/3/9, head dims 8-64, fp32 and bf16, and -- for the tiled
and split-K backends -- small random block sizes, so that a short sequence
still crosses many tiles and chunks.

Tolerances (max over elements of |out - ref| <= atol + rtol * |ref|):
  * fp32: rtol = atol = 1e-5;
  * bf16: rtol = atol = 2e-2. The inputs are bf16; every backend computes
    in fp32 (sdpa's CPU kernel too), then rounds to bf16, whose spacing is
    2^-8 ~ 0.4% relative: outputs may differ by a rounding step or two.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisys.attention import (
    BACKENDS,
    AutoAttention,
    AttentionMetadata,
    DecodeAttention,
    SplitKDecodeAttention,
    TiledAttention,
    get_backend,
    merge_partials,
    online_softmax_update,
)
from minisys.bench.memory import AllocationTracker
from minisys.kv import ContiguousKVCache
from minisys.model import LlamaModel, ModelConfig

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
REFERENCE = BACKENDS["reference"]()
UNDER_TEST = ["sdpa", "tiled", "decode", "decode-splitk"]   # plain packed-K/V backends (lesson 02)


@st.composite
def packed_batches(draw):
    """(q, k, v, meta) of a random varlen packed batch with GQA."""
    n = draw(st.integers(1, 4))
    seqlens_q = [draw(st.one_of(st.just(1), st.integers(1, 48))) for _ in range(n)]
    context_lens = [draw(st.one_of(st.just(0), st.integers(0, 80))) for _ in range(n)]
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    ratio = draw(st.sampled_from([1, 3, 9]))
    head_dim = draw(st.sampled_from([8, 16, 24, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    meta = AttentionMetadata(seqlens_q=seqlens_q, context_lens=context_lens)
    g = torch.Generator().manual_seed(seed)
    T, S = meta.num_tokens, int(meta.cu_seqlens_k[-1])
    q = torch.randn(T, num_kv_heads * ratio, head_dim, generator=g).to(dtype)
    k = torch.randn(S, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(S, num_kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v, meta


def _backend(name, data):
    """The backend under test; tiled and split-K get small random block sizes."""
    if name == "tiled":
        return TiledAttention(block_q=data.draw(st.integers(1, 32), label="block_q"),
                              block_k=data.draw(st.integers(1, 32), label="block_k"))
    if name == "decode-splitk":
        if data.draw(st.booleans(), label="by num_splits"):
            return SplitKDecodeAttention(num_splits=data.draw(st.integers(1, 9), label="num_splits"))
        return SplitKDecodeAttention(chunk_size=data.draw(st.integers(1, 40), label="chunk_size"))
    return get_backend(name)


@pytest.mark.parametrize("name", UNDER_TEST + ["auto"])
@settings(max_examples=40, deadline=None)
@given(batch=packed_batches(), data=st.data())
def test_backend_equals_reference(name, batch, data):
    q, k, v, meta = batch
    out = _backend(name, data).forward_packed(q, k, v, meta)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, REFERENCE.forward_packed(q, k, v, meta), **TOL[q.dtype])


@pytest.mark.parametrize("name", ["decode", "decode-splitk"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_decode_backends_on_decode_only_long_context(name, data):
    """A pure decode step (q_len == 1 everywhere) against caches of up to 3000 keys."""
    n = data.draw(st.integers(1, 3))
    meta = AttentionMetadata(seqlens_q=[1] * n, context_lens=data.draw(
        st.lists(st.integers(0, 3000), min_size=n, max_size=n)))
    ratio, num_kv_heads = data.draw(st.sampled_from([1, 3, 9])), data.draw(st.sampled_from([1, 3]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    S = int(meta.cu_seqlens_k[-1])
    q = torch.randn(n, num_kv_heads * ratio, 64, generator=g) * 3   # sharper softmax
    k, v = torch.randn(2, S, num_kv_heads, 64, generator=g).unbind(0)
    backend = _backend(name, data) if name == "decode-splitk" and data.draw(st.booleans()) \
        else BACKENDS[name]()
    torch.testing.assert_close(backend.forward_packed(q, k, v, meta), REFERENCE.forward_packed(q, k, v, meta), **TOL[torch.float32])


# ------------------------------------------------------------- the pure pieces
@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 60), block=st.integers(1, 16),
       seed=st.integers(0, 2**16), masked=st.booleans())
def test_online_softmax_over_tiles_equals_softmax(rows, n, block, seed, masked):
    """Folding tiles one by one gives softmax(s) @ v, even when a row's first tiles are all -inf."""
    g = torch.Generator().manual_seed(seed)
    s, v = torch.randn(rows, n, generator=g) * 4, torch.randn(n, 5, generator=g)
    if masked:   # row 0 sees only its last key: its early tiles are fully masked
        s[0, :-1] = float("-inf")
    m, l, acc = torch.full((rows,), float("-inf")), torch.zeros(rows), torch.zeros(rows, 5)
    for j in range(0, n, block):
        m, l, acc = online_softmax_update(m, l, acc, s[:, j:j + block], v[j:j + block])
    torch.testing.assert_close(acc / l[:, None], torch.softmax(s, -1) @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m + l.log(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 80), cuts=st.lists(st.integers(1, 79), max_size=6), seed=st.integers(0, 2**16))
def test_merge_partials_equals_attention_over_all_keys(n, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    s, v = torch.randn(3, n, generator=g) * 3, torch.randn(n, 4, generator=g)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    outs = torch.stack([torch.softmax(s[:, a:b], -1) @ v[a:b] for a, b in zip(bounds, bounds[1:])])
    lses = torch.stack([torch.logsumexp(s[:, a:b], -1) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(merge_partials(outs, lses), torch.softmax(s, -1) @ v, rtol=1e-5, atol=1e-5)


def test_merge_partials_ignores_empty_chunks():
    outs, lses = torch.randn(3, 2, 4), torch.randn(3, 2)
    lses_with_empty = torch.cat([lses, torch.full((1, 2), float("-inf"))])
    outs_with_empty = torch.cat([outs, torch.zeros(1, 2, 4)])
    torch.testing.assert_close(merge_partials(outs_with_empty, lses_with_empty), merge_partials(outs, lses))


# ------------------------------------------------------------- memory
def test_tiled_never_allocates_a_t_by_t_tensor():
    """At T = 2048 the reference allocates (Hq, T, T) scores; tiled's largest tensor stays far below T*T."""
    T = 2048
    meta = AttentionMetadata(seqlens_q=[T], context_lens=[0])
    q, k, v = torch.randn(T, 3, 16), torch.randn(T, 1, 16), torch.randn(T, 1, 16)
    with AllocationTracker() as ref_mem:
        REFERENCE.forward_packed(q, k, v, meta)
    with AllocationTracker() as tiled_mem:
        TiledAttention().forward_packed(q, k, v, meta)
    assert ref_mem.largest_numel >= T * T, "the tracker should see the reference's score matrix"
    assert tiled_mem.largest_numel < T * T // 16, tiled_mem.largest_shape
    assert tiled_mem.peak_bytes < ref_mem.peak_bytes / 10


# ------------------------------------------------------------- selection
def test_get_backend_names_and_auto():
    auto = get_backend("auto")
    assert isinstance(auto, AutoAttention)
    assert isinstance(auto.pick(torch.zeros(1, 1, 8)), DecodeAttention)                        # fp32 CPU
    assert isinstance(auto.pick(torch.zeros(1, 1, 8, dtype=torch.bfloat16)), BACKENDS["sdpa"])  # bf16
    for name in UNDER_TEST:
        assert isinstance(get_backend(name), BACKENDS[name]) and BACKENDS[name].name == name
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("nope")
    with pytest.raises(ValueError, match="block sizes"):
        TiledAttention(block_q=0)


# ------------------------------------------------------------- the whole model
TINY = ModelConfig(vocab_size=300, hidden_size=72, intermediate_size=96, num_layers=2, num_heads=9,
                   num_kv_heads=3, head_dim=8, max_position_embeddings=128, rope_theta=10000.0)


def _tiny_model(backend) -> LlamaModel:
    torch.manual_seed(0)
    m = LlamaModel(TINY, attention_backend=backend)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def _prefill_then_decode(model, seqs, prefill_lens):
    """Logits of a packed prefill of every sequence, then 3 packed decode steps through a cache."""
    cache = ContiguousKVCache(model.config, max_len=64, max_batch=len(seqs))
    meta = AttentionMetadata(seqlens_q=prefill_lens, context_lens=[0] * len(seqs))
    outs = [model(torch.cat([s[:n] for s, n in zip(seqs, prefill_lens)]), meta.positions(), meta, cache)]
    for step in range(3):
        ctx = [n + step for n in prefill_lens]
        meta = AttentionMetadata(seqlens_q=[1] * len(seqs), context_lens=ctx)
        outs.append(model(torch.stack([s[c] for s, c in zip(seqs, ctx)]), meta.positions(), meta, cache))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", UNDER_TEST + ["auto"])
def test_model_logits_same_with_every_backend(backend):
    seqs = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 9, 33)]
    expected = _prefill_then_decode(_tiny_model("reference"), seqs, [17, 6, 30])
    model = _tiny_model(TiledAttention(block_q=4, block_k=8) if backend == "tiled" else backend)
    torch.testing.assert_close(_prefill_then_decode(model, seqs, [17, 6, 30]), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_logits_same_with_every_backend(smol):
    model, tok = smol
    ids = torch.tensor(tok.encode("The capital of France is Paris. The capital of Italy is"))
    before = model.attention
    try:
        model.set_attention_backend("reference")
        prompt = ids[:-1]
        expected = model.forward_sequence(ids)                                  # (T, V), the oracle
        for name in UNDER_TEST:
            model.set_attention_backend(name)
            cache = ContiguousKVCache(model.config, max_len=len(ids))
            meta = AttentionMetadata(seqlens_q=[len(prompt)], context_lens=[0])
            pre = model(prompt, meta.positions(), meta, cache)                  # prefill
            meta = AttentionMetadata(seqlens_q=[1], context_lens=[len(prompt)])
            dec = model(ids[-1:], meta.positions(), meta, cache)                # one decode step
            got = torch.cat([pre, dec])
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
    finally:
        model.set_attention_backend(before)
