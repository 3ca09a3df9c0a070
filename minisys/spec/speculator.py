"""`Speculator`: speculative decoding as the engine sees it, at three named points of a step.

    drafts = speculator.propose(scheduler.running)   # 1. before scheduling: {request_id: Proposal}
    sched  = scheduler.schedule(drafts)              # 2. reserve: slots for last token + drafts, or none
    tokens = runner.execute(sched, ...)              # 3. verify: `spec.verify.verify_rows` in the forward's
                                                     #    sampling; accepted drafts + 1 per request
    scheduler.rollback_speculative(s, accepted)      #    roll the rejected drafts' KV back
    speculator.record(s, tokens)                     #    acceptance counters
    speculator.release(request_id)                   #    a finished request's proposer state

Drafts travel only inside the step: the proposals returned here, then the
scheduler's `ScheduledRequest.spec_token_ids` / ``draft_probs``; a request
carries no draft between steps. Nothing here imports the engine.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..model.llama import LlamaModel
from ..model.loader import load
from .draft import DraftModelProposer, SelfDraftModel
from .metrics import SpecMetrics
from .ngram import NgramProposer
from .proposer import Proposal, Proposer

if TYPE_CHECKING:
    from ..engine.config import EngineConfig


class Speculator:
    """A proposer plus the rule for how many drafts each request may get, and the counters."""

    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_num_batched_tokens: int,
                 metrics: SpecMetrics | None = None) -> None:
        self.proposer = proposer
        self.k = num_speculative_tokens
        self.max_num_batched_tokens = max_num_batched_tokens
        self.metrics = metrics if metrics is not None else SpecMetrics()

    @classmethod
    def from_config(cls, config: EngineConfig, model: LlamaModel,
                    metrics: SpecMetrics | None = None) -> Speculator | None:
        """The speculator ``config.speculative_method`` asks for (None when speculation is off)."""
        if config.speculative_method is None:
            return None
        return cls(make_proposer(config, model), config.num_speculative_tokens, config.max_num_batched_tokens,
                   metrics)

    def propose(self, running: list) -> dict[str, Proposal]:
        """Drafts for every running request that is decoding (all its tokens but the last computed).

        k per request is capped so that drafts never pass ``max_tokens`` (so
        never the context or the request's worst-case KV blocks), and the
        step's token budget holds every running request's 1 + k tokens.
        Returns {request_id: Proposal} for the requests that got a non-empty proposal.
        """
        room = self.max_num_batched_tokens - len(running)
        reqs, ks = [], []
        for r in running:
            if r.num_computed_tokens != r.num_tokens - 1:
                continue
            k = max(0, min(self.k, r.max_tokens - len(r.output_token_ids) - 1, room))
            if k:
                reqs.append(r)
                ks.append(k)
                room -= k
        if not reqs:
            return {}
        t0 = time.perf_counter()
        proposals = self.proposer.propose(reqs, ks)
        self.metrics.draft_seconds += time.perf_counter() - t0
        return {r.request_id: p for r, p in zip(reqs, proposals) if len(p)}

    def record(self, num_drafts: int, tokens: list[int]) -> None:
        """Count one verification of ``num_drafts`` drafts that emitted ``tokens`` (accepted + 1)."""
        m = self.metrics
        m.num_verifications += 1
        m.proposed += num_drafts
        m.accepted += len(tokens) - 1
        m.emitted += len(tokens)
        m.draft_forwards = self.proposer.forwards

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request's proposer state (a draft model's cache)."""
        self.proposer.release(request_id)


def make_proposer(config: EngineConfig, model: LlamaModel) -> Proposer:
    """The proposer ``config.speculative_method`` names: n-gram lookup, or a draft model
    (``config.speculative_model``, or the target's first ``draft_layers`` layers)."""
    if config.speculative_method == "ngram":
        return NgramProposer(config.ngram_prompt_lookup_max, config.ngram_prompt_lookup_min)
    if config.speculative_model is None:
        return DraftModelProposer(SelfDraftModel(model, config.draft_layers), model.config.vocab_size)
    draft, _ = load(config.speculative_model, device=str(model.device), dtype=model.dtype, quiet=True)
    return DraftModelProposer(draft, model.config.vocab_size)
