# %% [markdown]
# # Lab 13: Tensor parallelism — the column/row split, sharding a checkpoint, and when it pays
#
# Companion to `lessons/13-tensor-parallel.md`. A model whose weights and KV
# cache do not fit one device is split across several; Megatron-LM's tensor
# parallelism (Shoeybi et al. 2019; Narayanan et al., SC 2021) splits every
# layer's matrices so that each device holds a slice and the layer needs
# exactly **two all-reduces**: one after attention, one after the MLP. You will
# write:
#
# 1. **the memory arithmetic** (`kv_bytes_per_token`): why an 8B model fits an
#    80 GB device and a 70B one does not;
# 2. **the column/row-parallel pair** (`ColumnParallelLinear`,
#    `RowParallelLinear`): a rank keeps a block of output rows (no
#    communication) or a block of input columns (a local matmul, then one
#    `dist.all_reduce`, the bias added once);
# 3. **the split of a block of items** (`partition`) and **sharding a Llama
#    layer's checkpoint** (`shard_checkpoint`) by whole KV-head groups: with
#    SmolLM2's 9 query heads and 3 KV heads at TP=2, rank 0 keeps KV heads
#    {0, 1} (query heads 0–5) and rank 1 KV head {2} (query heads 6–8) —
#    uneven, and still exact;
# 4. **the communication cost** (`tp_comm_bytes_per_token`) of a ring all-reduce;
# 5. **a FIFO queue** (`fifo_latencies`), with which the last section replays
#    AlpaServe's argument (Li et al., OSDI 2023): splitting models across
#    devices lowers mean latency under bursty load even when each model fits.
#
# Two CPU processes talk over **gloo** (PyTorch's CPU collective backend; on
# GPUs it would be NCCL): the cell `run_ranks` starts them for you, and the
# last demo runs the whole SmolLM2 model at TP=2 with your pair and compares
# its logits with the single-process model.
#
#     python -m minisys labs start 13     # once: copies this notebook to work/13-tensor-parallel.ipynb
#     python -m minisys grade work/13-tensor-parallel.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).

# %%
import multiprocessing
import os
import random
import shutil
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minisys.attention import AttentionMetadata, get_backend
from minisys.model.config import ModelConfig
from minisys.model.layers import RotaryEmbedding
from minisys.model.llama import DecoderLayer

# %% [markdown]
# ## 1. Why a model outgrows a device
#
# At bf16 a weight takes 2 bytes: Llama-3-8B is ~16 GB, 70B ~141 GB, 405B
# ~810 GB. The KV cache adds, for **every token** held, a key and a value
# vector per layer and per KV head:
#
#     KV bytes per token = 2 (K and V) × layers × kv_heads × head_dim × bytes per element
#
# Write `kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype_bytes=2)`.
# The table below then says how many tokens of KV cache fit next to the
# weights on one 80 GB device (none, when the weights alone do not fit).

