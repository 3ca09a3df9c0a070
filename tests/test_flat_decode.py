"""The batch-1 flat decode loop (`minisys.model.flat_decode`) against the modular forward it stands in for.

Oracle: the same model with ``flat_decode = False`` (modules, the attention backend, the cache's
write/read), on the same tokens and caches; the flat loop must give the same logits bit for bit and
leave the same K/V in the cache. Whether the flat path ran is counted, so a test cannot pass by
quietly falling back. SmolLM2's greedy outputs against transformers (tests/test_transformers_oracle.py)
run through it too: the loader turns it on for fp32 CPU models.
"""
from __future__ import annotations

import copy

import pytest
import torch

from minisys.attention import AttentionMetadata
from minisys.kv.contiguous import ContiguousKVCache
from minisys.kv.paged import PagedKVCache
from minisys.model import LlamaModel, ModelConfig
from minisys.model import flat_decode
from minisys.model.flat_decode import FlatDecoder

CFG = ModelConfig(vocab_size=300, hidden_size=96, intermediate_size=80, num_layers=3, num_heads=6,
                  num_kv_heads=3, head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
                  attention_bias=True)                  # Qwen2-style q/k/v bias: the flat loop must add it
IDS = [5, 17, 99, 3, 250, 42, 7, 7, 120, 64, 1, 200]
PROMPT = 5


def served_model(seed: int = 0) -> LlamaModel:
    """A random model in the layout the loader serves on a CPU: fused, input-major, flat decode on."""
    torch.manual_seed(seed)
    m = LlamaModel(CFG, attention_backend="auto")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    m = m.eval().fuse_projections().store_input_major()
    m.flat_decode = True
    return m


@pytest.fixture
def flat_calls(monkeypatch):
    calls = []
    real = FlatDecoder.__call__

    def counted(self, *args):
        calls.append(args[3])                          # the cache run it was given
        return real(self, *args)
    monkeypatch.setattr(FlatDecoder, "__call__", counted)
    return calls


def decode_contiguous(model, ids=IDS, prompt=PROMPT):
    """Prefill ``prompt`` tokens, then decode the rest one by one: (per-step logits, cache)."""
    cache = ContiguousKVCache(CFG, max_len=len(ids) + 2, max_batch=2)
    out = []
    meta = AttentionMetadata(seqlens_q=[prompt], context_lens=[0], cache_slots=[1])
    out.append(model(torch.tensor(ids[:prompt]), meta.positions(), meta, cache))
    for t in range(prompt, len(ids)):
        meta = AttentionMetadata(seqlens_q=[1], context_lens=[t], cache_slots=[1])     # slot 1: an offset row
        out.append(model(torch.tensor(ids[t:t + 1]), meta.positions(), meta, cache))
    return out, cache


def test_flat_equals_modular_with_the_contiguous_cache(flat_calls):
    flat = served_model()
    modular = copy.deepcopy(flat)
    modular.flat_decode = False
    got, cache_f = decode_contiguous(flat)
    want, cache_m = decode_contiguous(modular)
    assert len(flat_calls) == len(IDS) - PROMPT                      # every decode step, no prefill
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(cache_f.k, cache_m.k) and torch.equal(cache_f.v, cache_m.v)


