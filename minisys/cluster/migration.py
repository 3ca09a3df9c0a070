"""Live migration of a running request (Llumnix, OSDI 2024): multi-round copy, short stop-and-copy.

A request moves from a source engine to a destination engine with its KV
while it keeps decoding on the source:

    round 1   copy every FULL block the request has (full blocks never change again)
    round 2   copy the blocks that filled up while round 1 was on the wire
    ...       (each round is shorter than the one before: a decode step adds one token)
    final     when what is left is small (`MigrationConfig.stop_threshold_blocks`, or after
              ``max_rounds``): stop the request on the source (held, `LLMEngine.hold_request`), copy
              its remaining blocks (the partial last one included) and its state (tokens, sampling
              state, the seeded generator's state, via `RequestSnapshot`), resume it on the
              destination; the source frees its blocks. Downtime = the final round only.

If the destination refuses or does not answer, the request resumes on the
source (nothing is lost; the destination drops its staged blocks). If the
request finishes, is aborted or is preempted on the source mid-migration,
the migration is abandoned (``migrate_abort``). `plan_copy_round` is the pure
planning rule (lab 14's exercise); `Migration` drives it over a `KVAgent`.

How a client's stream follows the request (the server side, `minisys.server.kv_routes`):

1. The router (or anyone) calls ``POST /minisys/migrate {"request_id": R, "dst_rank": D}`` on the
   replica serving R (R = the ``X-Request-Id`` the router sent with the request). It answers
   ``200 {"migrated": true, "dst_rank": D, "rounds": ..., "blocks": ..., "bytes": ...,
   "downtime_s": ..., "total_s": ..., "round_blocks": [...]}`` once R runs on D, or an error, after
   which R goes on decoding on the source, its stream untouched:
   400: R cannot move (not streamed, n > 1, logprobs, structured outputs, tool parsing, still in
   its prefill) or a bad body / ``dst_rank``; 404: R is not running there; 409: R finished, was
   aborted or preempted meanwhile; 502: the destination refused (no room) or the transfer failed.
   Only streamed requests migrate (a non-streamed response cannot be continued elsewhere); the
   call blocks for the whole migration (rounds + stop-and-copy: ~0.1-0.5 s on this machine).
2. R's SSE stream on the source ends with one internal event, then ``[DONE]``::

       data: {"minisys_migrated": {"request_id": R, "dst_rank": D}}

   (a router must not forward it to the client).
3. ``GET /minisys/attach/R`` on replica D streams the continuation in the same chunk format as
   the original stream (completions or chat; no role chunk again), ending as that stream would
   have ended (finish_reason, the usage chunk if it was asked, ``[DONE]``). The router maps
   rank D to D's URL (the rank is the replica's index) and forwards those chunks to the client.
   If nobody attaches within the attach timeout, D aborts R (no KV block leaked).
   A client that disconnects from the attach stream aborts R on D, as on any replica.

A router following a stream therefore needs: its own request id (sent as ``X-Request-Id``), the
rank -> URL map of its replicas, and to watch each forwarded stream for ``minisys_migrated``.
`minisys.bench.cluster_kv.follow_stream` is a 20-line reference of that loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .kv_transfer import KVAgent, KVTransferError


@dataclass(frozen=True)
class CopyRound:
    """One round: which blocks of the request's table to copy, and whether it is the stop-and-copy."""

    block_indices: list[int]      # indices into the request's block table, ascending
    final: bool


