"""The paged KV cache and paged attention against the contiguous cache and reference attention.

Every pool starts full of large random garbage and the allocator's free list
is shuffled, so reading an unwritten slot, or the wrong block, changes the
answer instead of reading zeros by luck.
"""
from __future__ import annotations

import pytest
import torch

from minisys.attention import AttentionMetadata, PackedKV, PagedKV, get_backend
from minisys.attention.paged import PagedAttention
from minisys.attention.reference import ReferenceAttention
from minisys.engine.eager import greedy_generate, next_token_logits
from minisys.kv import ContiguousKVCache
from minisys.kv.block_allocator import BlockAllocator
from minisys.kv.paged import PagedKVCache, block_table_tensor, context_slots
from minisys.engine.paged_runner import PagedRunner
from minisys.model import LlamaModel, ModelConfig

TINY = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0)


def tiny_model(backend="sdpa", seed=0) -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(TINY, attention_backend=PagedAttention() if backend == "paged" else backend)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def _garbage_pool_batch(seqlens_q, context_lens, bs=4, num_blocks=40, hq=6, hkv=2, d=8, seed=0):
    """Random pools, a shuffled allocator, and the packed context K/V the pools should yield."""
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(num_blocks, bs, hkv, d, generator=g) * 100
    v_pool = torch.randn(num_blocks, bs, hkv, d, generator=g) * 100
    alloc = BlockAllocator(num_blocks, bs, enable_prefix_caching=False, seed=seed)
    tables, ks, vs = [], [], []
    for i, (q, c) in enumerate(zip(seqlens_q, context_lens)):
        n = q + c
        t = alloc.allocate(i, list(range(n))).table
        kk, vv = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
        slots = torch.tensor(t.slots(0, n))
        k_pool.view(-1, hkv, d)[slots] = kk
        v_pool.view(-1, hkv, d)[slots] = vv
        tables.append(t.block_ids)
        ks.append(kk), vs.append(vv)
    meta = AttentionMetadata(seqlens_q=list(seqlens_q), context_lens=list(context_lens),
                             block_tables=block_table_tensor(tables))
    q = torch.randn(meta.num_tokens, hq, d, generator=g)
    return q, k_pool, v_pool, torch.cat(ks), torch.cat(vs), meta


@pytest.mark.parametrize("seqlens_q,context_lens", [
    ([1, 1, 1], [5, 0, 12]),            # decode batch (one sequence with empty context)
    ([7, 3, 9], [0, 0, 0]),             # prefill batch
    ([1, 4, 6, 2], [9, 0, 3, 13]),      # mixed: decode, prefill, chunked prefills
])
def test_paged_attention_matches_reference(seqlens_q, context_lens):
    """The block-table read and the naive gather path, against the reference on packed K/V."""
    q, k_pool, v_pool, k, v, meta = _garbage_pool_batch(seqlens_q, context_lens)
    expected = ReferenceAttention().forward_packed(q, k, v, meta)
    got = PagedAttention().forward_paged(q, k_pool, v_pool, meta)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    idx = context_slots(meta.block_tables, meta.seqlens_k, k_pool.shape[1])
    assert torch.equal(k_pool.view(-1, *k_pool.shape[2:])[idx], k)      # the gather path
    gathered = PagedKV(k_pool, v_pool).gather(meta)
    assert torch.equal(gathered.k, k) and torch.equal(gathered.v, v)
    via_gather = ReferenceAttention().forward_paged(q, k_pool, v_pool, meta)   # default: gather, then packed
    torch.testing.assert_close(via_gather, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, via_gather, atol=1e-4, rtol=1e-4)
    auto = get_backend("auto").forward_paged(q, k_pool, v_pool, meta)         # auto: the block-table read
    torch.testing.assert_close(auto, expected, atol=1e-4, rtol=1e-4)


