"""Batch-1 decode tricks (issue 21), each against its plain path or an independent oracle.

fused q/k/v and gate/up vs the separate layers (and the checkpoint's tensor-parallel slices);
input-major weights vs row-major; RoPE rows looked up once per forward; the batch-1 paged
decode read as a view vs the reference attention on gathered K/V; top-p without a sort vs the
sorted one; physical-core counting; the F32 GGUF copy vs the gguf package's own dequantizer.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from minisys.attention import AttentionMetadata
from minisys.attention.paged import paged_attention, run_start
from minisys.attention.reference import ReferenceAttention
from minisys.kv.paged import PagedKVCache
from minisys.model import LlamaModel, ModelConfig
from minisys.parallel.linear import MergedColumnParallelLinear, embedding_rows, linear
from minisys.parallel.shard import shard_spec, shard_state_dict
from minisys.sampling import apply_top_p, apply_top_p_sorted

CFG = ModelConfig(vocab_size=300, hidden_size=96, intermediate_size=80, num_layers=2, num_heads=6,
                  num_kv_heads=3, head_dim=16, max_position_embeddings=128, rope_theta=10000.0,
                  attention_bias=True)


def random_model(cfg=CFG, seed=0, **kw) -> LlamaModel:
    torch.manual_seed(seed)
    m = LlamaModel(cfg, attention_backend="reference", **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def logits_of(model, ids):
    meta = AttentionMetadata(seqlens_q=[len(ids)], context_lens=[0])
    return model(torch.tensor(ids), meta.positions(), meta)


IDS = [5, 17, 99, 3, 250, 42, 7, 7, 120]


def test_fused_projections_compute_the_plain_layers():
    plain = random_model()
    fused = copy.deepcopy(plain).fuse_projections()
    names = set(fused.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.self_attn.qkv_proj.bias" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight")) for k in names)
    torch.testing.assert_close(logits_of(fused, IDS), logits_of(plain, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_fused_shard_holds_exactly_the_ranks_checkpoint_rows(rank):
    """TP=2 over 3 KV heads (uneven: 2 + 1): a rank's fused q/k/v and gate/up are ITS slices, stacked."""
    full = random_model().state_dict()
    shard = LlamaModel(CFG, attention_backend="reference", tp_rank=rank, tp_size=2)
    shard.load_state_dict(shard_state_dict(full, CFG, rank, 2), strict=False)
    shard.fuse_projections()
    attn, mlp = shard.model.layers[1].self_attn, shard.model.layers[1].mlp

    def rows(name):
        _, start, end = shard_spec(name, CFG, rank, 2)
        return full[name][start:end]

    pre = "model.layers.1."
    want = torch.cat([rows(pre + f"self_attn.{p}_proj.weight") for p in "qkv"])
    torch.testing.assert_close(attn.qkv_proj.weight, want, rtol=0, atol=0)
    torch.testing.assert_close(attn.qkv_proj.bias, torch.cat([rows(pre + f"self_attn.{p}_proj.bias") for p in "qkv"]))
    assert attn.qkv_proj.output_sizes == [attn.num_heads * 16, attn.num_kv_heads * 16, attn.num_kv_heads * 16]
    assert (attn.num_heads, attn.num_kv_heads) == ((4, 2) if rank == 0 else (2, 1))
    torch.testing.assert_close(mlp.gate_up_proj.weight,
                               torch.cat([rows(pre + "mlp.gate_proj.weight"), rows(pre + "mlp.up_proj.weight")]))


def test_merged_layer_refuses_parts_it_cannot_stack():
    with pytest.raises(ValueError, match="share their input size"):
        MergedColumnParallelLinear.fuse([torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)])
    with pytest.raises(ValueError, match="cannot hold"):
        MergedColumnParallelLinear(torch.zeros(5, 4), None, [2, 2])


