"""The proposer interface: k cheap guesses per decoding request.

A proposer looks at a request's tokens (prompt + output so far) and returns
up to ``k`` draft tokens, plus, when the drafts were *sampled* from a
distribution, that distribution ``q`` at each draft position (the rejection
rule needs ``q(x)``). A deterministic proposer (n-gram lookup, a greedy
draft) returns ``draft_probs=None``: its q is one-hot at the proposed token.

Invariants: ``len(token_ids) <= k``; ``draft_probs`` is None or has shape
``(len(token_ids), V)``, each row a distribution with ``q[j, token_ids[j]] > 0``.
An empty proposal is allowed: the request then decodes one token as usual.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    token_ids: list[int]
    draft_probs: torch.Tensor | None = None     # (len(token_ids), V) or None (one-hot drafts)

    def __len__(self) -> int:
        return len(self.token_ids)


class Proposer(ABC):
    """``propose(requests, ks)``: one `Proposal` per request, at most ``ks[i]`` tokens for request i."""

    name = "proposer"
    forwards = 0            # model forward passes spent proposing (a draft model counts its own)

    @abstractmethod
    def propose(self, requests: list, ks: list[int]) -> list[Proposal]:
        """``requests`` are engine `Request`s (read ``all_token_ids``, ``params``, ``generator``)."""

    def release(self, request_id: str) -> None:
        """Forget per-request state (a draft model's cache) once the request is finished."""
