"""A request (one sequence) and its state machine.

    WAITING ──admit──> RUNNING ──finish / abort──> FINISHED
       ^                  │
       │               preempt (no free block: blocks freed, tokens kept)
       │                  v
       └──re-queue──── PREEMPTED

A WAITING request may also be aborted straight to FINISHED. FINISHED is
terminal. `Request.transition` raises `IllegalTransition` on any move not in
`ALLOWED_TRANSITIONS`, so a scheduler bug shows up where it happens.

A preempted request keeps its generated tokens; when it is admitted again the
whole ``prompt + output`` is recomputed as one prefill (preemption by
recompute, vLLM's default), then decoding continues where it stopped. A
structured-output sequence keeps its grammar matcher too: it has consumed
exactly the kept output tokens, so its next mask is still right.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..scheduling.qoe import QoESpec
from ..structured.matcher import StructuredMatcher
from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


ALLOWED_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING, RequestStatus.FINISHED}),
    RequestStatus.RUNNING: frozenset({RequestStatus.PREEMPTED, RequestStatus.FINISHED}),
    RequestStatus.PREEMPTED: frozenset({RequestStatus.WAITING}),
    RequestStatus.FINISHED: frozenset(),
}


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    """Raise ValueError (with the reason) for a prompt no model could run: empty, or ids outside
    the vocabulary. The engine and the eager baseline both refuse with this one check."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")


def check_request_meta(client: str | None, priority: int, qoe: QoESpec | None) -> None:
    """Raise ValueError naming the argument when who-asked metadata (lesson 08) is malformed."""
    if client is not None and not isinstance(client, str):
        raise ValueError(f"client must be a string or None, got {client!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if qoe is not None and not isinstance(qoe, QoESpec):
        raise ValueError(f"qoe must be a QoESpec or None, got {qoe!r}")


class IllegalTransition(RuntimeError):
    """A request was moved along an edge that `ALLOWED_TRANSITIONS` does not have."""


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``num_computed_tokens`` of its tokens have K/V in the pool.

    Invariant: ``0 <= num_computed_tokens <= num_tokens``; a RUNNING request
    holds blocks in the allocator for its tokens, no other state does.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    arrival: int = 0                           # admission order tiebreak (set by the scheduler)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None           # "stop" | "length" | "abort"
    num_preemptions: int = 0
    max_tokens: int = 16                       # resolved budget of new tokens (params or context)
    # who asked, and how they want to be served (lesson 08: `minisys.scheduling`)
    client: str | None = None                  # the OpenAI `user`: VTC's fair share is per client
    priority: int = 0                          # lower runs first under the "priority" policy (vLLM's rule)
    qoe: QoESpec | None = None                 # the reader's expected TTFT and pace (Andes); None: the default
    arrival_time: float = 0.0                  # the scheduler's clock when it was added (set by the scheduler)
    eos_token_ids: tuple[int, ...] = ()        # what ``min_tokens`` masks (`minisys.sampling.History`)
    # params.logprobs / prompt_logprobs: one {token id: Logprob} per output token / per prompt token
    # (prompt: the first is None; filled chunk by chunk, never twice: a recompute adds nothing)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    # params.structured_outputs: this sequence's grammar state; it has accepted exactly output_token_ids
    # (kept across preemption: recompute rebuilds K/V, the output and so the matcher state are unchanged)
    structured: StructuredMatcher | None = None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all collected yet (its prompt must then be computed, not
        taken from the prefix cache: the LM head runs at every prompt position)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def history(self):
        """The tokens the sampler's history knobs read (`minisys.sampling.History`)."""
        from ..sampling import History
        return History(self.prompt_token_ids, self.output_token_ids, self.eos_token_ids)

    @property
    def client_key(self) -> str:
        """The client's name for per-client accounting ("" for requests that name none)."""
        return self.client or ""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without concatenating the prompt and the output first."""
        P = len(self.prompt_token_ids)
        if end <= P:
            return self.prompt_token_ids[start:end]
        if start >= P:
            return self.output_token_ids[start - P:end - P]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - P]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def transition(self, new: RequestStatus) -> None:
        if new not in ALLOWED_TRANSITIONS[self.status]:
            raise IllegalTransition(f"request {self.request_id!r}: {self.status.name} -> {new.name} "
                                    f"is not allowed (allowed: {sorted(s.name for s in ALLOWED_TRANSITIONS[self.status])})")
        self.status = new