def test_input_major_weights_same_model_other_layout():
    plain = random_model(ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True}))
    im = copy.deepcopy(plain).store_input_major()
    assert im.lm_head.weight is im.model.embed_tokens.weight                     # still tied
    for name, p in im.named_parameters():
        if p.dim() == 2:
            assert p.stride() == (1, p.shape[0]), name                           # (out, in) view of (in, out)
    torch.testing.assert_close(logits_of(im, IDS), logits_of(plain, IDS), rtol=1e-5, atol=1e-5)
    w = torch.randn(300, 24)
    ids = torch.tensor([[3, 299, 0], [7, 7, 150]])
    for table in (w, w.t().contiguous().t()):
        torch.testing.assert_close(embedding_rows(table, ids), F.embedding(ids, w), rtol=0, atol=0)


def test_batch1_gemv_equals_f_linear(monkeypatch):
    """One fp32 row against an input-major weight runs on numpy's BLAS; anything else is F.linear itself."""
    import minisys.parallel.linear as lin
    calls = []
    monkeypatch.setattr(lin, "BLAS_GEMV", True)
    monkeypatch.setattr(lin, "_gemv", lambda x, w: calls.append(1) or lin.blas_gemv(x, w))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g)
    wim, b = w.t().contiguous().t(), torch.randn(300, generator=g)
    x = torch.randn(5, 64, generator=g)
    with torch.inference_mode():
        for row in (x[:1], x[2:3, ::1]):
            torch.testing.assert_close(linear(row, wim, b), F.linear(row, w, b), rtol=1e-5, atol=1e-5)
        assert len(calls) == 2                                                     # both rows on numpy's BLAS
        assert torch.equal(linear(x, wim, b), F.linear(x, wim, b))                 # batched: torch's kernel
        linear(x[:1], w, b), linear(x[:1].double(), wim.double())                  # row-major, fp64: torch's
    assert len(calls) == 2
    wg = torch.nn.Parameter(wim.clone())                                            # autograd still flows
    linear(x[:1], wg).sum().backward()
    torch.testing.assert_close(wg.grad, x[:1].expand(300, 64))
    assert len(calls) == 2


def test_rope_rows_are_looked_up_once_and_never_stale():
    m = random_model()
    calls = []
    table = m.rope.cos
    m.rope.cos = _Counting(table, calls)
    logits_of(m, IDS)
    assert len(calls) == 1                          # once for the forward, not once per layer (2) x q/k
    m.rope.cos = table
    pos = torch.arange(3)
    meta = AttentionMetadata(seqlens_q=[3], context_lens=[0])
    first = m(torch.tensor(IDS[:3]), pos, meta)
    pos.add_(4)                                     # the same tensor, other positions: must be seen
    meta2 = AttentionMetadata(seqlens_q=[3], context_lens=[4])
    from minisys.kv import ContiguousKVCache
    cache = ContiguousKVCache(CFG, 16)
    m(torch.tensor(IDS[3:7]), torch.arange(4), AttentionMetadata(seqlens_q=[4], context_lens=[0]), kv_cache=cache)
    got = m(torch.tensor(IDS[:3]), pos, meta2, kv_cache=cache)
    want = logits_of(m, IDS[3:7] + IDS[:3])[4:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(first, got)


class _Counting(torch.Tensor):
    """A cos table that records each row lookup."""

    @staticmethod
    def __new__(cls, t, calls):
        r = t.as_subclass(cls)
        r.calls = calls
        return r

    def __getitem__(self, idx):
        self.calls.append(1)
        return torch.Tensor.__getitem__(self.as_subclass(torch.Tensor), idx)


@pytest.mark.parametrize("blocks", [[4, 5, 6], [4, 9, 6]])
def test_batch1_paged_decode_matches_reference(blocks):
    """Consecutive blocks: read as a view of the pool; scattered ones: gathered. Both = reference."""
    bs, Hkv, D, Hq, S = 4, 3, 16, 6, 11
    cfg = ModelConfig(**{**CFG.__dict__, "num_layers": 1})
    cache = PagedKVCache(cfg, 12, bs, fill="garbage")
    g = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(S, Hkv, D, generator=g), torch.randn(S, Hkv, D, generator=g),
               torch.randn(1, Hq, D, generator=g))
    slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(S)])
    meta = AttentionMetadata(seqlens_q=[S], context_lens=[0], slot_mapping=slots,
                             block_tables=torch.tensor([blocks + [0]]))
    cache.write(0, k, v, meta)
    step = AttentionMetadata(seqlens_q=[1], context_lens=[S - 1], block_tables=torch.tensor([blocks + [0]]))
    assert (run_start(step.block_tables[0], S, bs) is not None) == (blocks == [4, 5, 6])
    out = paged_attention(q, cache.k[0], cache.v[0], step)
    ref = ReferenceAttention().forward_packed(q, k, v, step)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert pickle.loads(pickle.dumps(step))._memo == {}           # the per-step memo is not sent to workers


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0])
def test_top_p_without_sort_keeps_the_sorted_nucleus(scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5000, generator=g) * scale
    for p in (0.1, 0.5, 0.9, 0.99):
        fast, ref = apply_top_p(x, p), apply_top_p_sorted(x, p)
        diff = (fast.isinf() != ref.isinf()).sum(-1)
        # equal, up to the float rounding of a mass that lands on p (a wide nucleus summed in another order)
        probs = torch.softmax(x, -1)
        for row in range(4):
            if diff[row]:
                kept = probs[row][~ref[row].isinf()]
                assert diff[row] == 1 and abs(kept.sum() - p) < 1e-4 + kept.min(), (scale, p, row)
        assert diff.sum() <= 1, (scale, p)