def plan_copy_round(num_computed_tokens: int, block_size: int, num_copied_blocks: int,
                    stop_threshold_blocks: int = 1, force_final: bool = False) -> CopyRound:
    """The next round of a migration, given how many tokens have K/V and how many blocks went already.

    The request's K/V fill ``ceil(num_computed_tokens / block_size)`` blocks, the first
    ``num_computed_tokens // block_size`` of them full (immutable). Blocks
    ``[0, num_copied_blocks)`` have been copied (always full ones). If the blocks still to copy
    number at most ``stop_threshold_blocks`` (or ``force_final``), this is the final round: all of
    them, the partial last one included. Otherwise copy the full blocks not copied yet (possibly
    none, if no block filled since the last round).
    """
    if block_size <= 0 or stop_threshold_blocks < 1:
        raise ValueError("block_size and stop_threshold_blocks must be positive")
    num_full = num_computed_tokens // block_size
    num_blocks = -(-num_computed_tokens // block_size)
    if not 0 <= num_copied_blocks <= num_full:
        raise ValueError(f"{num_copied_blocks} blocks copied, but only {num_full} are full")
    if force_final or num_blocks - num_copied_blocks <= stop_threshold_blocks:
        return CopyRound(list(range(num_copied_blocks, num_blocks)), True)
    return CopyRound(list(range(num_copied_blocks, num_full)), False)


@dataclass(frozen=True)
class MigrationTimeline:
    """What `simulate_migration` predicts: blocks per round, the request's stop, the whole copy."""

    round_blocks: list[int]
    downtime_s: float          # the final round: the request is stopped for its copy
    total_s: float             # from the first round to the end of the final one


def simulate_migration(num_computed_tokens: int, block_size: int, seconds_per_block: float,
                       seconds_per_token: float, stop_threshold_blocks: int = 1,
                       max_rounds: int = 8) -> MigrationTimeline:
    """Llumnix's rounds on a clock: a round of b blocks takes ``b * seconds_per_block`` while the request
    decodes one token per ``seconds_per_token``, so the next round finds the blocks filled meanwhile
    (`plan_copy_round` decides each round; round ``max_rounds`` is forced final). Stop-and-copy alone
    is ``stop_threshold_blocks`` >= the request's blocks: one round, all of it downtime."""
    if seconds_per_block < 0 or seconds_per_token <= 0:
        raise ValueError("seconds_per_block must be >= 0 and seconds_per_token > 0")
    clock, copied, progress, rounds = 0.0, 0, float(num_computed_tokens), []
    while True:
        plan = plan_copy_round(int(progress), block_size, copied, stop_threshold_blocks,
                               force_final=len(rounds) + 1 >= max_rounds)
        took = len(plan.block_indices) * seconds_per_block
        rounds.append(len(plan.block_indices))
        if plan.final:
            return MigrationTimeline(rounds, took, clock + took)
        clock += took
        copied += len(plan.block_indices)
        progress += took / seconds_per_token            # tokens decoded while this round was copied


@dataclass
class MigrationConfig:
    stop_threshold_blocks: int = 1      # stop-and-copy once at most this many blocks are left to copy
    max_rounds: int = 8                 # then stop-and-copy whatever is left (a request outrunning the copy)
    min_round_interval_s: float = 0.0   # wait between rounds (lets a few tokens accumulate)


@dataclass
class MigrationResult:
    request_id: str
    dst_rank: int
    rounds: int = 0
    blocks: int = 0
    bytes: int = 0
    downtime_s: float = 0.0             # from the hold on the source to the destination's acknowledgement
    total_s: float = 0.0
    round_blocks: list[int] = field(default_factory=list)


class MigrationAbandoned(KVTransferError):
    """The request left the source (finished, aborted, preempted) before the migration ended."""


class Migration:
    """Source side of one migration, one round at a time (`step`) or to the end (`run`).

    ``agent.engine_call`` reaches the source engine. Between rounds the engine keeps stepping (the
    server's loop, or a test stepping it by hand: that is how a test lands a round mid-decode).
    """

    def __init__(self, agent: KVAgent, request_id: str, dst_rank: int, config: MigrationConfig | None = None,
                 on_moved: Callable[[str, int], None] | None = None, meta: dict | None = None) -> None:
        """``meta``: extras carried in the snapshot (the server's stream context, for the attach stream)."""
        self.agent, self.request_id, self.dst = agent, request_id, dst_rank
        self.meta = dict(meta or {})
        self.config = config or MigrationConfig()
        self.on_moved = on_moved          # called on the engine thread right after the source lets go
        self.result = MigrationResult(request_id, dst_rank)
        self.copied = 0                   # blocks of the table copied so far
        self._preemptions: int | None = None
        self._block_size: int | None = None
        self.done = False
        self._start = time.perf_counter()

    def begin(self) -> None:
        """Check the request can move, and ask the destination whether it could take it."""
        rid = self.request_id

        def look(engine):
            snap = engine.snapshot(rid)                  # KeyError: not here
            from ..engine.kv_handoff import check_transferable
            check_transferable(snap.params, "migration")
            if engine.speculator is not None:
                raise ValueError("migration is not supported with speculative decoding")
            seq = engine._groups[rid].seqs[0]
            if seq.num_computed_tokens != seq.num_tokens - 1:
                raise ValueError(f"request {rid!r} is still in its prefill: migrate it once it decodes")
            return seq.num_preemptions, engine.scheduler.allocator.block_size, snap
        self._preemptions, self._block_size, snap = self.agent.engine_call(look)
        worst = -(-(len(snap.prompt_token_ids) + snap.max_tokens) // self._block_size)
        self.agent.request(self.dst, {"op": "migrate_begin", "request_id": rid, "num_blocks": worst})

    def step(self) -> bool:
        """One round; True once the request runs on the destination. Raises `MigrationAbandoned` or
        `KVTransferError` (the request then goes on here, its staged copy dropped there)."""
        if self.done:
            return True
        if self._block_size is None:
            self.begin()
        force = self.result.rounds + 1 >= self.config.max_rounds
        try:
            plan, payload = self.agent.engine_call(lambda engine: self._take(engine, force))
        except MigrationAbandoned:
            self._abort_remote()
            raise
        if plan.final:
            return self._finish(plan, payload)
        k, v = payload
        if plan.block_indices:
            self.result.bytes += self.agent.conn.send(self.dst, {"op": "migrate_blocks", "request_id": self.request_id,
                                                                 "block_indices": plan.block_indices}, (k, v))
        self._count(plan)
        return False

    def run(self) -> MigrationResult:
        """Rounds until the request runs on the destination."""
        while not self.step():
            if self.config.min_round_interval_s:
                time.sleep(self.config.min_round_interval_s)
        return self.result

    # ------------------------------------------------------------ internals
    def _take(self, engine, force: bool):
        """Engine thread: plan the round; read its blocks (final: hold the request first)."""
        rid = self.request_id
        group = engine._groups.get(rid)
        if group is None or group.seqs[0].num_preemptions != self._preemptions:
            raise MigrationAbandoned(f"request {rid!r} finished, was aborted or was preempted mid-migration")
        plan = plan_copy_round(engine.num_computed(rid), self._block_size, self.copied,
                               self.config.stop_threshold_blocks, force)
        if plan.final:
            engine.hold_request(rid)
            self._held_at = time.perf_counter()
            ids = engine.block_ids(rid)
            snap = engine.snapshot(rid)
            snap.meta.update(self.meta)
            return plan, (snap, *engine.read_kv([ids[i] for i in plan.block_indices]))
        ids = engine.block_ids(rid)
        return plan, engine.read_kv([ids[i] for i in plan.block_indices])

    def _finish(self, plan: CopyRound, payload) -> bool:
        snap, k, v = payload
        rid = self.request_id
        header = {"op": "migrate_final", "request_id": rid, "block_indices": plan.block_indices,
                  "block_size": self._block_size, "snapshot": snap}
        try:
            self.agent.request(self.dst, header, (k, v))
        except Exception:
            self.agent.engine_call(lambda engine: engine.resume_held(rid))    # Llumnix: it stays here
            raise
        self.result.bytes += sum(t.numel() * t.element_size() for t in (k, v))

        def let_go(engine):
            engine.release_held(rid, "migrated")
            if self.on_moved is not None:
                self.on_moved(rid, self.dst)
        self.agent.engine_call(let_go)
        self.result.downtime_s = time.perf_counter() - self._held_at
        self._count(plan)
        self.result.total_s = time.perf_counter() - self._start
        self.done = True
        return True

    def _count(self, plan: CopyRound) -> None:
        self.result.rounds += 1
        self.result.blocks += len(plan.block_indices)
        self.result.round_blocks.append(len(plan.block_indices))
        self.copied += 0 if plan.final else len(plan.block_indices)

    def _abort_remote(self) -> None:
        try:
            self.agent.conn.send(self.dst, {"op": "migrate_abort", "request_id": self.request_id})
        except Exception:
            pass


def migrate(agent: KVAgent, request_id: str, dst_rank: int, config: MigrationConfig | None = None,
            on_moved: Callable[[str, int], None] | None = None, meta: dict | None = None) -> MigrationResult:
    """Move ``request_id`` to ``dst_rank`` (all rounds); `MigrationResult`. Any failure leaves the request
    decoding here (and raises)."""
    m = Migration(agent, request_id, dst_rank, config, on_moved, meta)
    try:
        return m.run()
    except Exception:
        if not m.done:
            m._abort_remote()
        raise
