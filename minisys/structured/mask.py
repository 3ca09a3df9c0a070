"""Token bitmasks: fill them for a batch of matchers, apply them to a batch of logits.

A bitmask row is ``ceil(V / 32)`` int32 words; bit ``t % 32`` of word
``t // 32`` is 1 when token ``t`` is allowed. Columns past the row's last word
(a model vocabulary wider than the words cover) are never allowed.

Overlap (`MaskFiller`): a sequence's next mask depends only on the tokens it
already has, so the runner submits the fill for all constrained rows to one
background thread *before* the step's forward and collects it *after*; the
fill (llguidance, in Rust, GIL released) then runs while torch computes the
forward. What is not overlapped: applying the mask (one vectorized
``masked_fill`` on the constrained rows) and ``accept`` of the sampled token
(microseconds each, on the engine thread).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, Sequence

import llguidance
import torch

from .matcher import StructuredMatcher

_SHIFTS = torch.arange(32, dtype=torch.int32)        # bit i of a word
_EXECUTOR: "llguidance.LLExecutor | None" = None


class RowMasks(NamedTuple):
    """The masks of some rows of a (B, V) logits batch: ``bitmask[i]`` applies to row ``rows[i]``."""

    rows: list[int]
    bitmask: torch.Tensor            # (len(rows), ceil(V / 32)) int32


def fill_bitmasks(matchers: Sequence[StructuredMatcher]) -> torch.Tensor:
    """(R, W) int32: row r is the allowed-token bitmask of ``matchers[r]`` (llguidance's executor fills
    the rows in parallel, without the GIL)."""
    global _EXECUTOR
    words = matchers[0].words
    out = torch.zeros(len(matchers), words, dtype=torch.int32)
    if len(matchers) == 1:
        matchers[0].fill(out.data_ptr())
        return out
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor(num_threads=2)
    _EXECUTOR.unsafe_compute_mask_ptr([(m.llmatcher, r) for r, m in enumerate(matchers)],
                                      out.data_ptr(), words * 4, len(matchers))
    return out


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, W) int32 -> (R, vocab_size) bool, True where allowed (ids past 32 W: False)."""
    bits = ((bitmask.unsqueeze(-1) >> _SHIFTS.to(bitmask.device)) & 1).bool()      # (R, W, 32)
    bits = bits.reshape(bitmask.shape[0], -1)                                        # (R, 32 W)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - bits.shape[1], dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_mask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> a copy with the disallowed tokens of ``rows`` at -inf (other rows unchanged).

    Vectorized: the bitmask is unpacked and applied with one ``masked_fill``;
    the input is not modified (the raw logits stay raw for logprobs).
    """
    if not len(rows):
        return logits
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[-1])          # (R, V)
    if list(rows) != list(range(logits.shape[0])):                                  # some rows: widen to (B, V)
        keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        keep[torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)] = allowed
        allowed = keep
    return torch.where(allowed, logits, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def allowed_token_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """The naive reading of one bitmask row (a Python loop over the vocabulary; for tests and debugging)."""
    words = bitmask_row.tolist()
    return [t for t in range(vocab_size) if t // 32 < len(words) and (words[t // 32] >> (t % 32)) & 1]


class MaskFiller:
    """Fills the constrained rows' bitmasks on a background thread, overlapped with the forward.

    ``submit(matchers)`` before the forward; ``result()`` after it. ``fill_s``
    accumulates the fill time, ``wait_s`` the part the engine thread waited
    for (the fill not hidden by the forward).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minisys-mask")
        self._future: Future | None = None
        self.fill_s = 0.0
        self.wait_s = 0.0
        self.fills = 0

    def _run(self, matchers: list[StructuredMatcher]) -> torch.Tensor:
        t = time.perf_counter()
        out = fill_bitmasks(matchers)
        self.fill_s += time.perf_counter() - t
        self.fills += 1
        return out

    def submit(self, matchers: list[StructuredMatcher]) -> None:
        assert self._future is None, "a mask fill is already pending"
        self._future = self._pool.submit(self._run, list(matchers)) if matchers else None

    def discard(self) -> None:
        """Forget the pending fill (the step failed between `submit` and `result`): wait for it, drop it,
        so the next step can submit. Invariant: after every step, nothing is pending."""
        if self._future is not None:
            try:
                self._future.result()
            except Exception:
                pass
            self._future = None

    def result(self) -> torch.Tensor | None:
        """The (R, W) bitmasks of the last `submit` (None if it had no matchers)."""
        if self._future is None:
            return None
        t = time.perf_counter()
        try:
            return self._future.result()
        finally:
            self.wait_s += time.perf_counter() - t
            self._future = None
