"""Lab 02 tests: naive GQA attention, the online-softmax tile update, the split-K merge.

Oracles are torch's own ops, independent of the lab's solution and of
minisys's backends: ``F.scaled_dot_product_attention`` run per query head on
its KV head with an explicit bottom-right causal mask, ``torch.softmax`` and
``torch.logsumexp``. Tolerance: fp32, rtol = atol = 1e-5.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

TOL = dict(rtol=1e-5, atol=1e-5)


def reference_impl():
    from minisys.attention import AttentionMetadata, ReferenceAttention, TiledAttention
    from minisys.attention.decode import SplitKDecodeAttention, merge_partials
    from minisys.attention.tiled import online_softmax_update

    def naive_attention(q, k, v):
        meta = AttentionMetadata(seqlens_q=[q.shape[0]], context_lens=[k.shape[0] - q.shape[0]])
        return ReferenceAttention().forward_packed(q, k, v, meta)

    def splitk_decode(q, k, v, num_splits):
        meta = AttentionMetadata(seqlens_q=[1], context_lens=[k.shape[0] - 1])
        return SplitKDecodeAttention(num_splits=num_splits).forward_packed(q.unsqueeze(0), k, v, meta)[0]

    return types.SimpleNamespace(
        naive_attention=naive_attention,
        online_softmax_update=online_softmax_update,
        tiled_attention=lambda q, k, v, block_q=128, block_k=256: TiledAttention(block_q, block_k).attend_one(q, k, v),
        merge_partials=merge_partials,
        splitk_decode=splitk_decode,
    )


def oracle_attention(q, k, v):
    """torch's SDPA, one query head at a time on KV head h // G, explicit bottom-right causal mask."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)    # query i sees keys <= S - T + i
    heads = [F.scaled_dot_product_attention(q[:, h][None], k[:, h // (Hq // Hkv)][None],
                                            v[:, h // (Hq // Hkv)][None], attn_mask=mask)[0]
             for h in range(Hq)]
    return torch.stack(heads, dim=1)                                    # (T, Hq, D)


def _qkv(T, S, Hq, Hkv, D=16, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, Hq, D, generator=g) * scale, torch.randn(S, Hkv, D, generator=g),
            torch.randn(S, Hkv, D, generator=g))


SHAPES = [  # (T, S, Hq, Hkv): prefill MHA, prefill GQA 3, chunk with a cache GQA 9, decode MQA
    (12, 12, 4, 4), (20, 20, 9, 3), (7, 30, 9, 1), (1, 41, 6, 2)]


# ---------------------------------------------------------------- 1. naive attention
@pytest.mark.points(2)
@pytest.mark.exercise("naive_attention")
@pytest.mark.parametrize("T,S,Hq,Hkv", SHAPES)
def test_naive_attention_matches_torch(impl, T, S, Hq, Hkv):
    q, k, v = _qkv(T, S, Hq, Hkv, seed=T + S)
    out = impl.naive_attention(q, k, v)
    assert out.shape == (T, Hq, 16) and out.dtype == q.dtype
    torch.testing.assert_close(out, oracle_attention(q, k, v), **TOL)


@pytest.mark.points(2)
@pytest.mark.exercise("naive_attention")
def test_naive_attention_query_head_h_reads_kv_head_h_over_g(impl):
    """V is constant j on KV head j, so query head h must output exactly h // G everywhere."""
    q, k, _ = _qkv(5, 9, 9, 3)
    v = torch.arange(3.0)[None, :, None].expand(9, 3, 16).contiguous()
    out = impl.naive_attention(q, k, v)
    expected = (torch.arange(9) // 3).float()[None, :, None].expand(5, 9, 16)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.points(1)
@pytest.mark.exercise("naive_attention")
def test_naive_attention_first_query_sees_only_first_key(impl):
    q, k, v = _qkv(6, 6, 2, 2)
    torch.testing.assert_close(impl.naive_attention(q, k, v)[0], v[0], **TOL)


# ---------------------------------------------------------------- 2. online softmax
def _fold(impl, scores, v, block):
    rows = scores.shape[:-1]
    m, l, acc = torch.full(rows, float("-inf")), torch.zeros(rows), torch.zeros(*rows, v.shape[-1])
    for j in range(0, scores.shape[-1], block):
        m, l, acc = impl.online_softmax_update(m, l, acc, scores[..., j:j + block], v[..., j:j + block, :])
    return m, l, acc


@pytest.mark.points(2)
@pytest.mark.exercise("online_softmax_update")
def test_one_tile_is_softmax(impl):
    g = torch.Generator().manual_seed(1)
    s, v = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 7, 4, generator=g)
    m, l, acc = _fold(impl, s, v, block=7)
    torch.testing.assert_close(m, s.amax(-1), **TOL)
    torch.testing.assert_close(acc / l[..., None], torch.softmax(s, -1) @ v, **TOL)


@pytest.mark.points(2)
@pytest.mark.exercise("online_softmax_update")
@pytest.mark.parametrize("block", [1, 3, 8, 50])
def test_tiles_fold_to_softmax_and_logsumexp(impl, block):
    g = torch.Generator().manual_seed(block)
    s, v = torch.randn(3, 6, 50, generator=g) * 5, torch.randn(3, 50, 8, generator=g)
    s[..., 30] += 20                      # a late large score: earlier sums must be rescaled
    m, l, acc = _fold(impl, s, v, block)
    torch.testing.assert_close(acc / l[..., None], torch.softmax(s, -1) @ v, **TOL)
    torch.testing.assert_close(m + l.log(), torch.logsumexp(s, -1), **TOL)


@pytest.mark.points(2)
@pytest.mark.exercise("online_softmax_update")
def test_rows_with_fully_masked_tiles(impl):
    """Row 0 sees only the last key: its first tiles are all -inf. No nan, exact result."""
    g = torch.Generator().manual_seed(2)
    s, v = torch.randn(4, 12, generator=g), torch.randn(12, 3, generator=g)
    s[0, :-1] = float("-inf")
    s[1, 4:] = float("-inf")              # row 1: later tiles fully masked
    m, l, acc = _fold(impl, s, v, block=4)
    out = acc / l[:, None]
    assert torch.isfinite(out).all(), "a fully masked tile produced nan/inf"
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, **TOL)


@pytest.mark.points(1)
@pytest.mark.exercise("online_softmax_update")
def test_update_does_not_modify_inputs(impl):
    m, l, acc = torch.zeros(2), torch.ones(2), torch.ones(2, 3)
    s, v = torch.randn(2, 4), torch.randn(4, 3)
    before = [t.clone() for t in (m, l, acc, s, v)]
    impl.online_softmax_update(m, l, acc, s, v)
    assert all(torch.equal(a, b) for a, b in zip(before, (m, l, acc, s, v)))


@pytest.mark.points(2)
@pytest.mark.exercise("online_softmax_update")
@pytest.mark.parametrize("T,S,Hq,Hkv", SHAPES)
def test_tiled_attention_matches_torch(impl, T, S, Hq, Hkv):
    """The given tiled loop, running on your update, with tiles small enough to cross the diagonal."""
    q, k, v = _qkv(T, S, Hq, Hkv, seed=7 * T + S, scale=3.0)
    torch.testing.assert_close(impl.tiled_attention(q, k, v, block_q=4, block_k=6), oracle_attention(q, k, v), **TOL)


# ---------------------------------------------------------------- 3. split-K merge
def _chunks(s, v, bounds):
    outs = torch.stack([torch.softmax(s[..., a:b], -1) @ v[a:b] for a, b in zip(bounds, bounds[1:])])
    lses = torch.stack([torch.logsumexp(s[..., a:b], -1) for a, b in zip(bounds, bounds[1:])])
    return outs, lses


@pytest.mark.points(2)
@pytest.mark.exercise("merge_partials")
@pytest.mark.parametrize("bounds", [[0, 20, 40], [0, 1, 2, 40], [0, 7, 13, 29, 33, 40], [0, 40]])
def test_merge_equals_attention_over_all_keys(impl, bounds):
    g = torch.Generator().manual_seed(len(bounds))
    s, v = torch.randn(3, 5, 40, generator=g) * 4, torch.randn(40, 6, generator=g)
    outs, lses = _chunks(s, v, bounds)
    torch.testing.assert_close(impl.merge_partials(outs, lses), torch.softmax(s, -1) @ v, **TOL)


@pytest.mark.points(1)
@pytest.mark.exercise("merge_partials")
def test_merge_with_huge_lses_does_not_overflow(impl):
    g = torch.Generator().manual_seed(3)
    s, v = torch.randn(2, 30, generator=g) * 4 + 500, torch.randn(30, 4, generator=g)
    outs, lses = _chunks(s, v, [0, 10, 30])
    out = impl.merge_partials(outs, lses)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, **TOL)


@pytest.mark.points(1)
@pytest.mark.exercise("merge_partials")
def test_merge_gives_empty_chunks_zero_weight(impl):
    g = torch.Generator().manual_seed(4)
    s, v = torch.randn(2, 30, generator=g), torch.randn(30, 4, generator=g)
    outs, lses = _chunks(s, v, [0, 10, 30])
    outs = torch.cat([outs, torch.full((1, 2, 4), 123.0)])
    lses = torch.cat([lses, torch.full((1, 2), float("-inf"))])
    torch.testing.assert_close(impl.merge_partials(outs, lses), torch.softmax(s, -1) @ v, **TOL)


@pytest.mark.points(2)
@pytest.mark.exercise("merge_partials")
@pytest.mark.parametrize("S,num_splits", [(1, 1), (100, 1), (100, 7), (257, 8), (30, 30)])
def test_splitk_decode_matches_torch(impl, S, num_splits):
    """The given split-K decode, merging with your function, for one new token against S keys."""
    q, k, v = _qkv(1, S, 9, 3, D=32, seed=S + num_splits, scale=3.0)
    out = impl.splitk_decode(q[0], k, v, num_splits)
    torch.testing.assert_close(out, oracle_attention(q, k, v)[0], **TOL)
