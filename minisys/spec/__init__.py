"""Speculative decoding (lesson 06): propose k tokens cheaply, verify them in one target forward.

    proposer.py   the `Proposer` interface and `Proposal` (draft tokens + their draft probabilities)
    ngram.py      n-gram prompt lookup: copy what followed the latest match of the last n tokens
    draft.py      a draft model (any model sharing the tokenizer; `SelfDraftModel` = the target's first layers)
    rejection.py  verification: greedy longest-prefix and the Leviathan/Chen rejection sampler
    metrics.py    acceptance rate alpha, tokens per target forward, predicted vs measured speedup

The engine side (scheduling 1 + k tokens, KV rollback) is in
`minisys.engine` (look for "speculative") and `BlockAllocator.truncate`.
"""
from .metrics import SpecMetrics, expected_tokens_per_step, predicted_speedup
from .ngram import NgramProposer, ngram_propose
from .proposer import Proposal, Proposer
from .rejection import greedy_verify, rejection_sample

__all__ = ["Proposal", "Proposer", "NgramProposer", "ngram_propose", "greedy_verify", "rejection_sample",
           "SpecMetrics", "expected_tokens_per_step", "predicted_speedup"]