# %%
def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token occupies across all layers."""
    ### BEGIN SOLUTION
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes
    ### END SOLUTION


# %% tags=["benchmark"]
GB = 1e9
MODELS = {  # name: (parameters, layers, kv heads, head_dim) from each model's config.json
    "SmolLM2-135M": (0.135e9, 30, 3, 64),
    "Llama-3-8B": (8.03e9, 32, 8, 128),
    "Llama-3-70B": (70.6e9, 80, 8, 128),
    "Llama-3.1-405B": (405.9e9, 126, 8, 128),
}
print(f"{'model':16} {'weights GB':>10} {'KV KiB/token':>13} {'tokens of KV on 80 GB':>22} {'min devices':>11}")
for name, (params, layers, kv_heads, head_dim) in MODELS.items():
    weights, per_token = 2 * params, kv_bytes_per_token(layers, kv_heads, head_dim)
    room = 80 * GB - weights
    fits = f"{room / per_token:,.0f}" if room > 0 else "-"
    print(f"{name:16} {weights / GB:10.1f} {per_token / 1024:13.0f} {fits:>22} {int(weights // (80 * GB)) + 1:11d}")

# %% [markdown]
# ## 2. Two processes, one collective
#
# `run_ranks(fn, world_size)` starts `world_size` processes, joins them in a
# gloo process group over TCP on 127.0.0.1 (what `MASTER_ADDR`/`MASTER_PORT`
# say for `torchrun`), calls `fn(rank, world_size)` in each and returns the
# list of what each returned. The processes are **forked**: they inherit this
# notebook's variables and functions as they are, so `fn` may be a lambda or
# use your classes (a *spawned* process would start a fresh interpreter and
# could not import a function defined in a notebook). Each child uses one
# torch thread. Fork exists on Linux and macOS (this cell asks for it even
# where Python's default is spawn); Windows has none: use WSL.

# %%
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        result = {"value": fn(rank, world_size)}
    except BaseException:  # noqa: BLE001 - sent back to the parent, which raises it
        result = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, path)


def run_ranks(fn, world_size: int = 2, timeout: float = 120.0) -> list:
    """[fn(0, world_size), ..., fn(world_size - 1, world_size)], each in its own forked process."""
    context = multiprocessing.get_context("fork")
    port, folder = free_port(), tempfile.mkdtemp(prefix="tp-ranks-")
    paths = [os.path.join(folder, f"rank{r}.pt") for r in range(world_size)]
    procs = [context.Process(target=_rank_main, args=(fn, r, world_size, port, paths[r]), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise TimeoutError(f"a rank did not finish within {timeout} s")
    try:
        results = []
        for r, path in enumerate(paths):
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited (code {procs[r].exitcode}) without a result")
            result = torch.load(path, weights_only=False)
            if "error" in result:
                raise RuntimeError(f"rank {r} raised:\n{result['error']}")
            results.append(result["value"])
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# %% tags=["benchmark"]
def _hello(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)                     # sum over the group, result on every rank
    return t.item()


print(run_ranks(_hello))                   # [3.0, 3.0]: 1 + 2 on both ranks

# %% [markdown]
# ## 3. The column/row-parallel pair
#
# `nn.Linear` stores its weight as `[out_features, in_features]` and computes
# `y = x @ W.T + b`. Megatron splits a pair of linears so that the pair needs
# one all-reduce:
#
# - **column-parallel** (the first of the pair: q/k/v, gate/up): a rank keeps
#   a block of **output rows** `rows` of `W` (and of `b`) and computes its
#   slice `y[..., rows]` of the output — no communication;
# - **row-parallel** (the second: o_proj, down): a rank keeps the matching
#   block of **input columns** `cols` of `W`, receives only its slice of the
#   input `x[..., cols]`, and computes a *partial product* of the full output
#   size. The partial products of all ranks sum to `x @ W.T`:
#   `dist.all_reduce` (a sum, over `group`) makes that sum on every rank. The
#   bias is added **once, after** the all-reduce (added before it, it would be
#   counted `tp_size` times).
#
# Write both modules. Each takes the full `nn.Linear` and the `range` of rows
# (columns) the rank keeps, and stores its own copies of the slices as
# parameters (`self.weight`, `self.bias`, or `None` when the linear has no
# bias). An empty range, or one outside the layer, is a `ValueError`.

# %%
def _check_range(block: range, size: int, what: str) -> None:
    if len(block) == 0 or block.step != 1 or block.start < 0 or block.stop > size:
        raise ValueError(f"{what} {block} is not a non-empty block of 0..{size - 1}")


class ColumnParallelLinear(nn.Module):
    """A block of output rows of a linear: x [..., in] -> y [..., len(rows)]; no communication."""

    def __init__(self, full: nn.Linear, rows: range) -> None:
        super().__init__()
        _check_range(rows, full.out_features, "rows")
        ### BEGIN SOLUTION
        self.weight = nn.Parameter(full.weight.detach()[rows.start:rows.stop].clone(), requires_grad=False)
        self.bias = (None if full.bias is None else
                     nn.Parameter(full.bias.detach()[rows.start:rows.stop].clone(), requires_grad=False))
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        return F.linear(x, self.weight, self.bias)
        ### END SOLUTION


class RowParallelLinear(nn.Module):
    """A block of input columns of a linear: x [..., len(cols)] -> y [..., out], summed over ``group``."""

    def __init__(self, full: nn.Linear, cols: range, group=None) -> None:
        super().__init__()
        _check_range(cols, full.in_features, "cols")
        self.group = group
        ### BEGIN SOLUTION
        self.weight = nn.Parameter(full.weight.detach()[:, cols.start:cols.stop].clone(), requires_grad=False)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone(), requires_grad=False)
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        y = F.linear(x, self.weight)                 # this rank's partial product, full output size
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias
        ### END SOLUTION


# %% [markdown]
# The pair inside an MLP: gate and up are column-parallel over the same block
# of the intermediate size, `silu(gate) * up` is elementwise (each rank has
# whole elements: no communication), and down is row-parallel over that
# block — one all-reduce for the whole MLP. The cell checks it against the
# single-process MLP on two ranks.

# %% tags=["benchmark"]
torch.manual_seed(0)
mlp = nn.ModuleDict({"gate": nn.Linear(16, 32, bias=False), "up": nn.Linear(16, 32, bias=False),
                     "down": nn.Linear(32, 16)})
x_demo = torch.randn(5, 16)
want = mlp["down"](F.silu(mlp["gate"](x_demo)) * mlp["up"](x_demo))


def _mlp_rank(rank, world_size):
    block = range(rank * 16, (rank + 1) * 16)
    gate, up = ColumnParallelLinear(mlp["gate"], block), ColumnParallelLinear(mlp["up"], block)
    down = RowParallelLinear(mlp["down"], block)
    with torch.no_grad():
        return down(F.silu(gate(x_demo)) * up(x_demo))


got = run_ranks(_mlp_rank)
print("max |TP=2 - single| per rank:", [f"{(g - want).abs().max().item():.1e}" for g in got])

# %% [markdown]
# ## 4. Sharding a Llama layer by KV-head groups
#
# Attention heads are independent until `o_proj` mixes them, so attention
# splits by heads: q/k/v column-parallel, o_proj row-parallel. With grouped-query
# attention a query head needs **its** KV head, so the split is by whole KV
# heads: a rank keeps a block of KV heads and every query head that reads
# them. When the count does not divide, the first ranks keep one more.
#
# - `partition(n, tp_rank, tp_size)`: the block of `range(n)` rank `tp_rank`
#   keeps — contiguous blocks in rank order, sizes differing by at most one,
#   larger blocks first (9 over 2: `range(0, 5)`, `range(5, 9)`). A rank
#   that would get nothing (`tp_size > n`), or a rank outside
#   `0..tp_size-1`, is a `ValueError`.
# - `shard_checkpoint(state_dict, num_heads, num_kv_heads, head_dim, tp_rank,
#   tp_size)`: the tensors rank `tp_rank` keeps of one decoder layer, named
#   as in `DecoderLayer.state_dict()`:
#   `self_attn.{q,k,v,o}_proj.weight`, `mlp.{gate,up,down}_proj.weight`,
#   `input_layernorm.weight`, `post_attention_layernorm.weight`, and, for
#   models with attention bias (Qwen2), `self_attn.{q,k,v}_proj.bias`.
#   KV heads: `partition(num_kv_heads, ...)`; query heads: those of the
#   kept groups (`num_heads // num_kv_heads` per KV head); rows of q/k/v
#   and their biases, columns of o_proj; the MLP's intermediate size:
#   `partition(intermediate, ...)` (rows of gate/up, columns of down); the
#   norms whole (copies). A name not in this list is a `ValueError` naming it
#   (a checkpoint this function does not understand must not be half-split).
#   Return new tensors (`.clone()`), never views of the full checkpoint.
#
# A `DecoderLayer` built with the rank's head counts and intermediate size
# loads the shard with a strict `load_state_dict`; its attention and MLP then
# compute partial products whose sum over ranks is the full layer's.

# %%
def partition(n: int, tp_rank: int, tp_size: int) -> range:
    """The contiguous block of range(n) rank ``tp_rank`` of ``tp_size`` keeps (larger blocks first)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not in 0..{tp_size - 1}")
    if tp_size > n:
        raise ValueError(f"cannot split {n} items over {tp_size} ranks: some rank would get none")
    ### BEGIN SOLUTION
    base, extra = divmod(n, tp_size)
    start = tp_rank * base + min(tp_rank, extra)
    return range(start, start + base + (1 if tp_rank < extra else 0))
    ### END SOLUTION


