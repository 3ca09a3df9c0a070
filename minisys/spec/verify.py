"""One target forward's logits -> the tokens each request emits (speculating or not).

The model runner ran the LM head at every fed position of a speculating
request (its last token and its k drafts: k + 1 rows) and at the last fed
position of every other request (1 row). Per request:

* no drafts: the usual one-token sampling (`sample_rows`, same RNG use as without speculation);
* drafts, greedy: `greedy_verify` (longest prefix equal to the argmax, then one argmax);
* drafts, sampled: `rejection_sample` on the target's distribution after
  temperature / top-k / top-p (the same processing the draft used for q).
"""
from __future__ import annotations

import torch

from ..engine.model_runner import sample_rows
from ..engine.sampler import apply_temperature, apply_top_k, apply_top_p
from .rejection import greedy_verify, rejection_sample


def target_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """(n, V) logits -> (n, V) probabilities the request samples from."""
    x = apply_top_p(apply_top_k(apply_temperature(logits.float(), params.temperature), params.top_k), params.top_p)
    return torch.softmax(x, dim=-1)


def verify_rows(logits: torch.Tensor, scheduled: list, draft_probs: dict) -> list[list[int]]:
    """logits (sum of rows, V), rows in ``scheduled`` order -> emitted tokens per scheduled request.

    ``draft_probs[request_id]`` is the q of a sampled draft-model proposal (k, V); absent = one-hot drafts.
    """
    starts, r = [], 0
    for s in scheduled:
        starts.append(r)
        r += 1 + len(s.spec_token_ids)
    out: list[list[int]] = [[] for _ in scheduled]
    plain = [i for i, s in enumerate(scheduled) if not s.spec_token_ids]
    if plain:
        tokens = sample_rows(logits[[starts[i] for i in plain]], [scheduled[i].request for i in plain])
        for i, t in zip(plain, tokens):
            out[i] = [t]
    for i, s in enumerate(scheduled):
        k = len(s.spec_token_ids)
        if not k:
            continue
        rows, req = logits[starts[i]:starts[i] + k + 1], s.request                  # (k+1, V)
        if req.params.greedy:
            out[i] = greedy_verify(rows, s.spec_token_ids)
            continue
        p = target_probs(rows, req.params).unsqueeze(0)                             # (1, k+1, V)
        q = draft_probs.get(req.request_id)
        drafts = torch.tensor([s.spec_token_ids], dtype=torch.long, device=logits.device)   # (1, k)
        toks, n_acc = rejection_sample(p, None if q is None else q.unsqueeze(0).to(p), drafts, [req.generator])
        out[i] = toks[0, :int(n_acc[0]) + 1].tolist()
    return out
