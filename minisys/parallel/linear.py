"""Parallel linear and embedding layers: Megatron's column/row split, as small modules.

Each holds its rank's slice of the full weight under the usual names
(``weight``, ``bias``), so a sharded checkpoint loads with ``load_state_dict``.
With ``tp_size == 1`` each is exactly the layer it replaces (`nn.Linear`,
`nn.Embedding`): same math, no process group needed.

    ColumnParallelLinear   y_r = x @ W[rows_r].T + b[rows_r]     no communication
    MergedColumnParallelLinear  several column-parallel layers on the same input as ONE matmul
                           (fused q/k/v, fused gate/up): rank r's weight is [W_0[rows_r]; W_1[rows_r]; ...]
    RowParallelLinear      y = sum_r x_r @ W[:, cols_r].T  (+ b)  ONE all-reduce, bias after it
    VocabParallelEmbedding e = sum_r (rows_r own the id ? W_r[id - start_r] : 0)   one all-reduce
    ParallelLMHead         logits = concat_r (h @ W[rows_r].T)   one all-gather

A column-parallel layer feeding a row-parallel one needs no communication in
between (each rank's slice of the activation is exactly the input columns its
row-parallel weight holds), so an attention block or an MLP costs one
all-reduce each: two per layer.

The LM head is vocab-parallel, not replicated: with tied embeddings (SmolLM2)
it shares the embedding's rows, so each rank keeps 1/N of the largest matrix
of a small model; the price is one all-gather of (B, V/N) logits per step,
small next to the per-layer all-reduces of (T, C).

``ColumnParallelLinear.from_full(full, rows)`` / ``RowParallelLinear.from_full(full, cols, group)``
build the same layers by cutting a block out of a whole ``nn.Linear`` (lab 13's
form: the block is given, not derived from a rank); the engine's loader
instead builds them empty and loads `shard.shard_state_dict`'s slice.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import all_gather_cat, all_reduce
from .shard import check_block, partition, partition_sizes


# batch-1 fp32 matrix-vector products through numpy's BLAS (see `linear`): opt-in, MINISYS_BLAS_GEMV=1.
# Off by default: with more than one thread, OpenBLAS's spinning pool and torch's OpenMP pool take turns
# layer by layer and fight for the cores (a test of seeded sampling ran 8x slower on 2 cores with it on).
BLAS_GEMV = os.environ.get("MINISYS_BLAS_GEMV", "0") in ("1", "true", "True")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (T, in), weight (out, in) -> (T, out). Every layer here calls it.

    One case takes another kernel: a single row (a batch-1 decode step) in fp32 on a CPU against an
    input-major weight (`minisys.model.llama.LlamaModel.store_input_major`). That is a matrix-vector
    product bound by how fast the weight streams from memory, and numpy's BLAS (OpenBLAS) streams it
    about 1.2-1.5x faster than torch's (MKL, on the AMD CPU this was measured on: ``python -m
    minisys bench latency``, lesson 04). Both tensors are shared with numpy, not copied; the result
    equals ``F.linear``'s up to float rounding. Anything else -- more rows, bf16, CUDA, autograd -- is
    ``F.linear``. Its threads: `minisys.threads.configure_threads` sets them with torch's.
    """
    if (BLAS_GEMV and x.dim() == 2 and x.shape[0] == 1 and weight.stride(0) == 1 and weight.shape[0] > 1
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        y = _gemv(x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def blas_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (1, in) @ weight.T on numpy's BLAS; weight (out, in) input-major: its transpose is contiguous."""
    return torch.from_numpy(x.detach().numpy() @ weight.detach().t().numpy())       # (1, out)


_gemv = blas_gemv      # what `linear` calls (a profiler wraps it: torch.profiler does not see numpy)


def _sizes(n: int, tp_size: int, given: list[int] | None, what: str) -> list[int]:
    sizes = list(given) if given is not None else partition_sizes(n, tp_size)
    if len(sizes) != tp_size or sum(sizes) != n or min(sizes) < 0:
        raise ValueError(f"{what}: {sizes} is not a split of {n} features over {tp_size} ranks")
    return sizes


class ColumnParallelLinear(nn.Linear):
    """Rows [start, end) of an (out_features, in_features) weight (and its bias): y_r = x @ W_r.T + b_r.

    ``out_sizes``: every rank's number of rows (default: as even as possible); uneven splits are how
    whole attention-head groups are kept on one rank. No communication: the output stays split.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1,
                 out_sizes: list[int] | None = None) -> None:
        sizes = _sizes(out_features, tp_size, out_sizes, "ColumnParallelLinear out_sizes")
        super().__init__(in_features, sizes[tp_rank], bias=bias)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.full_out_features = out_features
        self.out_start = sum(sizes[:tp_rank])          # this rank's first row of the full weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    @classmethod
    def from_full(cls, full: nn.Linear, rows: range) -> "ColumnParallelLinear":
        """Rows ``rows`` of ``full`` (copies): x [..., in] -> [..., len(rows)]. Knows no group (tp 0 of 1)."""
        check_block(rows, full.out_features, "rows")
        layer = cls(full.in_features, len(rows), full.bias is not None)
        layer.full_out_features, layer.out_start = full.out_features, rows.start
        with torch.no_grad():
            layer.weight.copy_(full.weight[rows.start:rows.stop])                   # (len(rows), in)
            if full.bias is not None:
                layer.bias.copy_(full.bias[rows.start:rows.stop])
        return layer.requires_grad_(False)


class MergedColumnParallelLinear(nn.Module):
    """Column-parallel layers that read the same input, fused into one: y_r = x @ cat(W_i[rows_r]).T + b.

    vLLM's name (its ``QKVParallelLinear`` is this with q/k/v). Built from the layers it replaces
    (`fuse`): rank r stacks ITS rows of each part, so however unevenly the parts were split across
    ranks (q/k/v go by whole KV-head groups, `minisys.parallel.shard`), the fused layer holds exactly
    what the separate ones held, and ``split`` cuts its output back into theirs. One matmul streams
    the same weights as the separate ones but reads the input once and launches one kernel instead
    of ``len(parts)``: at batch 1 a decode step is a chain of such small matrix-vector products.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, output_sizes: list[int],
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if weight.shape[0] != sum(output_sizes):
            raise ValueError(f"a fused weight of {weight.shape[0]} rows cannot hold parts of {output_sizes}")
        self.weight = nn.Parameter(weight, requires_grad=False)                     # (sum(sizes), in)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.output_sizes = list(output_sizes)          # this rank's rows of each part, in order
        self.tp_rank, self.tp_size = tp_rank, tp_size

    @classmethod
    def fuse(cls, parts: list[nn.Linear]) -> "MergedColumnParallelLinear":
        """One layer computing every part's output (copies their weights; the parts can be dropped)."""
        if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
            raise ValueError("fused layers must share their input size and all have (or all lack) a bias")
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts])                            # (sum(out_i), in)
            bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return cls(weight, bias, [p.out_features for p in parts], getattr(parts[0], "tp_rank", 0),
                   getattr(parts[0], "tp_size", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)       # (T, sum(sizes)): parts side by side

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(T, sum(sizes)) -> one (T, size_i) view per part."""
        return y.split(self.output_sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, output_sizes={self.output_sizes}, bias={self.bias is not None}"


class RowParallelLinear(nn.Linear):
    """Columns [start, end) of an (out_features, in_features) weight: y = all_reduce(x_r @ W_r.T) + b.

    ``x_r`` is this rank's slice of the input features (a column-parallel layer's output). The bias is
    whole on every rank and added once, after the sum. ``in_sizes`` as ``out_sizes`` above.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int = 0, tp_size: int = 1,
                 group=None, in_sizes: list[int] | None = None) -> None:
        sizes = _sizes(in_features, tp_size, in_sizes, "RowParallelLinear in_sizes")
        super().__init__(sizes[tp_rank], out_features, bias=bias)
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.full_in_features = in_features
        self.in_start = sum(sizes[:tp_rank])

    @classmethod
    def from_full(cls, full: nn.Linear, cols: range, group=None) -> "RowParallelLinear":
        """Columns ``cols`` of ``full`` (copies), summed over ``group``: x [..., len(cols)] -> [..., out].

        Every rank of ``group`` (default: the default group; none initialized: no sum) holds one block.
        """
        check_block(cols, full.in_features, "cols")
        layer = cls(len(cols), full.out_features, full.bias is not None)
        if dist.is_initialized():
            layer.tp_rank, layer.tp_size = dist.get_rank(group), dist.get_world_size(group)
        layer.group, layer.full_in_features, layer.in_start = group, full.in_features, cols.start
        with torch.no_grad():
            layer.weight.copy_(full.weight[:, cols.start:cols.stop])                # (out, len(cols))
            if full.bias is not None:
                layer.bias.copy_(full.bias)            # whole: added once, after the sum
        return layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)
        y = linear(x, self.weight)                     # (T, out): this rank's partial sum
        all_reduce(y, self.group)                      # the one communication of the layer
        return y if self.bias is None else y + self.bias