def test_top_p_fast_path_handles_ties_and_falls_back():
    x = torch.full((1, 1000), -10.0)
    x[0, 3] = x[0, 7] = 5.0                          # two equally likely tokens, ~0.5 each
    assert (~apply_top_p(x, 0.3).isinf()).nonzero()[:, 1].tolist() == [3, 7]      # the tie is kept
    assert (~apply_top_p_sorted(x, 0.3).isinf()).sum() == 1                      # the sort keeps one of them
    flat = torch.zeros(2, 600)                       # nucleus wider than the first candidates: the sort decides
    assert torch.equal(apply_top_p(flat, 0.9).isinf(), apply_top_p_sorted(flat, 0.9).isinf())


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    from minisys.threads import physical_cores
    for cpu, core in enumerate([0, 0, 1, 1]):
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text("0\n")
        (d / "core_id").write_text(f"{core}\n")
    assert physical_cores([0, 1, 2, 3], tmp_path) == 2
    assert physical_cores([0, 1], tmp_path) == 1
    assert physical_cores([0, 7], tmp_path) == 2                   # cpu7 has no topology: counted alone


def test_f32_gguf_copy_dequantizes_like_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from minisys.bench.llama_cpp import write_f32_gguf
    src, dst = tmp_path / "q.gguf", tmp_path / "f32.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    w.add_key_value("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q8_0), gguf.GGUFValueType.UINT32)
    w.add_token_list(["a", "b", "c"])
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    write_f32_gguf(src, dst)
    r_src, r_dst = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    assert r_dst.get_field("general.file_type").contents() == int(gguf.LlamaFileType.ALL_F32)
    assert r_dst.get_field("tokenizer.ggml.tokens").contents() == ["a", "b", "c"]
    q_src, q_dst = r_src.tensors[0], r_dst.tensors[0]
    assert q_dst.tensor_type == gguf.GGMLQuantizationType.F32 and list(q_dst.shape) == list(q_src.shape)
    np.testing.assert_array_equal(np.asarray(q_dst.data).reshape(4, 64),
                                  gguf.quants.dequantize(q_src.data, q_src.tensor_type))


def test_weight_bytes_count_a_tied_table_once():
    from minisys.bench.latency import weight_bytes_per_token
    tied = random_model(ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True}))
    untied = random_model()
    n = sum(p.numel() for p in untied.parameters()) * 4
    emb = untied.model.embed_tokens.weight.numel() * 4
    assert weight_bytes_per_token(untied) == n - emb          # an untied table: one row per token
    assert weight_bytes_per_token(tied) == n - emb            # tied: the LM head reads it, once