def test_views_call_the_backend_method_of_their_kind():
    """PackedKV -> forward_packed, PagedKV -> forward_paged: named methods, no capability flags."""
    calls = []

    class Spy(ReferenceAttention):
        def forward_packed(self, q, k, v, meta):
            calls.append("packed")
            return super().forward_packed(q, k, v, meta)

        def forward_paged(self, q, k_pool, v_pool, meta):
            calls.append("paged")
            return super().forward_paged(q, k_pool, v_pool, meta)

    q, k_pool, v_pool, k, v, meta = _garbage_pool_batch([2, 1], [3, 4])
    PackedKV(k, v).attend(Spy(), q, meta)
    assert calls == ["packed"]
    calls.clear()
    PagedKV(k_pool, v_pool).attend(Spy(), q, meta)
    assert calls == ["paged", "packed"]                 # the default paged read gathers, then runs packed


def test_cache_write_then_read_gathers_context():
    cache = PagedKVCache(TINY, num_blocks=10, block_size=4, fill="garbage")
    alloc = BlockAllocator(10, 4, seed=3)
    t = alloc.allocate("s", list(range(6))).table
    k = torch.randn(6, 2, 16)
    v = torch.randn(6, 2, 16)
    meta = AttentionMetadata(seqlens_q=[6], context_lens=[0], slot_mapping=torch.tensor(t.slots(0, 6)),
                             block_tables=block_table_tensor([t.block_ids]))
    cache.write(1, k, v, meta)
    view = cache.read(1, meta)
    assert isinstance(view, PagedKV) and view.k_pool.data_ptr() == cache.k[1].data_ptr()   # the pool, no copy
    kc, vc = view.gather(meta).k, view.gather(meta).v
    assert torch.equal(kc, k) and torch.equal(vc, v)
    alloc.append_slot("s", 6)
    k1, v1 = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    meta = AttentionMetadata(seqlens_q=[1], context_lens=[6], slot_mapping=torch.tensor(t.slots(6, 7)),
                             block_tables=block_table_tensor([t.block_ids]))
    cache.write(1, k1, v1, meta)
    kc = cache.read(1, meta).gather(meta).k
    assert torch.equal(kc, torch.cat([k, k1]))
    with pytest.raises(ValueError, match="slot_mapping"):
        cache.write(0, k, v, AttentionMetadata(seqlens_q=[6], context_lens=[0]))
    with pytest.raises(ValueError, match="block_tables"):
        cache.read(0, AttentionMetadata(seqlens_q=[6], context_lens=[0]))


def test_contiguous_cache_write_then_read_packs_every_sequence():
    cache = ContiguousKVCache(TINY, max_len=12, max_batch=2)
    k, v = torch.randn(2, 7, 2, 16).unbind(0)
    meta = AttentionMetadata(seqlens_q=[4, 3], context_lens=[0, 0])
    cache.write(0, k, v, meta)
    k1, v1 = torch.randn(2, 2, 2, 16).unbind(0)
    meta = AttentionMetadata(seqlens_q=[1, 1], context_lens=[4, 3])
    cache.write(0, k1, v1, meta)
    view = cache.read(0, meta)
    assert isinstance(view, PackedKV)
    assert torch.equal(view.k, torch.cat([k[:4], k1[:1], k[4:], k1[1:]]))       # (S, Hkv, D), cu_seqlens_k order
    assert torch.equal(view.v, torch.cat([v[:4], v1[:1], v[4:], v1[1:]]))


def _contiguous_logits(model, seqs, steps):
    """Per sequence, the eager contiguous path: prefill logits then one row per decode token."""
    out = []
    for prompt, extra in zip(seqs, steps):
        cache = ContiguousKVCache(model.config, len(prompt) + len(extra) + 1, 1)
        seq, rows = list(prompt), [next_token_logits(model, prompt, prompt, cache)]
        for t in extra:
            seq.append(t)
            rows.append(next_token_logits(model, seq, [t], cache))
        out.append(torch.cat(rows))
    return out


