"""Paged decode attention as one Triton kernel: one program per (sequence, KV head).

Each decode sequence b has one query per query head and ``seq_lens[b]`` keys
in its blocks (``block_tables[b, :]``). Program (b, h) handles KV head h and
the G = Hq / Hkv query heads that share it (grouped-query attention: K/V are
read once for the G heads). It walks the sequence's blocks one at a time and
keeps FlashAttention's online softmax in registers:

    for each block i < ceil(seq_len / block_size):
        K_i, V_i = k_pool[block_tables[b, i], :, h, :], v_pool[...]      # (BS, D)
        s   = (q @ K_i^T) * scale, masked past seq_len                    # (G, BS)
        m'  = max(m, rowmax(s));  p = exp(s - m');  a = exp(m - m')
        l   = a * l + rowsum(p);  acc = a * acc + p @ V_i                 # (G, D)
    out = acc / l

Nothing is gathered or padded: the loop bound is read from ``seq_lens`` on
the device, so the launch has the same shape whatever the lengths are, which
is what a CUDA graph needs (`minisys.engine.cuda_graph`). Products are done as
broadcast-multiply-sums, not ``tl.dot``: with G = 3 query rows a tensor-core
tile (>= 16 rows) would be mostly padding, and decode is bound by reading K/V.

On a CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported); the tests compare it there with
`minisys.attention.reference.ReferenceAttention`. This module imports triton:
import it only where triton is installed (`available`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .base import AttentionBackend, AttentionMetadata
from .paged import PagedAttention


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, lens_ptr, scale,
                         stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_btb,
                         stride_ob, stride_oh,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    b = tl.program_id(0)                                   # sequence
    h = tl.program_id(1)                                   # KV head
    g = tl.arange(0, BLOCK_G)                              # query heads of this KV head (padded to pow2)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK_SIZE)                           # token offset inside a block
    g_ok = g < G
    q_rows = h * G + g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32) * scale          # (BLOCK_G, D)
    seq_len = tl.load(lens_ptr + b)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    for i in range(0, num_blocks):
        block = tl.load(bt_ptr + b * stride_btb + i)
        t_ok = i * BLOCK_SIZE + t < seq_len
        offs = block * stride_kb + t[:, None] * stride_kt + h * stride_kh + d[None, :]
        k = tl.load(k_ptr + offs, mask=t_ok[:, None], other=0.0).to(tl.float32)      # (BS, D)
        v = tl.load(v_ptr + offs, mask=t_ok[:, None], other=0.0).to(tl.float32)      # (BS, D)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)                            # (BLOCK_G, BS)
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)   # (BLOCK_G, D)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ob + q_rows[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """q (B, Hq, D), one query per sequence; k_pool, v_pool (num_blocks, block_size, Hkv, D);
    block_tables (B, >= max blocks) and seq_lens (B,) integers on q's device (every seq_len >= 1)
    -> (B, Hq, D) in q's dtype. D and block_size must be powers of two."""
    B, Hq, D = q.shape
    _, bs, Hkv, Dk = k_pool.shape
    if Dk != D or Hq % Hkv or k_pool.shape != v_pool.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)} / {tuple(v_pool.shape)}")
    if D & (D - 1) or bs & (bs - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim and block_size, got {D}, {bs}")
    q = q.contiguous()
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty_like(q)
    G = Hq // Hkv
    _paged_decode_kernel[(B, Hkv)](
        q, k_pool, v_pool, out, block_tables, seq_lens, scale if scale is not None else 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=G, BLOCK_G=triton.next_power_of_2(G), D=D, BLOCK_SIZE=bs)
    return out


class TritonDecodeAttention(AttentionBackend):
    """The backend ``triton``: paged decode-only steps through `paged_decode_attention`; a step with a
    prefill chunk through `PagedAttention`; packed K/V through SDPA. Needs a GPU, or the interpreter."""

    name = "triton"

    def __init__(self) -> None:
        self.paged = PagedAttention()

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        return self.paged.forward(q, k, v, meta)

    def forward_paged(self, q, k_pool, v_pool, meta: AttentionMetadata) -> torch.Tensor:
        if not meta.is_decode_only:
            return self.paged.forward_paged(q, k_pool, v_pool, meta)
        return paged_decode_attention(q, k_pool, v_pool, meta.block_tables.to(q.device), device_seq_lens(meta, q.device))


def device_seq_lens(meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
    """(B,) keys per sequence on ``device``: ``meta.seq_lens_tensor`` when given, else built from the lists."""
    if meta.seq_lens_tensor is not None:
        return meta.seq_lens_tensor
    return torch.tensor(meta.seqlens_k, dtype=torch.int64, device=device)
