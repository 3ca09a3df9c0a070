"""The attention interface every backend implements.

The model packs all sequences of a step into one flat batch (no padding):
the new tokens of sequence i are rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``
of the query tensor, and its keys/values (the cached context followed by the
new tokens) are rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of K and V.

Causality with a cache: sequence i has ``k_len`` keys and ``q_len`` new
queries; query j sits at position ``k_len - q_len + j`` and attends to keys
``0 .. k_len - q_len + j`` (the mask is aligned to the bottom-right corner).
A prefill has ``q_len == k_len``; a decode step has ``q_len == 1``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from .views import PagedKV


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys live in the flat batch.

    Invariants: ``len(seqlens_q) == len(seqlens_k) == len(context_lens)``;
    ``seqlens_k[i] == context_lens[i] + seqlens_q[i]``; cu_* are the running
    sums of the seqlens starting at 0.
    """

    seqlens_q: list[int]            # new tokens per sequence this step
    context_lens: list[int]         # tokens already in the KV cache per sequence
    cache_slots: list[int] = field(default_factory=list)  # row of a contiguous cache per sequence
    # Paged KV cache (lesson 03; None otherwise), see minisys/kv/paged.py:
    slot_mapping: torch.Tensor | None = None   # (T,) int64 pool slot (block * block_size + offset) per new token
    block_tables: torch.Tensor | None = None   # (B, max_blocks) int64 block ids per sequence, padded with 0
    # Decode with lengths on the device (CUDA graphs, `minisys.engine.cuda_graph`): every sequence has one
    # new query and seq_lens_tensor[i] == seqlens_k[i] keys; kernels read it instead of the lists, so the
    # step's shapes do not depend on the lengths (`minisys.attention.auto`).
    seq_lens_tensor: torch.Tensor | None = None   # (B,) int64 on the device, or None
    cu_seqlens_q: torch.Tensor = field(init=False)  # (B+1,) int64
    cu_seqlens_k: torch.Tensor = field(init=False)  # (B+1,) int64
    # what every layer of the step derives alike, derived once (`memo`); not part of the metadata's value
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.seqlens_q) != len(self.context_lens):
            raise ValueError("seqlens_q and context_lens must have one entry per sequence")
        if any(q <= 0 for q in self.seqlens_q) or any(c < 0 for c in self.context_lens):
            raise ValueError("every sequence needs >= 1 new token and a context length >= 0")
        if self.seq_lens_tensor is not None and not self.is_decode_only:
            raise ValueError("seq_lens_tensor describes decode steps only (one new token per sequence)")
        if not self.cache_slots:
            self.cache_slots = list(range(len(self.seqlens_q)))
        self.cu_seqlens_q = _cumsum(self.seqlens_q)
        self.cu_seqlens_k = _cumsum(self.seqlens_k)

    def memo(self, key, build: Callable[[], object]):
        """``build()`` the first time ``key`` is asked for, the same object after: a step's 30 layers
        read the same metadata, so what they derive from it (Python lists, block-table slices, masks)
        is built once per step, not once per layer. The metadata must not change after the first call."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def __getstate__(self) -> dict:            # pickled (tensor-parallel broadcast) without the memo
        return {k: v for k, v in self.__dict__.items() if k != "_memo"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _memo={})

    @property
    def seqlens_k(self) -> list[int]:
        return self.memo("seqlens_k", lambda: [c + q for c, q in zip(self.context_lens, self.seqlens_q)])

    @property
    def cu_q(self) -> list[int]:
        """``cu_seqlens_q`` as a Python list (built once per step)."""
        return self.memo("cu_q", self.cu_seqlens_q.tolist)

    @property
    def cu_k(self) -> list[int]:
        """``cu_seqlens_k`` as a Python list (built once per step)."""
        return self.memo("cu_k", self.cu_seqlens_k.tolist)

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens_q)

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens_q)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.seqlens_q)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T,) position of every new token: context_len, context_len+1, ..."""
        parts = [torch.arange(c, c + q) for c, q in zip(self.context_lens, self.seqlens_q)]
        return torch.cat(parts).to(device)

    def last_token_indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B,) row of each sequence's last new token in the flat batch."""
        return (self.cu_seqlens_q[1:] - 1).to(device)


def _cumsum(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    if lengths:
        out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return out


class AttentionBackend(ABC):
    """softmax(Q K^T / sqrt(D) + causal mask) V over a packed varlen batch.

    Shapes: q (T, Hq, D); k, v (S, Hkv, D) with Hq a multiple of Hkv
    (grouped-query attention: query head h reads KV head h // (Hq // Hkv));
    returns (T, Hq, D) in q's dtype.

    Two named entry points, one per kind of KV view (`minisys.attention.views`):

    * ``forward_packed(q, k, v, meta)``: K/V packed (S, Hkv, D). It checks the
      shapes, then runs ``forward``, the one method a backend must write.
    * ``forward_paged(q, k_pool, v_pool, meta)``: K/V in block pools
      (num_blocks, block_size, Hkv, D) read through ``meta.block_tables``.
      By default the naive gather path: copy the context out of the pools
      (`PagedKV.gather`), then ``forward_packed``. `PagedAttention` overrides
      it to read the blocks directly.
    """

    name: str = "abstract"

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """The backend's kernel on packed K/V; call it through `forward_packed`, which checks shapes."""

    def forward_packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
        """q (T, Hq, D); k, v (S, Hkv, D) packed as ``meta.cu_seqlens_k`` -> (T, Hq, D)."""
        _check_shapes(q, k, v, meta)
        return self.forward(q, k, v, meta)

    def forward_paged(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        """q (T, Hq, D); k_pool, v_pool (num_blocks, block_size, Hkv, D) -> (T, Hq, D).

        The gather path: each sequence's K/V copied out of its blocks into the
        packed layout, then ``forward_packed``.
        """
        packed = PagedKV(k_pool, v_pool).gather(meta)                   # (S, Hkv, D)
        return self.forward_packed(q, packed.k, packed.v, meta)

    @staticmethod
    def scale(head_dim: int) -> float:
        return 1.0 / math.sqrt(head_dim)


def _check_shapes(q, k, v, meta: AttentionMetadata) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q (T,Hq,D), k/v (S,Hkv,D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} KV heads")
    if q.shape[0] != meta.num_tokens or k.shape[0] != meta.cu_k[-1]:
        raise ValueError(f"metadata describes {meta.num_tokens} queries / "
                         f"{meta.cu_k[-1]} keys; got {q.shape[0]} / {k.shape[0]}")


def expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """(S, Hkv, D) -> (S, Hq, D): repeat each KV head for the query heads sharing it."""
    n_rep = num_q_heads // x.shape[1]
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(q_len, k_len) bool, True where query i may attend key j (bottom-right aligned)."""
    offset = k_len - q_len
    qi = torch.arange(q_len, device=device).unsqueeze(1)
    kj = torch.arange(k_len, device=device).unsqueeze(0)
    return kj <= qi + offset