def shard_checkpoint(state_dict: dict, num_heads: int, num_kv_heads: int, head_dim: int,
                     tp_rank: int, tp_size: int) -> dict:
    """One decoder layer's tensors for rank ``tp_rank``: whole KV-head groups, a block of the MLP."""
    ### BEGIN SOLUTION
    replicated = ("input_layernorm.weight", "post_attention_layernorm.weight")
    biased = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    kv = partition(num_kv_heads, tp_rank, tp_size)
    group = num_heads // num_kv_heads
    q_rows = range(kv.start * group * head_dim, kv.stop * group * head_dim)
    kv_rows = range(kv.start * head_dim, kv.stop * head_dim)
    inter = partition(state_dict["mlp.gate_proj.weight"].shape[0], tp_rank, tp_size)
    rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
            "mlp.gate_proj": inter, "mlp.up_proj": inter}
    cols = {"self_attn.o_proj": q_rows, "mlp.down_proj": inter}
    out = {}
    for name, tensor in state_dict.items():
        module, _, kind = name.rpartition(".")
        if name in replicated:
            out[name] = tensor.clone()
        elif module in rows and (kind == "weight" or (kind == "bias" and module in biased)):
            out[name] = tensor[rows[module].start:rows[module].stop].clone()
        elif module in cols and kind == "weight":
            out[name] = tensor[:, cols[module].start:cols[module].stop].clone()
        else:
            raise ValueError(f"shard_checkpoint does not know how to split {name!r}")
    return out
    ### END SOLUTION


