"""How a model is cut across ``tp_size`` ranks, and the checkpoint slice each rank loads.

Megatron's split of one Llama layer (Shoeybi et al., 2019):

    q/k/v, gate/up   column-parallel: rank r holds a block of the weight's ROWS (output features)
    o, down          row-parallel:    rank r holds the matching block of COLUMNS (input features)
    embed, lm_head   vocab-parallel:  rank r holds a block of the vocabulary's rows

Heads are split by whole KV-head groups: rank r owns the KV heads
``partition(num_kv_heads, tp_size, r)`` and the query heads that share them, so
grouped-query attention never needs a KV head from another rank. When the
count does not divide, the first ranks get one more (SmolLM2-135M: 3 KV heads
of 3 queries each; at TP=2 rank 0 owns KV heads {0, 1} with query heads 0-5
and rank 1 owns KV head {2} with query heads 6-8). The split stays exact
because the row-parallel ``o_proj`` SUMS the ranks' partial products, and a
sum does not care how unequal its terms were. ``tp_size > num_kv_heads`` is
refused (`check_tensor_parallel`): minisys does not replicate KV heads (vLLM
does; it costs a copy of those heads' KV cache on every rank sharing them).

The MLP's intermediate size and the vocabulary are split the same way
(evenly when they divide, else the first ranks one more).

Two forms of the same rule: `shard_state_dict` cuts a whole checkpoint (the
engine's loader), `shard_layer` one decoder layer's tensors given only its
head counts (lab 13's exercise, and the shortest page to read the split on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:       # parallel/ sits below model/ (llama.py builds its layers from linear.py)
    from ..model.config import ModelConfig


def partition(n: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s share of ``n`` items: sizes differ by at most one, larger first."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is not in [0, {tp_size})")
    if tp_size > n:
        raise ValueError(f"cannot split {n} items over {tp_size} ranks: some rank would get none")
    base, extra = divmod(n, tp_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def check_block(block: range, n: int, what: str) -> None:
    """ValueError unless ``block`` is a non-empty contiguous block of ``range(n)`` (a rank's share)."""
    if len(block) == 0 or block.step != 1 or block.start < 0 or block.stop > n:
        raise ValueError(f"{what} {block} is not a non-empty block of 0..{n - 1}")


def partition_sizes(n: int, tp_size: int) -> list[int]:
    """Every rank's share of ``n`` items (sums to n)."""
    return [end - start for start, end in (partition(n, tp_size, r) for r in range(tp_size))]


@dataclass(frozen=True)
class HeadShard:
    """The heads rank ``rank`` owns: query heads [q_start, q_end), KV heads [kv_start, kv_end)."""

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int

    @property
    def num_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start


def check_tensor_parallel(config: ModelConfig, tp_size: int) -> None:
    """ValueError when ``config`` cannot be split ``tp_size`` ways (every rank needs >= 1 KV head)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
    if tp_size > config.num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp_size} exceeds the model's {config.num_kv_heads} KV heads: heads are split "
            f"by whole KV-head groups, so every rank needs at least one KV head (minisys does not replicate "
            f"KV heads); use tensor_parallel_size <= {config.num_kv_heads}")


def head_shard(config: ModelConfig, tp_size: int, rank: int) -> HeadShard:
    check_tensor_parallel(config, tp_size)
    kv_start, kv_end = partition(config.num_kv_heads, tp_size, rank)
    g = config.num_queries_per_kv
    return HeadShard(kv_start * g, kv_end * g, kv_start, kv_end)


def head_feature_sizes(config: ModelConfig, tp_size: int, kv: bool) -> list[int]:
    """Per rank, its q (``kv=False``) or k/v (``kv=True``) output features: heads x head_dim."""
    shards = [head_shard(config, tp_size, r) for r in range(tp_size)]
    return [(s.num_kv_heads if kv else s.num_heads) * config.head_dim for s in shards]


def shard_spec(name: str, config: ModelConfig, tp_rank: int, tp_size: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of checkpoint tensor ``name`` that rank ``tp_rank`` holds; None: replicated (norms)."""
    D = config.head_dim
    heads = head_shard(config, tp_size, tp_rank)
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return 0, heads.q_start * D, heads.q_end * D
    if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        return 0, heads.kv_start * D, heads.kv_end * D
    if name.endswith("o_proj.weight"):
        return 1, heads.q_start * D, heads.q_end * D
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return 0, *partition(config.intermediate_size, tp_size, tp_rank)
    if name.endswith("down_proj.weight"):
        return 1, *partition(config.intermediate_size, tp_size, tp_rank)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, *partition(config.vocab_size, tp_size, tp_rank)
    if name.endswith(("o_proj.bias", "down_proj.bias")) or "norm" in name:
        return None                 # a row-parallel bias is added once, after the all-reduce
    raise ValueError(f"no tensor-parallel rule for checkpoint tensor {name!r}")


def shard_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, tp_rank: int,
                     tp_size: int) -> dict[str, torch.Tensor]:
    """The slice of a full checkpoint that rank ``tp_rank`` of ``tp_size`` loads (contiguous copies).

    Q/K/V/gate/up: rows; o/down: columns; embedding and LM head: vocabulary rows; norms: whole.
    """
    out = {}
    for name, t in state_dict.items():
        spec = shard_spec(name, config, tp_rank, tp_size)
        out[name] = t if spec is None else t.narrow(spec[0], spec[1], spec[2] - spec[1]).contiguous()
    return out


def shard_layer(state_dict: dict[str, torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int,
                tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (``DecoderLayer.state_dict()`` names) for rank ``tp_rank``: copies.

    The rule of `shard_spec`, with the sizes read from the layer (hidden from q_proj's columns, the
    intermediate size from gate_proj's rows). A tensor it has no rule for is a ValueError naming it.
    """
    from ..model.config import ModelConfig      # at call time: parallel/ does not load model/
    config = ModelConfig(vocab_size=1, hidden_size=state_dict["self_attn.q_proj.weight"].shape[1],
                         intermediate_size=state_dict["mlp.gate_proj.weight"].shape[0], num_layers=1,
                         num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    return {name: t.clone() for name, t in shard_state_dict(state_dict, config, tp_rank, tp_size).items()}
