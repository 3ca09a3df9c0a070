"""The small building blocks of a Llama layer: RMSNorm, RoPE, SwiGLU MLP.

Shapes use T for the number of tokens in the flat batch, H for heads, D for
the head dimension and C for the hidden size.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_HAS_RMS_NORM = hasattr(F, "rms_norm")          # torch >= 2.4


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32.

    fp32 input goes to torch's fused kernel (``F.rms_norm``, torch >= 2.4): one op instead of the
    seven below, the same formula. Other dtypes take the written-out path, which rounds to the
    input dtype *before* the weight multiply, as Hugging Face's Llama does.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and _HAS_RMS_NORM:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.forward_unfused(x)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """The formula written out (any dtype): the path beside the fused kernel."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), "rotate half" layout as in HF Llama.

    For position p and frequency index i < D/2, dimensions (i, i + D/2) of a
    query or key are rotated by the angle p * theta^(-2i/D). The dot product
    of a rotated query and key then depends only on their distance.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        pos = torch.arange(max_positions, dtype=torch.float64)
        angles = torch.outer(pos, inv_freq)                   # (P, D/2)
        angles = torch.cat([angles, angles], dim=-1)          # (P, D)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        # sin with its first half negated: rotate_half(x) * sin == roll(x, D/2) * sin_signed, exactly
        half = head_dim // 2
        self.register_buffer("sin_signed", torch.cat([-self.sin[:, :half], self.sin[:, half:]], -1),
                             persistent=False)                                   # (P, D)
        self._rows: tuple | None = None          # (positions, cos rows, sin_signed rows) while `once_for` runs

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed) rows of ``positions``, (T, 1, D) each, checked against the context length."""
        memo = self._rows
        if memo is not None and memo[0] is positions:
            return memo[1], memo[2]
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the model's "
                             f"context of {self.cos.shape[0]} tokens")
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)   # (T, 1, D) each

    @contextmanager
    def once_for(self, positions: torch.Tensor) -> Iterator[None]:
        """Inside, ``positions``' rows are looked up (and checked) once, not once per layer.

        The model's forward wraps its layers in it: each layer passes the same ``positions`` tensor,
        and the rows found on entry are reused (keyed on that tensor's identity, dropped on exit, so
        an in-place change between forwards is always seen). Another thread's forward on other
        positions simply misses the memo and looks its own rows up: one tuple, assigned at once.
        """
        self._rows = (positions, *self.rows(positions))
        try:
            yield
        finally:
            self._rows = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (T, H, D), positions: (T,) -> rotated x, same shape and dtype (computed in fp32).

        ``rotate_half(x) = cat(-x2, x1)`` is ``roll(x, D/2) = cat(x2, x1)`` with the sign moved into the
        table (``sin_signed``): one op instead of two slices, a negation and a cat, the same numbers bit
        for bit (`forward_rotate_half` is the formula as Hugging Face writes it). At batch 1 a decode step
        is dominated by such per-op costs, not by arithmetic (lesson 04).
        """
        return self.rotate(x, *self.rows(positions))

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """x (..., D) rotated by rows already looked up (`rows`, broadcastable to x): the formula of `forward`."""
        x32 = x if x.dtype == torch.float32 else x.float()
        out = x32 * cos + torch.roll(x32, x.shape[-1] // 2, dims=-1) * sin_signed
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def forward_rotate_half(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The plain formula beside `forward`: x * cos + rotate_half(x) * sin, no lookup memo."""
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)     # (T, 1, D) each
        x32 = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """The Llama MLP: down( silu(gate(x)) * up(x) ).

    Tensor-parallel (lesson 13) when ``tp_size > 1``: gate/up are column-parallel (rank r holds a
    slice of the intermediate features; silu(gate) * up is elementwise, so it stays local) and down is
    row-parallel: one all-reduce per MLP. With ``tp_size == 1`` they are plain `nn.Linear` layers.
    `fuse_gate_up` turns gate/up into one matmul (each rank its own rows of both).
    """

    def __init__(self, hidden: int, intermediate: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        from ..parallel.linear import ColumnParallelLinear, RowParallelLinear
        tp = dict(tp_rank=tp_rank, tp_size=tp_size)
        self.gate_proj = ColumnParallelLinear(hidden, intermediate, False, **tp)
        self.up_proj = ColumnParallelLinear(hidden, intermediate, False, **tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, False, **tp)

        self.gate_up_proj = None                                   # set by fuse_gate_up

    def fuse_gate_up(self) -> None:
        """Replace gate/up by ONE matmul (`MergedColumnParallelLinear`, parameter ``gate_up_proj.weight``)."""
        from ..parallel.linear import MergedColumnParallelLinear
        if self.gate_up_proj is None:
            self.gate_up_proj = MergedColumnParallelLinear.fuse([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:                              # the plain path: two matmuls
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))   # one matmul: (T, 2I) -> (T, I) x 2
        return self.down_proj(F.silu(gate) * up)
