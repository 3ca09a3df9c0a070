"""One target forward's logits -> the tokens each request emits (speculating or not).

The model runner ran the LM head at every fed position of a speculating
request (its last token and its k drafts: k + 1 rows) and at the last fed
position of every other request (1 row). Per request:

* no drafts: the usual one-token sampling (`minisys.sampling.sample_rows`, same RNG use as without speculation);
* drafts, greedy: `greedy_verify` (longest prefix equal to the argmax, then one argmax);
* drafts, sampled: `rejection_sample` on the target's distribution after
  temperature / top-k / top-p (`probs_from_logits`, the same processing the draft used for q).
"""
from __future__ import annotations

import torch

from ..sampling import probs_from_logits, sample_rows
from ..structured.mask import RowMasks
from .rejection import greedy_verify, rejection_sample


def verify_rows(logits: torch.Tensor, scheduled: list, masks: RowMasks | None = None) -> list[list[int]]:
    """logits (sum of rows, V), rows in ``scheduled`` order -> emitted tokens per scheduled request.

    ``scheduled`` are the step's `ScheduledRequest`s that sample: each has
    ``1 + len(spec_token_ids)`` rows, and ``draft_probs`` (k, V), the q of a
    sampled draft-model proposal, or None for one-hot drafts (n-gram, greedy draft).
    ``masks``: structured-output masks, ``masks.rows`` indexing ``scheduled`` (requests without drafts only:
    the engine refuses structured outputs with speculative decoding).
    """
    starts, r = [], 0
    for s in scheduled:
        starts.append(r)
        r += 1 + len(s.spec_token_ids)
    out: list[list[int]] = [[] for _ in scheduled]
    plain = [i for i, s in enumerate(scheduled) if not s.spec_token_ids]
    if plain:
        reqs = [scheduled[i].request for i in plain]
        plain_masks = None
        if masks is not None and masks.rows:
            pos = {i: j for j, i in enumerate(plain)}
            assert all(i in pos for i in masks.rows), "a structured-output request with drafts"
            plain_masks = RowMasks([pos[i] for i in masks.rows], masks.bitmask)
        tokens = sample_rows(logits[[starts[i] for i in plain]], [r.params for r in reqs],
                             [r.generator for r in reqs],
                             [r.history() for r in reqs], plain_masks)
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
        p = probs_from_logits(rows, req.params).unsqueeze(0)                        # (1, k+1, V)
        q = s.draft_probs
        drafts = torch.tensor([s.spec_token_ids], dtype=torch.long, device=logits.device)   # (1, k)
        toks, n_acc = rejection_sample(p, None if q is None else q.unsqueeze(0).to(p), drafts, [req.generator])
        out[i] = toks[0, :int(n_acc[0]) + 1].tolist()
    return out
