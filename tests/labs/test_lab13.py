"""Lab 13 tests: the column/row-parallel pair, KV-group sharding, all-reduce bytes, a FIFO queue.

Oracles: the single-process layer (``nn.Linear``, minisys's ``DecoderLayer``)
computed in this process; the row-parallel linear and a whole sharded layer
run in **2 gloo processes** (forked here, so the graded namespace is
inherited as it is) and must reproduce it on both ranks; shards are checked
by loading them strictly into a ``DecoderLayer`` of the rank's size and
summing the ranks' partial products; all-reduce bytes against a ring
all-reduce simulated here chunk by chunk; the FIFO queue against a
tick-by-tick simulation. Sizes are SmolLM2's head layout (9 query heads, 3 KV
heads) on a narrow hidden size, so every test takes well under a second.

``reference_impl`` is minisys's own: the engine's ``minisys/parallel/``
(``shard.py``'s split, ``linear.py``'s column/row pair through ``from_full``,
``cost.py``'s bytes) and ``minisys/bench/multiplexing.py`` (the AlpaServe queue).
"""
from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import socket
import tempfile
import traceback
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minisys.attention import AttentionMetadata, get_backend
from minisys.model.config import ModelConfig
from minisys.model.layers import RotaryEmbedding
from minisys.model.llama import DecoderLayer


