"""Handing a request and its KV from one engine to another (lesson 14): the engine's half.

No transport here (that is `minisys.cluster.kv_transfer`): only what one
engine does with its own requests, blocks and pool, on the engine's thread.

    src.hold_request(rid)                    # stop scheduling it, keep its blocks (a prefill, or
                                             # a migration's stop-and-copy)
    snap = src.snapshot(rid)                 # tokens, sampling state, seeded generator state
    k, v = src.read_kv(src.block_ids(rid))   # (L, nb, bs, Hkv, D) each: a copy of its blocks
    dst.import_request(snap, k, v, streamed=...)   # RUNNING on dst, decoding, no re-prefill
    src.release_held(rid)                    # its blocks freed on src

What moves (`RequestSnapshot`): the prompt and the generated tokens, how many
tokens have K/V (``num_computed_tokens``: all but the last sampled token,
which the next decode step feeds), the sampling parameters, the resolved
token budget and the state of the request's own ``torch.Generator`` (so a
seeded request draws on dst exactly what it would have drawn on src). The
stop checker and the detokenizer are rebuilt on dst by replaying the
generated tokens through a new `OutputProcessor`: they are pure functions
of those tokens, so the replay reaches src's state exactly (its text, the
held-back tail of a possible stop string).

Refused (ValueError naming the field): ``n > 1``, ``logprobs``,
``prompt_logprobs``, ``structured_outputs`` (their state is not carried),
and speculative decoding on either engine.

Invariants: a held request is in ``scheduler.held`` and in ``_held`` here
with a deadline; `expire_held` frees every held request past its deadline,
so KV waiting for a pull that never comes is never leaked. An import either
becomes RUNNING with exactly ``ceil(num_computed / block_size)`` blocks
written, or changes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .output_processor import OutputProcessor
from .request import Request, RequestStatus
from .sampling_params import SamplingParams

DEFAULT_HOLD_TIMEOUT_S = 30.0     # a held request's KV is freed if nobody pulls it within this long


@dataclass
class RequestSnapshot:
    """Everything a request needs to continue on another engine, besides its KV blocks (picklable)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int                 # tokens whose K/V come with it: num_tokens - 1
    params: SamplingParams
    max_tokens: int                          # the resolved budget of new tokens
    generator_state: torch.Tensor | None     # torch.Generator.get_state() (None: greedy)
    client: str | None = None
    priority: int = 0
    meta: dict = field(default_factory=dict)     # the transport's and the server's extras

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def num_blocks(self, block_size: int) -> int:
        return -(-self.num_computed_tokens // block_size)


def check_transferable(params: SamplingParams, what: str = "a KV transfer") -> None:
    """ValueError naming the field when a request's state cannot move between engines."""
    if params.n != 1:
        raise ValueError(f"n={params.n}: {what} moves one sequence; use n=1")
    for name in ("logprobs", "prompt_logprobs", "structured_outputs"):
        if getattr(params, name) is not None:
            raise ValueError(f"{name} is not supported with {what} (its state is not carried)")


class KVHandoffMixin:
    """`LLMEngine`'s KV handoff methods (see the module docstring). Engine thread only."""

    hold_timeout_s: float = DEFAULT_HOLD_TIMEOUT_S

    # ------------------------------------------------------------ source side
    def _one_seq(self, request_id: str, held: bool | None = None):
        group = self._held.get(request_id, (None, 0))[0] if held is not False else None
        if group is None and held is not True:
            group = self._groups.get(request_id)
        if group is None:
            raise KeyError(f"request {request_id!r} is not {'held' if held else 'in the engine'}")
        return group, group.seqs[0]

    def hold_request(self, request_id: str, timeout_s: float | None = None) -> None:
        """Stop scheduling a decoding request; keep its blocks until `release_held`, `resume_held`,
        `abort` or ``timeout_s`` (default `hold_timeout_s`, then `expire_held` frees them)."""
        if self.speculator is not None:
            raise ValueError("speculative decoding is not supported with KV transfer")
        group, seq = self._one_seq(request_id, held=False)
        check_transferable(group.params)
        self.scheduler.hold(seq)                          # ValueError unless decoding
        del self._groups[request_id]
        self._seq_group.pop(seq.request_id, None)
        self._held[request_id] = (group, time.monotonic() + (timeout_s or self.hold_timeout_s))

    def held_ids(self) -> list[str]:
        return list(self._held)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's blocks, in order (held or running)."""
        _, seq = self._one_seq(request_id)
        return list(self.scheduler.allocator.table(seq.request_id).block_ids)

    def num_computed(self, request_id: str) -> int:
        return self._one_seq(request_id)[1].num_computed_tokens

    def snapshot(self, request_id: str) -> RequestSnapshot:
        """The request's state (held: exact; running: as of the last step)."""
        group, seq = self._one_seq(request_id)
        gen = seq.generator.get_state() if seq.generator is not None else None
        return RequestSnapshot(request_id, group.prompt, list(seq.prompt_token_ids), list(seq.output_token_ids),
                               seq.num_computed_tokens, group.params, seq.max_tokens, gen, seq.client, seq.priority)

    @torch.inference_mode()
    def read_kv(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of those blocks' K and V, (L, nb, block_size, Hkv, D) each."""
        cache = self.runner.cache
        idx = torch.tensor(block_ids, dtype=torch.long, device=cache.k.device)
        return cache.k.index_select(1, idx), cache.v.index_select(1, idx)

    def release_held(self, request_id: str, reason: str = "kv_transferred") -> bool:
        """Free a held request's blocks (its KV was handed over, or nobody wants it); False if not held."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            return False
        seq = entry[0].seqs[0]
        self.scheduler.finish(seq, reason)
        return True

    def resume_held(self, request_id: str) -> bool:
        """A held request decodes here again (its migration failed): Llumnix keeps it on the source.
        False if it is no longer held (aborted meanwhile)."""
        entry = self._held.pop(request_id, None)
        if entry is None:
            return False
        group = entry[0]
        seq = group.seqs[0]
        self.scheduler.unhold(seq)
        self._groups[request_id] = group
        self._seq_group[seq.request_id] = group
        return True

    def expire_held(self, now: float | None = None) -> list[str]:
        """Free every held request past its deadline; return their ids."""
        now = time.monotonic() if now is None else now
        gone = [rid for rid, (_, deadline) in self._held.items() if deadline <= now]
        for rid in gone:
            self.release_held(rid, "abort")
        return gone

    # ------------------------------------------------------------ destination side
    @torch.inference_mode()
    def import_request(self, snap: RequestSnapshot, k: torch.Tensor, v: torch.Tensor, streamed: bool) -> None:
        """Continue ``snap`` here from its K/V ``k``, ``v`` (L, nb, bs, Hkv, D): it decodes at the next
        step. ``streamed``: its client already has every generated token's text (a migration), so
        only new text is output; else (a disaggregated prefill) the first output carries them all.
        ValueError (nothing changed) if it cannot be taken: a bad snapshot, no seat, no blocks."""
        rid = snap.request_id
        if rid in self._groups or rid in self._held:
            raise ValueError(f"request id {rid!r} is already in the engine")
        if self.speculator is not None:
            raise ValueError("speculative decoding is not supported with KV transfer")
        check_transferable(snap.params)
        cache = self.runner.cache
        if snap.num_computed_tokens != snap.num_tokens - 1 or not snap.output_token_ids:
            raise ValueError("an imported request has all tokens but its last sampled one computed")
        want = (cache.k.shape[0], snap.num_blocks(cache.block_size), *cache.k.shape[2:])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"KV of shape {tuple(k.shape)} does not fit this engine's pool: want {want}")
        seq = self._imported_seq(snap)
        if not self.scheduler.admit_imported(seq):
            raise ValueError(f"no room for request {rid!r}: {snap.num_blocks(cache.block_size)} blocks needed, "
                             f"{self.scheduler.allocator.num_free} free, "
                             f"{len(self.scheduler.running)}/{self.config.max_num_seqs} seats taken")
        idx = torch.tensor(self.scheduler.allocator.table(seq.request_id).block_ids, dtype=torch.long,
                           device=cache.k.device)
        cache.k.index_copy_(1, idx, k.to(cache.k.device, cache.k.dtype))
        cache.v.index_copy_(1, idx, v.to(cache.v.device, cache.v.dtype))
        self._adopt(snap, seq, streamed)

    def _imported_seq(self, snap: RequestSnapshot) -> Request:
        gen = None
        if snap.generator_state is not None:
            gen = torch.Generator(device=self.model.device)
            gen.set_state(snap.generator_state)
        seq = Request(f"{snap.request_id}#0", list(snap.prompt_token_ids), snap.params, gen,
                      output_token_ids=list(snap.output_token_ids), num_computed_tokens=snap.num_computed_tokens,
                      max_tokens=snap.max_tokens, eos_token_ids=tuple(self.tokenizer.eos_token_ids),
                      client=snap.client, priority=snap.priority)
        return seq

    def _adopt(self, snap: RequestSnapshot, seq: Request, streamed: bool) -> None:
        """The request's group here: its output processor replayed over the generated tokens."""
        from .llm_engine import _Group
        proc = OutputProcessor(self.tokenizer, snap.params, len(snap.prompt_token_ids), self.config.max_model_len)
        for t in snap.output_token_ids:
            ev = proc.append(t)
            if ev.finish_reason is not None:          # src would have stopped it: a corrupt snapshot
                self.scheduler.finish(seq, "abort")
                raise ValueError(f"request {snap.request_id!r} had already finished ({ev.finish_reason})")
        sent = 0
        if streamed:
            proc.take_delta()
            sent = len(seq.output_token_ids)
        group = _Group(snap.request_id, snap.prompt, list(snap.prompt_token_ids), snap.params, [seq], [proc], [sent])
        self._groups[snap.request_id] = group
        self._seq_group[seq.request_id] = group
        assert seq.status is RequestStatus.RUNNING