def embedding_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` -> (*ids.shape, C), for a row-major table or an input-major one.

    An input-major (V, C) table (a view of contiguous (C, V) storage: the tied LM head stored for
    fast matrix-vector products, `LlamaModel.store_input_major`) is gathered as columns of that
    storage: ``F.embedding`` would read it one strided element at a time (20x slower on a prompt).
    """
    if weight.stride(0) != 1 or weight.stride(1) == 1:
        return F.embedding(ids, weight)
    flat = weight.t().index_select(1, ids.reshape(-1))                                # (C, T)
    return flat.t().contiguous().view(*ids.shape, weight.shape[1])                    # (T, C)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the (vocab, hidden) table. A token's row is found on exactly one rank; the
    others contribute zeros, and one all-reduce adds them up (exact: x + 0 = x)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1,
                 group=None) -> None:
        self.vocab_start, self.vocab_end = partition(num_embeddings, tp_size, tp_rank)
        super().__init__(self.vocab_end - self.vocab_start, embedding_dim)
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.full_num_embeddings = num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return embedding_rows(self.weight, ids)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(mine, ids - self.vocab_start, torch.zeros_like(ids))
        out = embedding_rows(self.weight, local) * mine.unsqueeze(-1).to(self.weight.dtype)   # (T, C)
        return all_reduce(out, self.group)


class ParallelLMHead(nn.Module):
    """Vocabulary rows [start, end) of the LM head; logits are gathered so every rank holds all (T, V).

    With tied embeddings its ``weight`` IS the `VocabParallelEmbedding`'s (same rows on the same rank).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, group=None) -> None:
        super().__init__()
        self.vocab_start, self.vocab_end = partition(num_embeddings, tp_size, tp_rank)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim))
        self.bias = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start)) if bias else None
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.sizes = partition_sizes(num_embeddings, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.weight, self.bias)     # (T, V/N): this rank's slice of the vocabulary
        if self.tp_size == 1:
            return logits
        return all_gather_cat(logits, self.sizes, self.group)    # (T, V)