# ------------------------------------------------------------------ the reference: minisys's own
def reference_impl():
    from minisys.bench.multiplexing import fifo_latencies
    from minisys.parallel import shard
    from minisys.parallel.cost import allreduce_bytes, tp_comm_bytes_per_token
    from minisys.parallel.linear import ColumnParallelLinear, RowParallelLinear

    def kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes=2):
        shape = types.SimpleNamespace(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        return ModelConfig.kv_bytes_per_token(shape, dtype_bytes)

    def partition(n, tp_rank, tp_size):                  # the lab's form: (rank, size) in, a range out
        return range(*shard.partition(n, tp_size, tp_rank))

    # the helpers by name too, so that the grader's guard also refuses a notebook answering with them
    rules = (allreduce_bytes, shard.partition_sizes, shard.shard_spec, shard.shard_state_dict, shard.head_shard)
    return types.SimpleNamespace(rules=rules, kv_bytes_per_token=kv_bytes_per_token,
                                 ColumnParallelLinear=ColumnParallelLinear.from_full,
                                 RowParallelLinear=RowParallelLinear.from_full, partition=partition,
                                 shard_checkpoint=shard.shard_layer, tp_comm_bytes_per_token=tp_comm_bytes_per_token,
                                 fifo_latencies=fifo_latencies)


# ------------------------------------------------------------------ helpers (the oracles)
def run_ranks(fn, world_size=2, timeout=60.0):
    """[fn(rank, world_size) for each rank], each in a forked process joined to a gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="lab13-")

    def main(rank):
        torch.set_num_threads(1)
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size)
            result = {"value": fn(rank, world_size)}
        except BaseException:  # noqa: BLE001 - raised again in the test process
            result = {"error": traceback.format_exc()}
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        torch.save(result, os.path.join(folder, f"{rank}.pt"))

    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=main, args=(r,), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    try:
        results = []
        for r in range(world_size):
            path = os.path.join(folder, f"{r}.pt")
            assert os.path.exists(path), f"rank {r} died or hung (exit code {procs[r].exitcode})"
            result = torch.load(path, weights_only=False)
            assert "error" not in result, f"rank {r} raised:\n{result['error']}"
            results.append(result["value"])
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def linear(n_in, n_out, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    if bias:
        nn.init.normal_(lin.bias, mean=5.0)        # large: a bias added twice is plain to see
    return lin


def small_config(num_heads=9, num_kv_heads=3, head_dim=8, hidden=48, intermediate=40, bias=False):
    return ModelConfig(vocab_size=32, hidden_size=hidden, intermediate_size=intermediate, num_layers=1,
                       num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, attention_bias=bias)


def random_layer(cfg, seed=0):
    torch.manual_seed(seed)
    layer = DecoderLayer(cfg, 0, RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta)).eval()
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    return layer


def local_layer(cfg, shard, rope, num_kv_heads):
    """A DecoderLayer of one rank's size, strictly loaded from its shard."""
    local = ModelConfig(vocab_size=32, hidden_size=cfg.hidden_size, num_layers=1, head_dim=cfg.head_dim,
                        num_heads=num_kv_heads * cfg.num_queries_per_kv, num_kv_heads=num_kv_heads,
                        intermediate_size=shard["mlp.gate_proj.weight"].shape[0], attention_bias=cfg.attention_bias)
    layer = DecoderLayer(local, 0, rope).eval()
    layer.load_state_dict(shard)
    return layer


def inputs(cfg, lengths=(5, 3), seed=1):
    torch.manual_seed(seed)
    meta = AttentionMetadata(seqlens_q=list(lengths), context_lens=[0] * len(lengths))
    return torch.randn(sum(lengths), cfg.hidden_size), meta.positions(), meta


BACKEND = get_backend("sdpa")


# ------------------------------------------------------------------ 1. memory arithmetic
@pytest.mark.points(1)
@pytest.mark.exercise("kv_bytes_per_token")
def test_kv_bytes_per_token_by_hand(impl):
    assert impl.kv_bytes_per_token(32, 8, 128) == 131_072            # Llama-3-8B: 128 KiB per token at bf16
    assert impl.kv_bytes_per_token(80, 8, 128) == 327_680            # Llama-3-70B
    assert impl.kv_bytes_per_token(30, 3, 64) == 23_040              # SmolLM2-135M
    assert impl.kv_bytes_per_token(30, 3, 64, dtype_bytes=4) == 46_080


# ------------------------------------------------------------------ 2. the column/row pair
@pytest.mark.points(2)
@pytest.mark.exercise("ColumnParallelLinear")
@pytest.mark.parametrize("bias", [True, False])
def test_column_parallel_blocks_concatenate_to_the_full_linear(impl, bias):
    full = linear(12, 10, bias)
    x = torch.randn(4, 3, 12)
    blocks = [range(0, 4), range(4, 7), range(7, 10)]              # uneven, as the engine's head split
    parts = [impl.ColumnParallelLinear(full, rows) for rows in blocks]
    assert [tuple(p.weight.shape) for p in parts] == [(4, 12), (3, 12), (3, 12)]
    assert all((p.bias is None) == (not bias) for p in parts)
    with torch.no_grad():
        got = torch.cat([p(x) for p in parts], dim=-1)
        torch.testing.assert_close(got, full(x))
        full.weight.zero_()                                        # the shards are copies, not views
        torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), got)
    with pytest.raises(ValueError):
        impl.ColumnParallelLinear(full, range(8, 12))               # rows outside the layer


@pytest.mark.points(3)
@pytest.mark.exercise("RowParallelLinear")
@pytest.mark.parametrize("bias", [True, False])
def test_row_parallel_on_two_gloo_ranks_equals_the_full_linear(impl, bias):
    full = linear(12, 10, bias)
    x = torch.randn(4, 12)
    blocks = [range(0, 7), range(7, 12)]

    def rank_fn(rank, world_size):
        row = impl.RowParallelLinear(full, blocks[rank])
        with torch.no_grad():
            return tuple(row.weight.shape), row(x[:, blocks[rank].start:blocks[rank].stop])

    results = run_ranks(rank_fn)
    assert [shape for shape, _ in results] == [(10, 7), (10, 5)]
    want = full(x).detach()
    for _, y in results:                                           # the sum, with the bias once, on every rank
        torch.testing.assert_close(y, want)