@pytest.mark.slow
def test_default_model_fast_path_greedy_equals_plain(smol):
    """The loaded default model (fused, input-major) vs the checkpoint's plain layers: same greedy tokens."""
    from minisys.engine.eager import greedy_generate
    from minisys.model import load
    fast, tok = smol
    assert fast.fused and fast.input_major
    plain, _ = load(None, device="cpu", dtype=torch.float32, quiet=True, fuse=False, input_major=False)
    ids = tok.encode("The capital of France is")
    torch.testing.assert_close(fast.forward_sequence(ids), plain.forward_sequence(ids), rtol=1e-4, atol=1e-4)
    assert greedy_generate(fast, ids, 6) == greedy_generate(plain, ids, 6)


def test_facts_profile_times_every_matmul_of_a_fused_model():
    """`bench facts`' linear-layer share hooks every module holding a matmul weight, fused ones included
    (it hooked only nn.Linear: a fused model's q/k/v and gate/up, most of its weights, went uncounted)."""
    from minisys.bench.facts import linear_layers
    for model in (random_model(), random_model().fuse_projections()):
        timed = {id(p) for m in linear_layers(model) for p in m.parameters(recurse=False) if p.dim() == 2}
        matmul = {id(p) for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name}
        assert matmul and matmul <= timed, sorted(n for n, p in model.named_parameters() if id(p) in matmul - timed)


def test_configure_threads_sets_numpys_blas_too_or_keeps_gemv_on_torch(monkeypatch):
    """``--threads n`` must hold for the batch-1 matmuls, which run on numpy's BLAS: its pool gets n, and
    where it cannot (no threadpoolctl) those matmuls go back to torch instead of running on BLAS's default."""
    import builtins
    import sys

    import threadpoolctl                                    # required (requirements.txt): a missing install fails
    import minisys.parallel.linear as lin
    from minisys.threads import configure_threads
    before_torch = torch.get_num_threads()
    monkeypatch.setattr(lin, "BLAS_GEMV", True)
    with threadpoolctl.threadpool_limits(limits=None):        # restores numpy's BLAS threads on exit
        try:
            assert configure_threads(1) == 1 and torch.get_num_threads() == 1
            blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
            assert blas and all(i["num_threads"] == 1 for i in blas), blas
            real_import = builtins.__import__

            def no_threadpoolctl(name, *a, **k):
                if name == "threadpoolctl":
                    raise ImportError(name)
                return real_import(name, *a, **k)
            monkeypatch.delitem(sys.modules, "threadpoolctl")
            monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
            with pytest.warns(RuntimeWarning, match="threadpoolctl"):
                configure_threads(1)
            assert lin.BLAS_GEMV is False
        finally:
            torch.set_num_threads(before_torch)


def test_tensor_parallel_worker_sizes_numpys_blas_as_torch(monkeypatch):
    """A worker process runs its batch-1 matmuls on numpy's BLAS too: it must get the worker's thread
    count (rank 0's), not BLAS's default of every core (TP=2 ranks each on all cores fight for them)."""
    import threadpoolctl                                    # required (requirements.txt): a missing install fails
    import minisys.model.loader as loader
    from minisys.engine.tp_model_runner import WorkerSpec, worker_main
    seen = {}

    class Stop(Exception):
        pass

    def record(*a, **k):
        seen["torch"] = torch.get_num_threads()
        seen["blas"] = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        raise Stop
    monkeypatch.setattr(loader, "load_model", record)
    before = torch.get_num_threads()
    spec = WorkerSpec(1, 2, 0, None, "auto", torch.float32, "cpu", 4, 16, num_threads=1)
    with threadpoolctl.threadpool_limits(limits=None):        # restores numpy's BLAS threads on exit
        try:
            threadpoolctl.threadpool_limits(limits=2, user_api="blas")      # as a fresh process: not 1
            with pytest.raises(Stop):
                worker_main(None, spec)
        finally:
            torch.set_num_threads(before)
    assert seen["torch"] == 1 and seen["blas"] and set(seen["blas"]) == {1}, seen
