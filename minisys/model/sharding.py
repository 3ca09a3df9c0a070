"""How a Llama layer splits over tensor-parallel ranks, stated on one layer (lesson 13).

The rules, as small functions and modules that take explicit blocks:

- :func:`partition`: the contiguous block of ``range(n)`` a rank keeps; sizes
  differ by at most one, larger blocks first (3 KV heads over 2 ranks:
  ``{0, 1}`` and ``{2}``).
- :class:`ColumnParallelBlock` / :class:`RowParallelBlock`: Megatron's pair
  cut from a full ``nn.Linear``: a block of output rows (no communication),
  a block of input columns (local matmul, one all-reduce over ``group``, the
  bias added once after it).
- :func:`shard_layer`: one decoder layer's tensors for a rank -- q/k/v rows
  and o_proj columns by whole KV-head groups, gate/up rows and down columns
  by a block of the intermediate size, norms whole.
- :func:`allreduce_bytes`, :func:`tp_comm_bytes_per_token`: what the two
  all-reduces per layer send (a ring all-reduce, per rank).

Invariant: for every rank count up to the number of KV heads, the ranks'
blocks cover each head / row / column exactly once, so the sum over ranks of
the row-parallel partial products is the full layer's output (tested in
``tests/labs/test_lab13.py`` against ``DecoderLayer`` on one process and on
two gloo processes). Lab 13's exercises are these functions; the engine's
``minisys/parallel/`` applies the same split to whole checkpoints.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

REPLICATED = ("input_layernorm.weight", "post_attention_layernorm.weight")
ROW_SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
COL_SPLIT = ("self_attn.o_proj", "mlp.down_proj")


def partition(n: int, tp_rank: int, tp_size: int) -> range:
    """The block of ``range(n)`` rank ``tp_rank`` of ``tp_size`` keeps: contiguous, larger blocks first."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is not in 0..{tp_size - 1}")
    if tp_size > n:
        raise ValueError(f"cannot split {n} items over {tp_size} ranks: some rank would get none")
    base, extra = divmod(n, tp_size)
    start = tp_rank * base + min(tp_rank, extra)
    return range(start, start + base + (tp_rank < extra))


def _block(block: range, size: int, what: str) -> slice:
    if len(block) == 0 or block.step != 1 or block.start < 0 or block.stop > size:
        raise ValueError(f"{what} {block} is not a non-empty block of 0..{size - 1}")
    return slice(block.start, block.stop)


class ColumnParallelBlock(nn.Module):
    """Output rows ``rows`` of ``full``: x [..., in] -> [..., len(rows)]. No communication."""

    def __init__(self, full: nn.Linear, rows: range) -> None:
        super().__init__()
        s = _block(rows, full.out_features, "rows")
        self.weight = nn.Parameter(full.weight.detach()[s].clone(), requires_grad=False)     # (len(rows), in)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach()[s].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelBlock(nn.Module):
    """Input columns ``cols`` of ``full``: x [..., len(cols)] -> [..., out], summed over ``group``."""

    def __init__(self, full: nn.Linear, cols: range, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        s = _block(cols, full.in_features, "cols")
        self.weight = nn.Parameter(full.weight.detach()[:, s].clone(), requires_grad=False)  # (out, len(cols))
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)                     # this rank's partial product
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y if self.bias is None else y + self.bias  # once, after the sum


def layer_blocks(num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int,
                 tp_rank: int, tp_size: int) -> dict[str, range]:
    """The rows (q/k/v, gate/up) or columns (o_proj, down) of each linear that rank ``tp_rank`` keeps."""
    kv = partition(num_kv_heads, tp_rank, tp_size)
    group = num_heads // num_kv_heads
    q = range(kv.start * group * head_dim, kv.stop * group * head_dim)
    k = range(kv.start * head_dim, kv.stop * head_dim)
    inter = partition(intermediate, tp_rank, tp_size)
    return {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": k, "self_attn.o_proj": q,
            "mlp.gate_proj": inter, "mlp.up_proj": inter, "mlp.down_proj": inter}


def shard_layer(state_dict: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int,
                tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (``DecoderLayer.state_dict()`` names) for rank ``tp_rank``; copies.

    A name this split does not know is a ValueError: a checkpoint half-split would load wrong."""
    blocks = layer_blocks(num_heads, num_kv_heads, head_dim, state_dict["mlp.gate_proj.weight"].shape[0],
                          tp_rank, tp_size)
    out = {}
    for name, tensor in state_dict.items():
        module, _, kind = name.rpartition(".")
        if name in REPLICATED:
            out[name] = tensor.clone()
        elif module in ROW_SPLIT and (kind == "weight" or (kind == "bias" and module.startswith("self_attn"))):
            out[name] = tensor[blocks[module].start:blocks[module].stop].clone()
        elif module in COL_SPLIT and kind == "weight":
            out[name] = tensor[:, blocks[module].start:blocks[module].stop].clone()
        else:
            raise ValueError(f"shard_layer does not know how to split {name!r}")
    return out


def allreduce_bytes(message_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``message_bytes`` over ``n`` ranks: 2 (n-1)/n x M."""
    return 2 * (n - 1) / n * message_bytes


def tp_comm_bytes_per_token(hidden: int, num_layers: int, tp_size: int, dtype_bytes: int = 2) -> float:
    """Bytes one rank sends per token in a forward pass: two all-reduces of ``hidden`` elements per layer."""
    return num_layers * 2 * allreduce_bytes(hidden * dtype_bytes, tp_size)
