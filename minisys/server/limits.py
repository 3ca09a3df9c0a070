"""Bounded admission: what one request, one `user` and the whole server may queue (vLLM has similar knobs).

One HTTP request becomes ``prompts x n`` engine sequences; without a cap a
single body (``{"prompt": ["hi"] * 1000, "n": 128}``) queues 128,000 of them
and the server answers nobody for minutes. `Admission` checks every request
before anything enters the engine:

- per request (400, nothing queued): prompts, ``n``, prompts x n;
- server-wide and per ``user`` (429, "retry later"): sequences and prompt
  tokens admitted and not yet answered. A request that alone is over a
  server-wide limit can never be served: 400.

Every refusal names the limit and its flag. The per-``user`` limit keys on
the OpenAI ``user`` field (client-supplied, unauthenticated: a fairness
knob, not a security boundary; requests without ``user`` share the
server-wide limits only).

Invariant: ``queued_sequences`` / ``queued_tokens`` / ``per_user`` are the
sums over the `Ticket`s admitted and not yet released; `Admission.release`
is idempotent, and the routes release every ticket exactly when its request
is answered, fails or is aborted.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .errors import OpenAIError
from .protocol import MAX_N

MIB = 1 << 20


def _limit(default: int, help: str, status: int) -> int:
    return field(default=default, metadata={"help": help, "status": status})


@dataclass(frozen=True)
class ServerLimits:
    """The server's admission limits; each field is the flag ``--field-name`` (every value >= 1)."""

    max_prompts_per_request: int = _limit(256, "prompts in one /v1/completions request", 400)
    max_n: int = _limit(MAX_N, "choices (n) per request", 400)
    max_sequences_per_request: int = _limit(256, "sequences (prompts x n) per request", 400)
    max_queued_sequences: int = _limit(4096, "sequences admitted and not yet answered, server-wide", 429)
    max_queued_tokens: int = _limit(2 * MIB, "prompt tokens (x n) admitted and not yet answered, "
                                    "server-wide", 429)
    max_queued_sequences_per_user: int = _limit(1024, "sequences admitted and not yet answered per "
                                                "OpenAI `user` field", 429)
    max_program_calls: int = _limit(64, "LLM calls in one /v1/programs program (lesson 16)", 400)
    max_body_bytes: int = _limit(8 * MIB, "request body size in bytes (413 before parsing)", 413)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag(f.name)} must be an integer >= 1, got {value!r}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per `ServerLimits` field, its default in its help."""
    group = parser.add_argument_group("limits", "bounded admission (refused with 400/413/429 naming the limit)")
    for f in dataclasses.fields(ServerLimits):
        group.add_argument(flag(f.name), dest=f.name, type=int, default=f.default,
                           help=f"{f.metadata['help']} (default: {f.default}; over it: {f.metadata['status']})")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})


@dataclass
class Ticket:
    """What one admitted request holds against the limits until `Admission.release`."""

    sequences: int
    tokens: int
    user: Optional[str]
    released: bool = False


def _over(what: str, value: int, name: str, limits: ServerLimits, param: Optional[str]) -> OpenAIError:
    limit = getattr(limits, name)
    return OpenAIError(f"{what} = {value} is over the limit of {limit} ({flag(name)})",
                       status=400, param=param, code=name)


class Admission:
    """Counts what admitted requests hold; refuses what would break a limit. Event-loop only (no lock)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.queued_sequences = 0
        self.queued_tokens = 0
        self.per_user: dict[str, int] = {}

    def check_shape(self, num_prompts: int, n: int) -> None:
        """400 for a request over a per-request limit; 429 when the queue is already too full for it.
        Cheap: made before any tokenization."""
        lim = self.limits
        if num_prompts > lim.max_prompts_per_request:
            raise _over("prompts per request", num_prompts, "max_prompts_per_request", lim, "prompt")
        if n > lim.max_n:
            raise _over("n", n, "max_n", lim, "n")
        seqs = num_prompts * n
        if seqs > lim.max_sequences_per_request:
            raise _over(f"sequences per request ({num_prompts} prompts x n={n})", seqs,
                        "max_sequences_per_request", lim, "n" if num_prompts == 1 else "prompt")
        self._check_queue(seqs, 0, None)

    def admit(self, prompt_lens: list[int], n: int, user: Optional[str]) -> Ticket:
        """Reserve ``len(prompt_lens) x n`` sequences and their prompt tokens, or raise (nothing reserved)."""
        self.check_shape(len(prompt_lens), n)
        seqs, tokens = len(prompt_lens) * n, sum(prompt_lens) * n
        self._check_queue(seqs, tokens, user)
        self.queued_sequences += seqs
        self.queued_tokens += tokens
        if user is not None:
            self.per_user[user] = self.per_user.get(user, 0) + seqs
        return Ticket(seqs, tokens, user)

    def _check_queue(self, seqs: int, tokens: int, user: Optional[str]) -> None:
        """400 if the request alone is over a queue limit (it could never be served), else 429 if it
        does not fit beside what is queued."""
        lim = self.limits
        checks = [("sequences", self.queued_sequences, seqs, "max_queued_sequences"),
                  ("prompt tokens (x n)", self.queued_tokens, tokens, "max_queued_tokens")]
        if user is not None:
            checks.append((f"sequences of user {user!r}", self.per_user.get(user, 0), seqs,
                           "max_queued_sequences_per_user"))
        for what, held, asked, name in checks:
            limit = getattr(lim, name)
            if asked > limit:
                raise _over(f"{what} of this request", asked, name, lim,
                            "user" if name.endswith("per_user") else "prompt")
            if held + asked > limit:
                raise OpenAIError(f"the server is busy: {held} {what} queued + {asked} asked for is over the "
                                  f"limit of {limit} ({flag(name)}); retry later", status=429,
                                  type="rate_limit_error", code=name)

    def release(self, ticket: Optional[Ticket]) -> None:
        """Give back what ``ticket`` holds; a no-op the second time (or for None)."""
        if ticket is None or ticket.released:
            return
        ticket.released = True
        self.queued_sequences -= ticket.sequences
        self.queued_tokens -= ticket.tokens
        if ticket.user is not None:
            left = self.per_user[ticket.user] - ticket.sequences
            if left:
                self.per_user[ticket.user] = left
            else:
                del self.per_user[ticket.user]
