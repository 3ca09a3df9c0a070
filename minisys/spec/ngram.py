"""N-gram prompt lookup (Saxena's "prompt lookup decoding", vLLM's ``[ngram]`` proposer).

No model at all: take the last ``n`` tokens of the sequence, find the
*latest* earlier place where the same ``n`` tokens occur in the prompt or
the output, and propose the ``k`` tokens that followed them there. Try
``n = n_max`` first (a longer match is a more reliable guess) down to
``n_min``. When a model rewrites, corrects, summarises or quotes its input,
long stretches of output are copies of the prompt and these guesses are
mostly right; in open chat they rarely are (and cost almost nothing).
"""
from __future__ import annotations

from .proposer import Proposal, Proposer


def ngram_propose(token_ids: list[int], k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens (n from n_max to n_min).

    The match must start before the suffix itself (it may overlap it), and at
    least one token must follow it. Returns [] when no n-gram matches.
    """
    L = len(token_ids)
    if k <= 0:
        return []
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = token_ids[L - n:]
        for start in range(L - n - 1, -1, -1):              # latest match first, never the suffix itself
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + k]
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, n_max: int = 4, n_min: int = 1) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= ngram_prompt_lookup_min ({n_min}) <= ngram_prompt_lookup_max ({n_max})")
        self.n_max, self.n_min = n_max, n_min

    def propose(self, requests: list, ks: list[int]) -> list[Proposal]:
        return [Proposal(ngram_propose(r.all_token_ids, k, self.n_max, self.n_min)) for r, k in zip(requests, ks)]