def decode_paged(model, table: list[int], block_size: int = 4):
    """The same through a paged cache whose sequence owns blocks ``table`` (in that order)."""
    cache = PagedKVCache(CFG, num_blocks=12, block_size=block_size, fill="garbage")
    tables = torch.tensor([table])

    def slot(pos):
        return table[pos // block_size] * block_size + pos % block_size
    meta = AttentionMetadata(seqlens_q=[PROMPT], context_lens=[0], block_tables=tables,
                             slot_mapping=torch.tensor([slot(p) for p in range(PROMPT)]))
    out = [model(torch.tensor(IDS[:PROMPT]), meta.positions(), meta, cache)]
    for t in range(PROMPT, len(IDS)):
        meta = AttentionMetadata(seqlens_q=[1], context_lens=[t], block_tables=tables,
                                 slot_mapping=torch.tensor([slot(t)]))
        out.append(model(torch.tensor(IDS[t:t + 1]), meta.positions(), meta, cache))
    return out, cache


@pytest.mark.parametrize("table, flat_steps", [
    ([3, 4, 5], len(IDS) - PROMPT),          # consecutive blocks: one slice of the pool, every step flat
    ([7, 2, 5], 0),                          # scattered: no run, the modular (gathering) path every step
    ([2, 3, 9], 3),                          # consecutive for the first 8 tokens only: flat until the jump
])
def test_flat_equals_modular_with_the_paged_cache(flat_calls, table, flat_steps):
    flat = served_model(seed=1)
    modular = copy.deepcopy(flat)
    modular.flat_decode = False
    got, cache_f = decode_paged(flat, table)
    want, cache_m = decode_paged(modular, table)
    assert len(flat_calls) == flat_steps
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(cache_f.k, cache_m.k) and torch.equal(cache_f.v, cache_m.v)


def test_flat_path_only_where_it_applies(flat_calls):
    m = served_model()
    cache = ContiguousKVCache(CFG, max_len=16, max_batch=2)
    one = AttentionMetadata(seqlens_q=[1], context_lens=[3])
    assert flat_decode.applies(m, one, cache) == (0, 4)
    assert flat_decode.applies(m, one, None) is None                                  # no cache
    assert flat_decode.applies(m, AttentionMetadata(seqlens_q=[2], context_lens=[3]), cache) is None
    assert flat_decode.applies(m, AttentionMetadata(seqlens_q=[1, 1], context_lens=[3, 3]), cache) is None
    m.set_attention_backend("reference")                  # a backend the user chose is honoured
    assert flat_decode.applies(m, one, cache) is None
    m.set_attention_backend("auto")
    m.flat_decode = False
    assert flat_decode.applies(m, one, cache) is None
    m.flat_decode = True
    static = AttentionMetadata(seqlens_q=[1], context_lens=[3], seq_lens_tensor=torch.tensor([4]))
    assert flat_decode.applies(m, static, cache) is None                             # a CUDA-graph step
    assert flat_decode.applies(m, one, cache, torch.tensor([0])) == (0, 4)
    assert flat_decode.applies(m, one, cache, torch.tensor([], dtype=torch.long)) is None   # no row wanted
    assert flat_decode.applies(m.to(torch.bfloat16), one, cache) is None             # fp32 only
    assert not flat_calls


def test_a_step_that_wants_no_logits_gets_none():
    """The modular contract: len(logits_indices) rows, zero included."""
    m = served_model()
    cache = ContiguousKVCache(CFG, max_len=16)
    meta = AttentionMetadata(seqlens_q=[1], context_lens=[0])
    assert m(torch.tensor([1]), meta.positions(), meta, cache, torch.tensor([], dtype=torch.long)).shape == (0, 300)


def test_self_draft_model_runs_without_the_flat_path():
    """spec's SelfDraftModel (the target's first layers) skips LlamaModel.__init__: it must still run."""
    from minisys.spec.draft import SelfDraftModel
    draft = SelfDraftModel(served_model(), 1)
    cache = ContiguousKVCache(draft.config, 16)
    for meta, ids in ((AttentionMetadata(seqlens_q=[3], context_lens=[0]), [1, 2, 3]),
                      (AttentionMetadata(seqlens_q=[1], context_lens=[3]), [4])):
        assert draft(torch.tensor(ids), meta.positions(), meta, cache).shape == (len(ids), 300)


def test_a_full_contiguous_cache_is_refused_by_the_modular_write():
    m = served_model()
    cache = ContiguousKVCache(CFG, max_len=4)
    meta = AttentionMetadata(seqlens_q=[1], context_lens=[4])
    with pytest.raises(ValueError, match="the cache holds 4"):
        m(torch.tensor([1]), meta.positions(), meta, cache)


def test_refusing_a_position_beyond_the_context():
    m = served_model()
    cache = ContiguousKVCache(CFG, max_len=200)
    meta = AttentionMetadata(seqlens_q=[1], context_lens=[128])
    with pytest.raises(ValueError, match="beyond the model's context"):
        m(torch.tensor([1]), meta.positions(), meta, cache)


def test_fusing_again_drops_the_decoder():
    """The decoder holds the layers' parameters: fusing (new modules) drops it, the next step rebuilds it."""
    m = served_model()
    first = m.flat_decoder()
    m.fuse_projections()                    # already fused: nothing replaced, but the decoder is rebuilt
    assert m.flat_decoder() is not first


@pytest.mark.slow
def test_latency_bench_systems_agree_on_smollm2(tmp_path, one_torch_thread):
    """`bench latency` at a tiny size: the modular loop, the flat loop and the engine, all on SmolLM2,
    produce the same greedy tokens (the JSON records it per system)."""
    import json

    from minisys.bench.latency import main
    assert main(["--no-llama-cpp", "--no-plain", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("latency*.json")).read_text())
    assert set(res["systems"]) == {"eager (modular)", "eager", "engine"}
    assert all(s["same_tokens_as_eager"] for s in res["systems"].values())