# %% tags=["benchmark"]
cfg = ModelConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_layers=1, num_heads=9,
                  num_kv_heads=3, head_dim=16)
rope = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta)
torch.manual_seed(1)
layer = DecoderLayer(cfg, 0, rope).eval()
for p in layer.parameters():
    nn.init.normal_(p, std=0.2)
meta = AttentionMetadata(seqlens_q=[7], context_lens=[0])
xs, positions, backend = torch.randn(7, cfg.hidden_size), meta.positions(), get_backend("sdpa")
with torch.no_grad():
    attn_full = layer.self_attn(layer.input_layernorm(xs), positions, meta, backend, None)
    attn_sum = torch.zeros_like(attn_full)
    for r in range(2):
        shard = shard_checkpoint(layer.state_dict(), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, r, 2)
        print(f"rank {r}:", {k.split(".")[1]: tuple(v.shape) for k, v in shard.items() if "proj" in k})
        kv = partition(cfg.num_kv_heads, r, 2)          # a DecoderLayer of the rank's own size
        local_cfg = ModelConfig(vocab_size=64, hidden_size=96, num_layers=1, head_dim=16, num_kv_heads=len(kv),
                                num_heads=len(kv) * cfg.num_queries_per_kv,
                                intermediate_size=len(partition(cfg.intermediate_size, r, 2)))
        local = DecoderLayer(local_cfg, 0, rope)
        local.load_state_dict(shard)                    # strict: every name and shape must match
        attn_sum += local.self_attn(local.input_layernorm(xs), positions, meta, backend, None)
print("attention: max |sum of the ranks' partial products - full| =", f"{(attn_sum - attn_full).abs().max():.1e}")

# %% [markdown]
# ## 5. What the two all-reduces cost
#
# Each layer all-reduces one activation of `hidden` elements per token twice
# (after o_proj, after down). A **ring all-reduce** of a message of `M` bytes
# over `N` ranks sends, from each rank, `N - 1` chunks of `M / N` in its
# reduce-scatter and `N - 1` more in its all-gather: `2 (N - 1) / N × M`
# bytes per rank. Write `tp_comm_bytes_per_token(hidden, num_layers,
# tp_size, dtype_bytes=2)`: the bytes **one rank sends** per token for the
# whole model's forward (0 at `tp_size = 1`).
#
# Then compare with a link: NVLink 4 moves ~450 GB/s each way per H100, PCIe
# 4.0 x16 ~25 GB/s in practice, and gloo over loopback on a CPU far less
# (measured below: latency dominates small messages).

