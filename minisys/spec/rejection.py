"""Verification: which draft tokens does the target keep, and what comes after them.

The target scored the request's last token and its k drafts in one forward,
so it has a next-token distribution at k + 1 positions: ``p_0 .. p_k``
(``p_j`` predicts the token after draft j-1). Two rules:

* **Greedy** (`greedy_verify`): accept the longest prefix of drafts that equal
  the target's argmax; then emit the target's argmax at the first mismatch
  (or at position k, the *bonus* token, when all k were accepted). The
  output is exactly what plain greedy decoding produces.
* **Sampled** (`rejection_sample`, Leviathan et al. 2023; Chen et al. 2023):
  for j = 0, 1, ...: accept draft x_j with probability ``min(1, p_j(x_j) / q_j(x_j))``;
  at the first rejection draw the replacement from the residual
  ``normalize(max(0, p_j - q_j))`` and stop; if all k are accepted draw the
  bonus token from ``p_k``. Every emitted token is then distributed exactly
  as if sampled from the target alone (proof in lessons/06).

Both emit between 1 and k + 1 tokens per request: the accepted drafts and one
token drawn by the target. ``accept_all`` beside them is the deliberately
wrong rule the statistical test must catch.
"""
from __future__ import annotations

import torch

from ..sampling import sample_categorical, uniforms


def greedy_verify(target_logits: torch.Tensor, draft_tokens: list[int]) -> list[int]:
    """target_logits (k+1, V) at the last token and each draft -> the emitted tokens (accepted + one)."""
    best = target_logits.argmax(dim=-1).tolist()                        # (k+1,)
    a = 0
    while a < len(draft_tokens) and draft_tokens[a] == best[a]:
        a += 1
    return draft_tokens[:a] + [best[a]]


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_tokens: torch.Tensor,
                     generators=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule over a batch of B requests with k drafts each.

    target_probs (B, k+1, V): p_0..p_k; draft_probs (B, k, V): q_0..q_{k-1}, or None
    for one-hot drafts (n-gram, greedy draft); draft_tokens (B, k) int64.
    ``generators``: one torch.Generator per row (a list), one for all, or None.
    Each row draws k uniforms for the accept tests, then one for its last token.

    Returns (tokens (B, k+1) int64 padded with -1, num_accepted (B,)): row i
    emits ``tokens[i, :num_accepted[i] + 1]``.
    """
    B, k1, V = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    if draft_probs is None:                                              # one-hot q at the drafts
        draft_probs = torch.zeros(B, k, V, dtype=target_probs.dtype, device=dev)
        draft_probs.scatter_(-1, draft_tokens.unsqueeze(-1), 1.0)
    p_x = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)   # (B, k)
    q_x = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)           # (B, k)
    u = uniforms(generators, k + 1, B, dev)                                       # (B, k+1)
    accept = u[:, :k] * q_x < p_x                                       # u < p/q, i.e. prob min(1, p/q)
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)            # (B,) accepted prefix length
    residual = (target_probs[:, :k] - draft_probs).clamp_(min=0)        # (B, k, V) max(0, p - q)
    final = torch.cat([residual, target_probs[:, k:]], dim=1)           # (B, k+1, V); row k = p_k (bonus)
    rows = final[torch.arange(B, device=dev), num_accepted]             # (B, V)
    empty = rows.sum(-1) <= 0                                           # p == q exactly: a rejection has prob 0
    rows[empty] = target_probs[torch.arange(B, device=dev)[empty], num_accepted[empty]]
    last = sample_categorical(rows, u[:, k])                            # (B,)
    out = torch.full((B, k + 1), -1, dtype=torch.long, device=dev)
    pos = torch.arange(k + 1, device=dev)
    keep = pos.unsqueeze(0) < num_accepted.unsqueeze(1)                 # (B, k+1) accepted drafts
    out[:, :k][keep[:, :k]] = draft_tokens[keep[:, :k]]
    out[torch.arange(B, device=dev), num_accepted] = last
    return out, num_accepted


def accept_all(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_tokens: torch.Tensor,
               generators=None) -> tuple[torch.Tensor, torch.Tensor]:
    """WRONG on purpose: keep every draft, then a bonus token from p_k. Its output follows q, not p."""
    B, k1, _ = target_probs.shape
    u = uniforms(generators, 1, B, target_probs.device)[:, 0]
    bonus = sample_categorical(target_probs[:, -1], u)
    return torch.cat([draft_tokens, bonus.unsqueeze(1)], dim=1), torch.full((B,), k1 - 1, dtype=torch.long)
