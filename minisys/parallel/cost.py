"""What tensor parallelism sends: the bytes of its all-reduces, counted on paper (lesson 13).

A ring all-reduce of an M-byte message over N ranks is a reduce-scatter then
an all-gather, each N - 1 steps of M / N bytes per rank: every rank sends
2 (N - 1) / N x M. A Llama layer split Megatron's way all-reduces its
(tokens, hidden) activations twice (after o_proj and after down_proj), so a
token costs ``num_layers x 2`` such all-reduces of ``hidden`` elements.
Invariant: one rank (N = 1) sends nothing. The measured counterpart is
`minisys.parallel.comm.ALL_REDUCE_TIMER`.
"""
from __future__ import annotations


def allreduce_bytes(message_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``message_bytes`` over ``n`` ranks: 2 (n-1)/n x M."""
    return 2 * (n - 1) / n * message_bytes


def tp_comm_bytes_per_token(hidden: int, num_layers: int, tp_size: int, dtype_bytes: int = 2) -> float:
    """Bytes one rank sends per token in a forward pass: two all-reduces of ``hidden`` elements per layer."""
    return num_layers * 2 * allreduce_bytes(hidden * dtype_bytes, tp_size)