# %%
def tp_comm_bytes_per_token(hidden: int, num_layers: int, tp_size: int, dtype_bytes: int = 2) -> float:
    """Bytes one rank sends per token: 2 ring all-reduces of ``hidden`` elements per layer."""
    ### BEGIN SOLUTION
    message = hidden * dtype_bytes
    return num_layers * 2 * (2 * (tp_size - 1) / tp_size) * message
    ### END SOLUTION


# %% tags=["benchmark"]
for name, hidden, layers, tp in [("SmolLM2-135M", 576, 30, 2), ("Llama-3-70B", 8192, 80, 8),
                                 ("Llama-3.1-405B", 16384, 126, 8)]:
    b = tp_comm_bytes_per_token(hidden, layers, tp)
    print(f"{name:16} TP={tp}: {b / 2**20:6.2f} MiB per token per rank; 1,000 tokens in a prefill step: "
          f"{1000 * b / 450e9 * 1e3:6.2f} ms on NVLink, {1000 * b / 25e9 * 1e3:7.2f} ms on PCIe")


def _allreduce_rate(rank, world_size, sizes=(2**12, 2**16, 2**20), reps=5):
    import time
    rates = {}
    for n in sizes:
        t = torch.ones(n)
        dist.all_reduce(t)                           # warm up the connection
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        dt = (time.perf_counter() - t0) / reps
        rates[n * 4] = (dt, 2 * (world_size - 1) / world_size * n * 4 / dt)
    return rates


for size, (dt, rate) in run_ranks(_allreduce_rate)[0].items():
    print(f"gloo loopback all-reduce of {size / 1024:7.0f} KiB: {dt * 1e3:6.2f} ms, {rate / 1e6:7.1f} MB/s per rank")

# %% [markdown]
# ## 6. The whole model at TP=2
#
# The cell below splits every layer of SmolLM2-135M across two ranks with
# your pair: q/k/v and gate/up column-parallel over the rank's blocks
# (`partition` of the KV heads and of the intermediate size), o_proj and down
# row-parallel. Embedding, norms and LM head stay whole on both ranks (the
# engine's `minisys/parallel/` also splits the vocabulary). Each rank then
# runs the unchanged `LlamaModel.forward`: the attention of a rank sees only
# its own heads, and the two all-reduces per layer make the residual stream
# identical on both ranks. Its logits must match the single-process model's
# (fp32; the sums run in a different order, so not bit for bit).

# %% tags=["benchmark"]
from minisys.model import load  # noqa: E402 - the demo's model

model, tokenizer = load(device="cpu", dtype=torch.float32, quiet=True, fuse=False)   # q/k/v, gate/up unfused
mc = model.config
prompt_ids = tokenizer.encode("Tensor parallelism splits every layer across devices, so")
with torch.no_grad():
    single = model.forward_sequence(prompt_ids)


def split_model(rank, world_size):
    """Replace this (forked) process's copy of every layer's linears by rank ``rank``'s shards."""
    group = mc.num_heads // mc.num_kv_heads
    kv = partition(mc.num_kv_heads, rank, world_size)
    heads = range(kv.start * group, kv.stop * group)
    q_rows = range(heads.start * mc.head_dim, heads.stop * mc.head_dim)
    kv_rows = range(kv.start * mc.head_dim, kv.stop * mc.head_dim)
    inter = partition(mc.intermediate_size, rank, world_size)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj = ColumnParallelLinear(attn.q_proj, q_rows), ColumnParallelLinear(attn.k_proj, kv_rows)
        attn.v_proj, attn.o_proj = ColumnParallelLinear(attn.v_proj, kv_rows), RowParallelLinear(attn.o_proj, q_rows)
        attn.num_heads, attn.num_kv_heads = len(heads), len(kv)
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, inter)
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, inter)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, inter)
    return len(heads), len(kv)


def _tp_logits(rank, world_size):
    heads = split_model(rank, world_size)
    with torch.no_grad():
        return heads, model.forward_sequence(prompt_ids)


results = run_ranks(_tp_logits)
for rank, ((q_heads, kv_heads), logits) in enumerate(results):
    print(f"rank {rank}: {q_heads} query heads, {kv_heads} KV heads; "
          f"max |logits - single| = {(logits - single).abs().max().item():.2e}; "
          f"same next token: {logits[-1].argmax().item() == single[-1].argmax().item()}")

