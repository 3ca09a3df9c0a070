"""Paged attention: read K/V straight out of the block pool through block tables.

A paged cache (`minisys.kv.paged`) hands attention the layer's pools, a
`PagedKV` view: k_pool / v_pool of shape (num_blocks, block_size, Hkv, D).
Other backends copy each sequence's context out of them first (the gather
path, `AttentionBackend.forward_paged`); this one overrides `forward_paged`
to read the blocks through the block tables without building the packed
(S, Hkv, D) copy. A step mixes two kinds of sequences, and they are served
differently:

* **decode** sequences (one new query each) are batched: gather each one's
  blocks, ``k_pool[block_tables]`` -> (B, nb, block_size, Hkv, D) -> (B, K, Hkv, D),
  fold the query heads sharing a KV head into one axis (no repeat of K/V),
  and run one attention with a mask that hides the keys past each sequence's
  length. Padding to the longest sequence of the batch is paid for in memory
  traffic, so the decode sequences are first sorted by length and cut into
  a few groups (`length_groups`): each group pads only to its own longest.
* **prefill** chunks (several new queries) run one sequence at a time on its
  gathered K/V with the bottom-right causal mask (`sdpa_one`); padding a
  256-token prompt and 63 one-token decodes to a (64, 256) query block would
  do 64x the work.

A GPU kernel (vLLM's PagedAttention) reads the blocks in place instead of
gathering them; in plain torch the gather is the price of paging -- except
for one sequence decoding alone on a CPU (batch 1, one user chatting) whose
blocks happen to be consecutive in the pool (a fresh pool hands them out in
order): its keys are then one slice of the pool, read as a view
(`decode_run`), no copy and no mask. What every layer derives from the step's
metadata (groups, block-table slices, masks) is built once per step
(`AttentionMetadata.memo`), not once per layer.
Given packed K/V (a contiguous cache, no cache at all), ``forward_packed``
runs `SDPAAttention`, so it is a drop-in backend either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBackend, AttentionMetadata
from .decode import one_query
from .sdpa import SDPAAttention, sdpa_one

GROUP_SIZE = 16


class PagedAttention(AttentionBackend):
    """Paged K/V: read through the block tables (`paged_attention`); packed K/V: SDPA."""

    name = "paged"

    def __init__(self) -> None:
        self.packed = SDPAAttention()

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.packed.forward(q, k, v, meta)

    def forward_paged(self, q, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        return paged_attention(q, k_pool, v_pool, meta)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """q (T, Hq, D); k_pool, v_pool (num_blocks, block_size, Hkv, D) -> (T, Hq, D)."""
    if meta.block_tables is None:
        raise ValueError("paged attention over a block pool needs meta.block_tables")
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"expected q (T,Hq,D), pools (num_blocks,block_size,Hkv,D); got "
                         f"{tuple(q.shape)}, {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    bs = k_pool.shape[1]
    if q.device.type == "cpu" and meta.seqlens_q == [1]:           # batch 1, decoding: no gather if it can
        start = meta.memo(("run_start", bs), lambda: run_start(meta.block_tables[0], meta.seqlens_k[0], bs))
        if start is not None:
            return decode_run(q, k_pool, v_pool, start, meta.seqlens_k[0])
    out = torch.empty_like(q)
    lens_k, cu_q = meta.seqlens_k, meta.cu_q
    for rows, tables, lens, valid in meta.memo(("decode_groups", bs, q.device), lambda: decode_groups(meta, bs, q.device)):
        out[rows] = decode_group(q[rows], k_pool, v_pool, tables, lens, valid)
    for i, n in enumerate(meta.seqlens_q):
        if n > 1:
            nb = -(-lens_k[i] // bs)
            blocks = meta.block_tables[i, :nb].to(q.device)                   # (nb,)
            k = k_pool.index_select(0, blocks).flatten(0, 1)[:lens_k[i]]      # (k_len, Hkv, D)
            v = v_pool.index_select(0, blocks).flatten(0, 1)[:lens_k[i]]
            out[cu_q[i]:cu_q[i + 1]] = sdpa_one(q[cu_q[i]:cu_q[i + 1]], k, v)
    return out


def decode_groups(meta: AttentionMetadata, block_size: int, device) -> list[tuple]:
    """The step's decode sequences as `length_groups`, each with what `decode_group` reads: its query
    rows (b,), block tables (b, nb), key lengths and key mask (b, K). Built once per step (`meta.memo`)."""
    lens_k, cu_q = meta.seqlens_k, meta.cu_q
    decode = [i for i, n in enumerate(meta.seqlens_q) if n == 1]
    plans = []
    for group in length_groups(decode, lens_k, GROUP_SIZE):
        lens = [lens_k[i] for i in group]
        nb = -(-max(lens) // block_size)
        rows = torch.tensor([cu_q[i] for i in group], device=device)                  # (b,) query row of each
        tables = meta.block_tables[group, :nb].to(device)                              # (b, nb)
        valid = torch.arange(nb * block_size, device=device) < torch.tensor(lens, device=device).view(-1, 1)
        plans.append((rows, tables, lens, valid))                                      # valid: (b, K)
    return plans


def run_start(table: torch.Tensor, length: int, block_size: int) -> int | None:
    """The pool slot where a sequence's ``length`` tokens start, if its blocks are consecutive (its K/V
    are then one slice of the flat pool); None otherwise. ``table``: its block ids, padded."""
    nb = -(-length // block_size)
    blocks = table[:nb]
    first = int(blocks[0])
    if not torch.equal(blocks, torch.arange(first, first + nb, dtype=blocks.dtype, device=blocks.device)):
        return None
    return first * block_size


def decode_run(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """One decode query against ``length`` keys stored in consecutive slots from ``start``: q (1, Hq, D).

    The batch-1 path: the keys are a VIEW of the pool (no gather, no padding, no mask), and each KV
    head's query group does one strided matrix-vector product with them (`DecodeAttention.decode_query`,
    the contiguous cache's batch-1 path: the same computation on the same kind of view).
    """
    Hkv, D = k_pool.shape[2], k_pool.shape[3]
    k = k_pool.view(-1, Hkv, D)[start:start + length]                                  # (S, Hkv, D) views
    v = v_pool.view(-1, Hkv, D)[start:start + length]
    return one_query(q, k, v)                                                          # (1, Hq, D)


def length_groups(seqs: list[int], lengths: list[int], group_size: int) -> list[list[int]]:
    """``seqs`` sorted by ``lengths[seq]`` and cut into groups of at most ``group_size``."""
    order = sorted(seqs, key=lambda i: lengths[i])
    return [order[j:j + group_size] for j in range(0, len(order), group_size)]


def decode_group(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 block_tables: torch.Tensor, lens_k: list[int], valid: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: q (b, Hq, D), block_tables (b, >= nb) -> (b, Hq, D).
    ``valid`` (b, nb * block_size): the key mask, if already built (`decode_groups`)."""
    b, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    G = Hq // Hkv
    nb = -(-max(lens_k) // bs)
    K = nb * bs
    bt = block_tables[:, :nb].reshape(-1)                                      # (b * nb,)
    # index_select is the same gather as k_pool[bt] but several times faster on a CPU
    k = k_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)          # (b, Hkv, K, D)
    v = v_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)
    qh = q.view(b, Hkv, G, D)                                                  # heads sharing a KV head
    if valid is None:
        valid = torch.arange(K, device=q.device) < torch.tensor(lens_k, device=q.device).view(b, 1)  # (b, K)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid.view(b, 1, 1, K))  # (b, Hkv, G, D)
    return o.reshape(b, Hq, D)


def decode_static(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """`decode_group` with the lengths in a device tensor: q (b, Hq, D), block_tables (b, W), seq_lens (b,)
    -> (b, Hq, D). It reads all W blocks of every row and masks the keys past each length, so its shapes
    depend on W only (CUDA-graph safe, no host sync); the plain-torch twin of the Triton decode kernel.
    Every entry of ``block_tables`` must be a valid block id (padding included)."""
    b, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    G = Hq // Hkv
    K = block_tables.shape[1] * bs
    bt = block_tables.reshape(-1)                                              # (b * W,)
    k = k_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)          # (b, Hkv, K, D)
    v = v_pool.index_select(0, bt).view(b, K, Hkv, D).transpose(1, 2)
    qh = q.view(b, Hkv, G, D)                                                  # heads sharing a KV head
    valid = torch.arange(K, device=q.device) < seq_lens.view(b, 1)             # (b, K)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=valid.view(b, 1, 1, K))  # (b, Hkv, G, D)
    return o.reshape(b, Hq, D)
