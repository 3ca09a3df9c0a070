"""What speculation bought: acceptance rate, tokens per target forward, predicted vs measured speedup.

With k drafts per step, each accepted independently with probability alpha
(the model of Leviathan et al.), one target forward emits on average

    E[tokens] = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)

tokens. If one draft step costs c target forwards (c ~ 0 for n-gram lookup),
a speculative step costs ``k c + 1`` target forwards (verification of k + 1
tokens assumed as cheap as a 1-token decode: decoding is memory-bound), so

    speedup = (1 - alpha^(k+1)) / ((1 - alpha) (k c + 1)).
"""
from __future__ import annotations

from dataclasses import dataclass


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): mean tokens emitted by one verification of k drafts."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.'s walltime improvement: E[tokens] / (k c + 1)."""
    return expected_tokens_per_step(alpha, k) / (k * c + 1)


@dataclass
class SpecMetrics:
    """Counters of the speculating requests (one verification = one request in one target forward with drafts)."""

    num_verifications: int = 0     # (request, step) pairs that verified >= 1 draft
    proposed: int = 0              # draft tokens scored by the target
    accepted: int = 0              # draft tokens kept
    emitted: int = 0               # tokens emitted by those verifications (accepted + 1 each, before stops)
    draft_forwards: int = 0        # draft-model forward passes (0 for n-gram)
    draft_seconds: float = 0.0     # time spent proposing

    @property
    def acceptance_rate(self) -> float:
        """alpha = accepted / proposed."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_k(self) -> float:
        return self.proposed / self.num_verifications if self.num_verifications else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.emitted / self.num_verifications if self.num_verifications else 0.0

    def summary(self) -> dict:
        return {"verifications": self.num_verifications, "proposed": self.proposed, "accepted": self.accepted,
                "alpha": self.acceptance_rate, "mean_k": self.mean_k,
                "tokens_per_verification": self.tokens_per_verification,
                "draft_forwards": self.draft_forwards, "draft_seconds": self.draft_seconds}