# %% [markdown]
# ## 7. AlpaServe: model parallelism for bursty load
#
# AlpaServe's observation: even when every model fits one device, splitting
# models across devices can lower latency, because a burst for one model can
# then use every device instead of queueing on its own while the others idle
# (*statistical multiplexing*). Two models, A and B, two devices, each
# holding the same bytes in every placement:
#
# - **dedicated**: A on device 0, B on device 1; a request takes `L` seconds
#   on its model's device;
# - **tp**: both models split over both devices by tensor parallelism; a
#   request of either model takes `L (1 + overhead) / 2` — half the work per
#   device, plus the communication — and occupies both devices;
# - **pipeline** (AlpaServe's own setting, inter-operator parallelism): each
#   model cut into two stages, one per device; a new request can enter every
#   `L (1 + overhead) / 2` seconds, but each still takes `L (1 + overhead)`
#   from start to finish (it passes through both stages).
#
# All three are FIFO queues. Write `fifo_latencies(arrivals, service_s)`:
# one server, first come first served, each request occupying it for
# `service_s`; requests are served in order of arrival time (ties in the order
# of the list; the list need not be sorted), and the latencies (finish −
# arrival) are returned in the order of `arrivals`. An empty list gives an
# empty list; a negative service time is a `ValueError`.

# %%
def fifo_latencies(arrivals: list[float], service_s: float) -> list[float]:
    """Latency of each request on one FIFO server with a fixed service time, in input order."""
    if service_s < 0:
        raise ValueError(f"service_s must be >= 0, got {service_s}")
    ### BEGIN SOLUTION
    order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
    out, free_at = [0.0] * len(arrivals), float("-inf")
    for i in order:
        start = max(arrivals[i], free_at)
        free_at = start + service_s
        out[i] = free_at - arrivals[i]
    return out
    ### END SOLUTION


# %% [markdown]
# Arrivals follow a **gamma process** (AlpaServe's workload model): gaps with
# mean `1 / rate` and coefficient of variation `cv` — `cv = 1` is Poisson,
# larger is burstier. Each model gets its own stream; the `tp` and
# `pipeline` placements serve the two streams merged, on one queue.
# `gamma_arrivals` and `placement_latencies` come from
# `minisys/bench/multiplexing.py`; the queue they run is yours.

# %%
from minisys.bench.multiplexing import gamma_arrivals, placement_latencies  # noqa: E402


def mean_latency(placement: str, a: list[float], b: list[float], latency_s: float, overhead: float) -> float:
    """Mean latency of A's and B's requests under ``dedicated``, ``tp`` or ``pipeline``, on your queue."""
    lat = placement_latencies(placement, a, b, latency_s, overhead, fifo=fifo_latencies)
    return sum(lat) / len(lat)


# %% tags=["benchmark"]
quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
n = 2_000 if quick else 20_000
columns = [("dedicated", 0.0), ("tp", 0.2), ("pipeline", 0.0), ("pipeline", 0.2), ("pipeline", 0.5)]
print(f"L = 1 s, each model at 0.2 req/s (20% of a device), {n} requests per model; mean latency in s")
print(f"{'cv':>4} " + " ".join(f"{p + ' +' + str(int(o * 100)) + '%':>14}" for p, o in columns))
for cv in (1.0, 2.0, 4.0, 8.0):
    rng = random.Random(0)
    a, b = gamma_arrivals(n, 0.2, cv, rng), gamma_arrivals(n, 0.2, cv, rng)
    print(f"{cv:4.0f} " + " ".join(f"{mean_latency(p, a, b, 1.0, o):14.2f}" for p, o in columns))

# %% [markdown]
# Read the table. `tp` halves every request's time, so with a small
# overhead it wins at any burstiness. `pipeline` does not make one request
# faster (with overhead it makes it slower), and at Poisson load (`cv = 1`)
# it loses to the dedicated placement; as the load gets burstier it wins,
# and by more: a burst of A can use both devices. That is AlpaServe's
# argument in miniature (its Figures 1–3). Try a load where A is busy and B
# almost idle (`gamma_arrivals(n, 0.9, ...)` and `gamma_arrivals(n, 0.05, ...)`):
# dedicated device 0 nearly saturates while device 1 idles.