@pytest.mark.points(1)
@pytest.mark.exercise("RowParallelLinear")
def test_row_parallel_reduces_over_its_group_only(impl):
    """Each rank in a group of its own: no sum with the other rank (the group argument is used)."""
    full = linear(8, 6)
    x = torch.randn(3, 8)

    def rank_fn(rank, world_size):
        groups = [dist.new_group([0]), dist.new_group([1])]        # every rank creates every group
        row = impl.RowParallelLinear(full, range(0, 8), group=groups[rank])
        with torch.no_grad():
            return row(x)

    for y in run_ranks(rank_fn):
        torch.testing.assert_close(y, full(x).detach())


@pytest.mark.points(2)
@pytest.mark.exercise("RowParallelLinear")
def test_the_pair_makes_an_mlp_with_one_all_reduce(impl):
    torch.manual_seed(3)
    gate, up, down = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False), linear(24, 16, seed=4)
    x = torch.randn(5, 16)
    want = down(F.silu(gate(x)) * up(x)).detach()
    blocks = [range(0, 12), range(12, 24)]

    def rank_fn(rank, world_size):
        b = blocks[rank]
        g, u = impl.ColumnParallelLinear(gate, b), impl.ColumnParallelLinear(up, b)
        d = impl.RowParallelLinear(down, b)
        with torch.no_grad():
            return d(F.silu(g(x)) * u(x))

    for y in run_ranks(rank_fn):
        torch.testing.assert_close(y, want)


