"""Routing policies: which replica gets the next request (lesson 14).

A policy sees the request's prompt token ids (or None when the router could
not tokenize it) and one `LoadReport` per replica still in rotation, and
returns one of those replicas' indices. Policies are pure (no I/O, no
clock): the router feeds them what each replica last reported plus what it
sent since (`LoadReport.plus_pending`), and unit tests feed them tables.

* ``round_robin``: replicas in turn, blind to load and prompt (the baseline).
* ``least_loaded``: the replica with the highest *freeness* (Llumnix, OSDI'24):
  ``F = (free_blocks - queued_demand_blocks) / (running + 1)``: the KV blocks
  each running sequence (the newcomer included) could still grow into, once
  the waiting queue has taken what it will ask for. Llumnix's ``F = (M -
  sum V) / B`` with virtual usage = used + queued demand; ``+ 1`` counts the
  request being placed, so an idle replica beats one running one sequence.
  Ties: fewer requests (running + waiting), then the lower index.
* ``prefix_affinity``: requests whose prompts start with the same first full
  KV blocks go to the same replica, where those blocks are already cached
  (SGLang's cache-aware router, with a hash instead of a radix tree). The
  key is a hash of the token ids of the first ``min(affinity_blocks, full
  blocks)`` blocks; the replica is chosen by rendezvous hashing over the
  replicas in rotation (a dead replica moves only its own keys). If that
  replica is overloaded (its freeness below ``overload_ratio`` of the best
  one's, or fewer free blocks, net of demand, than the prompt needs) or the
  prompt has no full block, the request goes to the least-loaded replica.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

POLICIES = ("round_robin", "least_loaded", "prefix_affinity")


@dataclass(frozen=True)
class LoadReport:
    """One replica's ``GET /minisys/load`` (`minisys.server.load`). Invariant: counts are >= 0."""

    free_blocks: int
    total_blocks: int
    block_size: int
    running: int
    waiting: int
    queued_demand_blocks: int
    prefix_queries: int = 0
    prefix_hits: int = 0

    @classmethod
    def from_json(cls, d: dict) -> "LoadReport":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})

    def plus_pending(self, num_requests: int, num_blocks: int) -> "LoadReport":
        """This report with requests the router sent after it was taken counted as waiting demand."""
        return replace(self, waiting=self.waiting + num_requests,
                       queued_demand_blocks=self.queued_demand_blocks + num_blocks)


def freeness(r: LoadReport) -> float:
    """Llumnix's freeness: free blocks net of queued demand, per running sequence (+ the newcomer)."""
    return (r.free_blocks - r.queued_demand_blocks) / (r.running + 1)


def pick_least_loaded(loads: dict[int, LoadReport]) -> int:
    """The replica of highest `freeness`; ties: fewer running + waiting, then the lower index."""
    if not loads:
        raise ValueError("no replica in rotation")
    return min(loads, key=lambda i: (-freeness(loads[i]), loads[i].running + loads[i].waiting, i))


def prefix_key(prompt_ids: Sequence[int], block_size: int, affinity_blocks: int) -> Optional[bytes]:
    """A digest of the first ``min(affinity_blocks, full blocks)`` KV blocks' token ids; None if the
    prompt has no full block (nothing a replica could have cached)."""
    num_blocks = min(affinity_blocks, len(prompt_ids) // block_size)
    if num_blocks == 0:
        return None
    head = prompt_ids[:num_blocks * block_size]
    return hashlib.blake2b(b",".join(str(t).encode() for t in head), digest_size=16).digest()


def rendezvous(key: bytes, replicas: Sequence[int]) -> int:
    """Highest-random-weight hashing: the replica whose hash with ``key`` is largest (stable when
    other replicas leave)."""
    return max(replicas, key=lambda i: hashlib.blake2b(key + i.to_bytes(4, "little"), digest_size=8).digest())


class RoutingPolicy(Protocol):
    name: str

    def choose(self, prompt_ids: Optional[Sequence[int]], loads: dict[int, LoadReport]) -> int: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, prompt_ids, loads: dict[int, LoadReport]) -> int:
        if not loads:
            raise ValueError("no replica in rotation")
        alive = sorted(loads)
        return alive[next(self._turn) % len(alive)]


class LeastLoaded:
    name = "least_loaded"

    def choose(self, prompt_ids, loads: dict[int, LoadReport]) -> int:
        return pick_least_loaded(loads)


@dataclass
class PrefixAffinity:
    """See the module docstring. ``affinity_blocks``: blocks hashed into the key; ``overload_ratio``:
    the affinity replica is overloaded below this fraction of the best freeness."""

    affinity_blocks: int = 4
    overload_ratio: float = 0.5
    name: str = "prefix_affinity"

    def choose(self, prompt_ids, loads: dict[int, LoadReport]) -> int:
        best = pick_least_loaded(loads)
        any_report = loads[best]
        key = None if prompt_ids is None else prefix_key(prompt_ids, any_report.block_size, self.affinity_blocks)
        if key is None:
            return best
        home = rendezvous(key, sorted(loads))
        r = loads[home]
        need = -(-len(prompt_ids) // r.block_size)
        if r.free_blocks - r.queued_demand_blocks < need or freeness(r) < self.overload_ratio * freeness(loads[best]):
            return best
        return home


def make_policy(name: str) -> RoutingPolicy:
    """The policy called ``name`` (one of `POLICIES`); ValueError naming the choices otherwise."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix_affinity":
        return PrefixAffinity()
    raise ValueError(f"--routing-policy must be one of {', '.join(POLICIES)}; got {name!r}")
