"""Speculative decoding (lesson 06): propose k tokens cheaply, verify them in one target forward.

    proposer.py   the `Proposer` interface and `Proposal` (draft tokens + their draft probabilities)
    ngram.py      n-gram prompt lookup: copy what followed the latest match of the last n tokens
    draft.py      a draft model (any model sharing the tokenizer; `SelfDraftModel` = the target's first layers)
    rejection.py  verification: greedy longest-prefix and the Leviathan/Chen rejection sampler
    verify.py     one target forward's logits -> the tokens each request emits (with or without drafts)
    metrics.py    acceptance rate alpha, tokens per target forward, predicted vs measured speedup
    speculator.py `Speculator`: what the engine calls (propose; the record and release of a step)

The engine side: `Scheduler.schedule(drafts)` reserves slots for 1 + k
tokens, `ModelRunner.execute` verifies through `verify.verify_rows`,
`Scheduler.rollback_speculative` (`BlockAllocator.truncate`) forgets the
rejected drafts' KV. Nothing in this package imports `minisys.engine`.
"""
from .metrics import SpecMetrics, expected_tokens_per_step, predicted_speedup
from .ngram import NgramProposer, ngram_propose
from .proposer import Proposal, Proposer
from .rejection import greedy_verify, rejection_sample
from .speculator import Speculator

__all__ = ["Proposal", "Proposer", "NgramProposer", "ngram_propose", "greedy_verify", "rejection_sample",
           "SpecMetrics", "Speculator", "expected_tokens_per_step", "predicted_speedup"]