# ------------------------------------------------------------------ 3. partition and sharding
@pytest.mark.points(1)
@pytest.mark.exercise("partition")
def test_partition_by_hand(impl):
    assert [impl.partition(3, r, 2) for r in range(2)] == [range(0, 2), range(2, 3)]     # SmolLM2's KV heads
    assert [impl.partition(9, r, 2) for r in range(2)] == [range(0, 5), range(5, 9)]
    assert [impl.partition(8, r, 4) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert impl.partition(5, 0, 1) == range(0, 5)


@pytest.mark.points(1)
@pytest.mark.exercise("partition")
def test_partition_covers_each_item_once_larger_blocks_first(impl):
    for n in range(1, 13):
        for tp in range(1, n + 1):
            blocks = [impl.partition(n, r, tp) for r in range(tp)]
            assert [i for b in blocks for i in b] == list(range(n)), (n, tp, blocks)
            sizes = [len(b) for b in blocks]
            assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1, (n, tp, sizes)
    for bad in [(2, 0, 3), (4, 2, 2), (4, -1, 2)]:
        with pytest.raises(ValueError):
            impl.partition(*bad)


def shards_of(impl, cfg, layer, tp):
    sd = layer.state_dict()
    return [impl.shard_checkpoint(sd, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, r, tp) for r in range(tp)]


@pytest.mark.points(2)
@pytest.mark.exercise("shard_checkpoint")
def test_smollm2_heads_at_tp2_split_by_whole_kv_groups(impl):
    """9 Q / 3 KV heads: rank 0 keeps KV heads {0, 1} and Q heads 0-5, rank 1 KV head {2} and Q heads 6-8."""
    cfg = small_config()
    layer = random_layer(cfg)
    s0, s1 = shards_of(impl, cfg, layer, 2)
    attn, d = layer.self_attn, cfg.head_dim
    q, k, o = attn.q_proj.weight, attn.k_proj.weight, attn.o_proj.weight
    heads = q.detach().view(9, d, -1)
    torch.testing.assert_close(s0["self_attn.q_proj.weight"], heads[0:6].reshape(6 * d, -1))
    torch.testing.assert_close(s1["self_attn.q_proj.weight"], heads[6:9].reshape(3 * d, -1))
    torch.testing.assert_close(s1["self_attn.k_proj.weight"], k.detach().view(3, d, -1)[2])
    torch.testing.assert_close(s0["self_attn.o_proj.weight"], o.detach().view(-1, 9, d)[:, 0:6].reshape(o.shape[0], -1))
    assert s0["mlp.gate_proj.weight"].shape[0] == s1["mlp.down_proj.weight"].shape[1] == 20
    torch.testing.assert_close(s1["input_layernorm.weight"], layer.input_layernorm.weight.detach())


@pytest.mark.points(3)
@pytest.mark.exercise("shard_checkpoint")
@pytest.mark.parametrize("heads,kv_heads,tp,bias", [(9, 3, 2, False), (12, 4, 3, False), (9, 3, 3, True)])
def test_partial_products_of_the_shards_sum_to_the_full_layer(impl, heads, kv_heads, tp, bias):
    cfg = small_config(heads, kv_heads, bias=bias)
    layer = random_layer(cfg)
    x, pos, meta = inputs(cfg)
    locals_ = [local_layer(cfg, shard, layer.self_attn.rope, shard["self_attn.k_proj.weight"].shape[0] // cfg.head_dim)
               for shard in shards_of(impl, cfg, layer, tp)]
    with torch.no_grad():
        attn = sum(l.self_attn(l.input_layernorm(x), pos, meta, BACKEND, None) for l in locals_)
        h = x + attn                                             # what the all-reduce after o_proj gives
        out = h + sum(l.mlp(l.post_attention_layernorm(h)) for l in locals_)
        torch.testing.assert_close(out, layer(x, pos, meta, BACKEND, None), atol=1e-4, rtol=1e-4)


@pytest.mark.points(1)
@pytest.mark.exercise("shard_checkpoint")
def test_shards_are_copies_and_unknown_tensors_are_refused(impl):
    cfg = small_config()
    layer = random_layer(cfg)
    sd = layer.state_dict()
    shard = impl.shard_checkpoint(sd, 9, 3, cfg.head_dim, 0, 2)
    before = sd["self_attn.q_proj.weight"].clone()
    for t in shard.values():
        t.zero_()
    torch.testing.assert_close(sd["self_attn.q_proj.weight"], before)
    sd["self_attn.rotary.inv_freq"] = torch.ones(4)
    with pytest.raises(ValueError, match="rotary"):
        impl.shard_checkpoint(sd, 9, 3, cfg.head_dim, 0, 2)


@pytest.mark.points(2)
@pytest.mark.exercise("shard_checkpoint")
def test_sharded_layer_on_two_gloo_ranks_equals_the_single_process_layer(impl):
    """The rank's own layer, with an all-reduce after o_proj and after down_proj (done here, not by the pair)."""
    cfg = small_config()
    layer = random_layer(cfg, seed=5)
    x, pos, meta = inputs(cfg, lengths=(6, 2, 4))
    shards = shards_of(impl, cfg, layer, 2)

    class Summed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            y = self.inner(t)
            dist.all_reduce(y)
            return y

    def rank_fn(rank, world_size):
        local = local_layer(cfg, shards[rank], layer.self_attn.rope,
                            shards[rank]["self_attn.k_proj.weight"].shape[0] // cfg.head_dim)
        local.self_attn.o_proj, local.mlp.down_proj = Summed(local.self_attn.o_proj), Summed(local.mlp.down_proj)
        with torch.no_grad():
            return local(x, pos, meta, BACKEND, None)

    with torch.no_grad():
        want = layer(x, pos, meta, BACKEND, None)
    for y in run_ranks(rank_fn):
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ 4. all-reduce bytes
def ring_allreduce_bytes_sent(message_elems: int, n: int, elem_bytes: int) -> float:
    """Run a ring all-reduce on n ranks (reduce-scatter, then all-gather), checking the sum; bytes rank 0 sends."""
    data = [[random.random() for _ in range(message_elems)] for _ in range(n)]
    want = [sum(col) for col in zip(*data)]
    chunks = [[list(range(message_elems))[c::n] for c in range(n)] for _ in range(n)]
    chunk_idx = chunks[0]
    sent = 0
    for step in range(n - 1):                                     # reduce-scatter
        outgoing = [(r, (r - step) % n, [data[r][i] for i in chunk_idx[(r - step) % n]]) for r in range(n)]
        for r, c, vals in outgoing:
            dst = (r + 1) % n
            for i, v in zip(chunk_idx[c], vals):
                data[dst][i] += v
            sent += len(vals) * elem_bytes if r == 0 else 0
    for step in range(n - 1):                                     # all-gather
        outgoing = [(r, (r + 1 - step) % n, [data[r][i] for i in chunk_idx[(r + 1 - step) % n]]) for r in range(n)]
        for r, c, vals in outgoing:
            dst = (r + 1) % n
            for i, v in zip(chunk_idx[c], vals):
                data[dst][i] = v
            sent += len(vals) * elem_bytes if r == 0 else 0
    for r in range(n):
        assert all(abs(a - b) < 1e-9 for a, b in zip(data[r], want)), "the simulated ring is wrong"
    return sent


@pytest.mark.points(2)
@pytest.mark.exercise("tp_comm_bytes_per_token")
@pytest.mark.parametrize("hidden,layers,tp,dtype_bytes", [(576, 30, 2, 2), (64, 3, 4, 4), (96, 2, 3, 2), (40, 5, 8, 2)])
def test_comm_bytes_match_a_simulated_ring(impl, hidden, layers, tp, dtype_bytes):
    per_all_reduce = ring_allreduce_bytes_sent(hidden, tp, dtype_bytes)
    want = layers * 2 * per_all_reduce                           # two all-reduces per layer
    assert impl.tp_comm_bytes_per_token(hidden, layers, tp, dtype_bytes) == pytest.approx(want)


@pytest.mark.points(1)
@pytest.mark.exercise("tp_comm_bytes_per_token")
def test_comm_bytes_by_hand(impl):
    assert impl.tp_comm_bytes_per_token(576, 30, 1) == 0            # one device: nothing to send
    assert impl.tp_comm_bytes_per_token(576, 30, 2) == pytest.approx(69_120)
    assert impl.tp_comm_bytes_per_token(8192, 80, 8) == pytest.approx(80 * 2 * 1.75 * 16384)


# ------------------------------------------------------------------ 5. the FIFO queue
def fifo_by_ticks(arrivals: list[int], service: int) -> list[int]:
    """Integer time, one tick at a time: who is served, when each finishes."""
    queue, finish, busy_until, current, t = [], {}, 0, None, 0
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    k = 0
    while len(finish) < len(arrivals):
        while k < len(order) and arrivals[order[k]] == t:
            queue.append(order[k])
            k += 1
        if current is not None and t == busy_until:
            finish[current], current = t, None
        if current is None and queue:
            current, busy_until = queue.pop(0), t + service
            if service == 0:
                finish[current], current = t, None
                continue                                            # serve the next one in the same tick
        t += 1
    return [finish[i] - arrivals[i] for i in range(len(arrivals))]


@pytest.mark.points(1)
@pytest.mark.exercise("fifo_latencies")
def test_fifo_by_hand(impl):
    assert impl.fifo_latencies([0, 0, 0], 1.0) == pytest.approx([1, 2, 3])
    assert impl.fifo_latencies([0, 5], 1.0) == pytest.approx([1, 1])
    assert impl.fifo_latencies([3, 0, 0.5], 1.0) == pytest.approx([1, 1, 1.5])   # unsorted input, input order out
    assert impl.fifo_latencies([], 1.0) == []
    with pytest.raises(ValueError):
        impl.fifo_latencies([0.0], -1.0)


@pytest.mark.points(2)
@pytest.mark.exercise("fifo_latencies")
def test_fifo_matches_a_tick_simulation(impl):
    rng = random.Random(0)
    for _ in range(40):
        arrivals = [rng.randrange(0, 30) for _ in range(rng.randrange(1, 12))]
        service = rng.randrange(0, 5)
        want = fifo_by_ticks(arrivals, service)
        assert impl.fifo_latencies([float(a) for a in arrivals], float(service)) == pytest.approx(want), arrivals
