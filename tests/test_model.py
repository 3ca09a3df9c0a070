"""The model's pieces against torch's own ops, and the cached path against the uncached one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minisys.attention import AttentionMetadata, get_backend
from minisys.kv import ContiguousKVCache
from minisys.model import LlamaModel, ModelConfig, load
from minisys.model.layers import RMSNorm, RotaryEmbedding

TINY = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0)


def tiny_model(seed=0, backend="auto") -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(TINY, attention_backend=backend)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3,
                    num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="model_type .gpt2"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})


def test_rmsnorm_matches_torch():
    x = torch.randn(5, 32)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    ref = F.rms_norm(x, (32,), norm.weight, eps=1e-5) if hasattr(F, "rms_norm") else \
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def test_rope_matches_complex_rotation():
    """RoPE as a rotation in the complex plane of pairs (i, i + D/2): an independent formula."""
    D, theta = 16, 10000.0
    rope = RotaryEmbedding(D, 64, theta)
    x = torch.randn(7, 3, D, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 5, 9, 30, 63])
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(
        torch.ones(7, D // 2, dtype=torch.float64), pos[:, None] * freqs)[:, None, :]
    ref = torch.cat([z.real, z.imag], dim=-1)
    torch.testing.assert_close(rope(x.float(), pos).double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="beyond the model's context"):
        rope(x.float(), torch.tensor([64] * 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_roll_equals_rotate_half_bit_for_bit(dtype):
    """`forward` (roll + a signed sin table) is the rotate-half formula with the sign moved: same bits."""
    rope = RotaryEmbedding(64, 128, 10000.0)
    x = torch.randn(5, 12, 64).to(dtype)[:, :9]                  # a non-contiguous slice, as q of fused qkv
    pos = torch.tensor([0, 3, 17, 64, 127])
    assert torch.equal(rope(x, pos), rope.forward_rotate_half(x, pos))
    assert rope(x, pos).dtype == dtype


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_kv_cache_steps_equal_full_forward(backend):
    """Prefill + one-token decode steps through the contiguous cache == recomputing everything."""
    m = tiny_model(backend=backend)
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(0))
    full = m.forward_sequence(ids)                                    # (20, V)
    cache = ContiguousKVCache(TINY, max_len=32)
    meta = AttentionMetadata(seqlens_q=[12], context_lens=[0])
    steps = [m(ids[:12], meta.positions(), meta, cache)]
    for t in range(12, 20):
        meta = AttentionMetadata(seqlens_q=[1], context_lens=[t])
        steps.append(m(ids[t:t + 1], meta.positions(), meta, cache))
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-5)


def test_flat_batch_of_sequences_equals_separate_runs():
    """Packing sequences into one flat batch does not let them see each other."""
    m = tiny_model()
    seqs = [torch.randint(0, 300, (n,)) for n in (5, 11, 1, 8)]
    meta = AttentionMetadata(seqlens_q=[len(s) for s in seqs], context_lens=[0] * 4)
    packed = m(torch.cat(seqs), meta.positions(), meta)
    separate = torch.cat([m.forward_sequence(s) for s in seqs])
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_batched_contiguous_cache_decode():
    m = tiny_model()
    seqs = [torch.randint(0, 300, (n,)) for n in (6, 9)]
    cache = ContiguousKVCache(TINY, max_len=16, max_batch=2)
    meta = AttentionMetadata(seqlens_q=[5, 8], context_lens=[0, 0])
    m(torch.cat([seqs[0][:5], seqs[1][:8]]), meta.positions(), meta, cache)
    meta = AttentionMetadata(seqlens_q=[1, 1], context_lens=[5, 8])
    out = m(torch.stack([seqs[0][5], seqs[1][8]]), meta.positions(), meta, cache)
    torch.testing.assert_close(out[0], m.forward_sequence(seqs[0])[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], m.forward_sequence(seqs[1])[-1], atol=1e-5, rtol=1e-5)


def test_reference_and_sdpa_agree_with_gqa_and_context():
    q = torch.randn(7, 6, 16)
    k, v = torch.randn(2, 17, 2, 16).unbind(0)
    meta = AttentionMetadata(seqlens_q=[4, 1, 2], context_lens=[3, 6, 1])
    ref = get_backend("reference").forward_packed(q, k, v, meta)
    torch.testing.assert_close(get_backend("sdpa").forward_packed(q, k, v, meta), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("nope")


def test_logits_indices_selects_rows():
    m = tiny_model()
    ids = torch.randint(0, 300, (9,))
    meta = AttentionMetadata(seqlens_q=[4, 5], context_lens=[0, 0])
    full = m(ids, meta.positions(), meta)
    last = m(ids, meta.positions(), meta, logits_indices=meta.last_token_indices())
    torch.testing.assert_close(last, full[[3, 8]])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_bf16_load_runs_and_stays_close(tiny_dirs, name):
    m32, _ = load(str(tiny_dirs[name]), device="cpu", dtype=torch.float32, quiet=True)
    m16, _ = load(str(tiny_dirs[name]), device="cpu", dtype=torch.bfloat16, quiet=True)
    ids = list(range(1, 30))
    a, b = m32.forward_sequence(ids), m16.forward_sequence(ids)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
