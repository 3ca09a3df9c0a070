"""Turning logits into tokens: the one sampler of minisys.

The eager baseline, the engine and speculative decoding all sample here, so a
seeded request draws the same tokens whichever of them serves it:

    probs = softmax(top_p(top_k(logits / T)))    `probs_from_logits`: the one probability preparation
    token = first i with cdf[i] > u * cdf[-1]     `sample_categorical`: the one draw (inverse CDF)
    u     ~ U[0, 1), one per row per draw,        `uniforms`: from the sequence's own torch.Generator
    greedy (T == 0): argmax, no random number used

Every function works on rows, logits ``(B, V)`` in fp32. One uniform per row
replaces a ``torch.multinomial`` call per request (the slow part of sampling
on a CPU), and the draw depends only on the row's logits and its generator,
never on the batch it sits in. Sequence ``i`` of a request with ``n > 1`` gets
its own generator, seeded by `sequence_seed` (index 0 uses the request's
seed itself).

    top-k: keep the k largest logits (ties at the k-th are kept)
    top-p: keep the smallest set of most likely tokens whose mass reaches p
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .engine.sampling_params import SamplingParams


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, V) / T. Greedy (T == 0) is handled by the caller with argmax."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; use argmax for greedy decoding")
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties at the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]           # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability mass reaches p.

    A token is dropped when the mass of the tokens strictly more likely than it
    already reaches p; the most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)   # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs                    # mass of strictly better tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> the distribution a sampled request draws from (temperature, top-k, top-p, softmax).

    The draft model's q and the target's p in speculative decoding come from
    here too, so both sides of the rejection rule see the same processing.
    """
    x = apply_temperature(logits.float(), params.temperature)
    return torch.softmax(apply_top_p(apply_top_k(x, params.top_k), params.top_p), dim=-1)


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs (B, V) (rows need not sum to 1), u (B,) in [0, 1) -> tokens (B,).

    Token i is picked when ``cdf[i-1] <= u * total < cdf[i]`` (``right=True``),
    so a token of probability zero, whose cdf step is empty, is never picked.
    """
    cdf = probs.cumsum(dim=-1)                                           # (B, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def uniforms(generators: torch.Generator | Sequence[torch.Generator | None] | None, n: int,
             rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, n) uniforms in [0, 1): row i from ``generators[i]`` (a list), or all rows from one generator."""
    if isinstance(generators, (list, tuple)):
        return torch.stack([torch.rand(n, generator=g, device=device) for g in generators])
    return torch.rand(rows, n, generator=generators, device=device)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of logits (B, V), row i under ``params[i]`` with ``generators[i]``.

    Greedy rows: one argmax together. Sampled rows are grouped by (temperature,
    top_k, top_p) so each group is filtered in one call; each row then draws
    ONE uniform from its own generator.
    """
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        picked = logits.argmax(dim=-1) if len(greedy) == len(params) else logits[greedy].argmax(dim=-1)
        for i, t in zip(greedy, picked.tolist()):
            tokens[i] = t
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for rows in groups.values():
        probs = probs_from_logits(logits[rows], params[rows[0]])                       # (b, V)
        u = uniforms([generators[i] for i in rows], 1, len(rows), logits.device)[:, 0]  # (b,)
        for i, t in zip(rows, sample_categorical(probs, u).tolist()):
            tokens[i] = t
    return tokens


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,), every row under ``params``, drawing from one ``generator``.

    For one row this is exactly `sample_rows` with that row's generator.
    """
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    u = uniforms(generator, 1, logits.shape[0], logits.device)[:, 0]                   # (B,)
    return sample_categorical(probs_from_logits(logits, params), u)


def sequence_seed(seed: int | None, index: int) -> int | None:
    """The seed of sequence ``index`` of a request with ``n`` samples: the request's own seed for
    index 0, a fixed function of (seed, index) for the others; None (unseeded) stays None."""
    if seed is None or index == 0:
        return seed
    return hash((seed, index)) & (2**62 - 1)        # hash of a tuple of ints: the same in every process


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A sequence's own random generator: seeded if asked, else from torch's global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g
