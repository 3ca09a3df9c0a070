"""Turning logits into the next token: temperature, top-k, top-p, sampling.

Every function works on a batch of rows, logits (B, V) in fp32, with one
parameter set; `sample_next_token` applies a request's `SamplingParams` to
its own row with its own generator.

    p = softmax(logits / T)            temperature T > 0 (T = 0 is argmax)
    top-k: keep the k largest logits
    top-p: keep the smallest set of most likely tokens whose mass reaches p
"""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams


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


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits): (B, V) -> (B,)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) under `params` (greedy if temperature == 0)."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return sample_from_logits(logits, generator)


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A request's own random generator: seeded if asked, else from torch's global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g