@pytest.mark.parametrize("backend", ["paged", "auto", "sdpa", "reference"])
def test_tiny_model_batched_paged_equals_contiguous(backend, monkeypatch):
    """A batch of sequences prefilled together, then decoded together, on a garbage pool.

    ``paged`` (and ``auto``, on pools) reads through the block tables; ``sdpa``
    and ``reference`` take the gather path.
    """
    gathers = []
    real_gather = PagedKV.gather
    monkeypatch.setattr(PagedKV, "gather", lambda self, meta: gathers.append(1) or real_gather(self, meta))
    model = tiny_model(backend)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 11, 1, 8)]
    extra = [torch.randint(0, 300, (6,), generator=g).tolist() for _ in prompts]
    want = _contiguous_logits(tiny_model("reference"), prompts, extra)
    runner = PagedRunner(model, num_blocks=30, block_size=4, seed=7, fill="garbage")
    ids = list(range(len(prompts)))
    for i, p in zip(ids, prompts):
        runner.add(i, p)
    rows = [runner.step(ids)]
    for step in range(6):
        for i in ids:
            runner.append(i, extra[i][step])
        rows.append(runner.step(ids))
        runner.allocator.check_invariants()
    got = torch.stack(rows, 1)                              # (B, steps, V)
    for i in ids:
        torch.testing.assert_close(got[i], want[i], atol=1e-4, rtol=1e-4)
    assert (len(gathers) > 0) == (backend not in ("paged", "auto"))     # which read path ran


def test_fork_copy_on_write_through_the_model():
    model = tiny_model("paged")
    prompt = [3, 1, 4, 1, 5, 9]                             # block_size 4: last block partial
    runner = PagedRunner(model, num_blocks=12, block_size=4, seed=1, fill="garbage")
    runner.add("p", prompt)
    runner.step(["p"])
    runner.fork("p", "c")
    runner.append("p", 7)
    runner.append("c", 8)                                   # copy-on-write of the shared block
    got = runner.step(["p", "c"])
    ref = tiny_model("reference")
    want = [next_token_logits(ref, prompt + [t], prompt + [t], None) for t in (7, 8)]
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=1e-4)
    runner.allocator.check_invariants()


@pytest.mark.parametrize("backend", ["paged", "sdpa"])
def test_prefix_cache_hit_same_output(backend):
    model = tiny_model(backend)
    prompt = list(range(10, 40))                            # 30 tokens: 7 full blocks of 4
    runner = PagedRunner(model, num_blocks=40, block_size=4, seed=2, fill="garbage")
    first = runner.greedy_generate(prompt, 8, "a")
    assert runner.allocator.hits == 0
    alloc = runner.add("b", prompt)
    assert alloc.num_cached_tokens == 28 and runner.allocator.hits == 7
    logits_hit = runner.step(["b"])
    runner.free("b")
    torch.testing.assert_close(logits_hit, next_token_logits(model, prompt, prompt, None),
                               atol=1e-4, rtol=1e-4)
    second = runner.greedy_generate(prompt, 8, "c")
    assert second == first == greedy_generate(model, prompt, 8)
    assert runner.allocator.hits == 14
    runner.allocator.check_invariants()


@pytest.mark.slow
def test_smollm2_paged_greedy_text_matches_contiguous(smol):
    model, tok = smol
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    want = greedy_generate(model, ids, 12)
    previous = model.attention
    try:
        model.set_attention_backend(PagedAttention())
        runner = PagedRunner(model, num_blocks=16, block_size=8, seed=0, fill="garbage")
        got = runner.greedy_generate(ids, 12, "x")
        again = runner.greedy_generate(ids, 12, "y")        # the prompt's full blocks hit the cache
    finally:
        model.set_attention_backend(previous)
    assert got == want and again == want
    assert runner.allocator.hits == len(ids) // 8 or runner.allocator.hits == (len(ids) - 1) // 8
    print(repr(tok.decode(got)))


def test_benchmark_workload_paged_keeps_95_percent():
    from minisys.bench.paged_kv import chat_workload, contiguous_utilisation, fits_contiguous, fits_paged, \
        paged_utilisation
    reqs = chat_workload(200, seed=0)
    paged = paged_utilisation(reqs, 16)
    eager = contiguous_utilisation(reqs, lambda r: r.prompt_len + 512)
    assert paged >= 0.95 > eager
    assert fits_paged(reqs, 65536, 16) > fits_contiguous(reqs, 65536, lambda r: r.prompt_len + 512)
