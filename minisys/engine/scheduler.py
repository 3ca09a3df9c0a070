"""Iteration-level scheduling (Orca) over a paged KV pool (PagedAttention), nano-vllm style.

Every engine step calls `Scheduler.schedule`, which decides which requests
run in this one forward and how many tokens each feeds:

1. **Running requests decode** (oldest first): each needs a KV slot for the
   token it feeds. When the pool has no free block, the *newest* running
   request is preempted by recompute: its blocks are freed, its generated
   tokens are kept, and it goes back to the *head* of the waiting queue (it
   was admitted before anything still waiting). If the request itself is the
   newest, it preempts itself.
2. **Prefill**. Prefill-first (``enable_chunked_prefill=False``, lesson 04):
   only when nothing was preempted this step, waiting requests, first come
   first served, join while ``max_num_seqs``, the token budget
   ``max_num_batched_tokens`` and free blocks allow; each prefills its whole
   prompt (prompt + kept output after a preemption, minus any prefix-cache
   hit) in the same forward as the decodes.
   Chunked prefill (``enable_chunked_prefill=True``, lesson 05, Sarathi-Serve):
   the decodes take one token each of the budget; what is left goes, oldest
   first, to running requests still in their prefill, then to waiting
   requests (FCFS, admitted while ``max_num_seqs`` and the blocks allow, and
   only when nothing was preempted this step). Each gets ``min(its remaining
   prompt, what is left of the budget)`` tokens (`split_budget`), so any
   prompt may be cut into chunks over many steps. Blocks for the whole
   prompt are taken at admission, so a later chunk never needs a block.
3. Finished requests are retired by `finish` as soon as the engine sees their
   last token, so their blocks serve the next step's admissions.

*Who* goes first is the scheduling policy's (lesson 08, `minisys.scheduling`,
``EngineConfig.scheduling_policy``): "first" above means the policy's order.
The policy picks the waiting request to admit next (`pick`: FCFS takes the
head of the queue), orders the running requests for preemption
(`order_running`: shortage preempts from the end; FCFS: the newest), may
displace a running request for a waiting one that does not fit (`displace`,
before the decodes; priority and Andes do) and is charged the service each
request gets as it is scheduled (`charge`: VTC counts it). The mechanics
here are the same under every policy.

A running request is either *prefilling* (``num_computed_tokens <
num_tokens``, its KV slots all reserved) or *decoding* (every known token
but the last sampled one computed; that one gets its slot this step). Only a
request whose fed tokens reach its last known token samples (see
`ScheduledRequest.samples`).

Invariants (`check_invariants`): a request is in exactly one of ``waiting``
(WAITING), ``running`` or ``held`` (RUNNING), or none once FINISHED; exactly
the running and held requests hold blocks (a held request is one whose KV is
being handed to another engine, lesson 14: never scheduled, never preempted);
the allocator's own invariants hold; a step
never feeds more than ``max_num_batched_tokens``. Requests that can never
fit (larger than the whole pool, or, without chunked prefill, than one
step's token budget) are refused by `check_fits` before they are queued, so
nothing waits forever.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from ..kv.block_allocator import BlockAllocator
from ..scheduling.policy import SchedulingPolicy, make_policy
from .config import EngineConfig
from .request import Request, RequestStatus

if TYPE_CHECKING:
    import torch

    from ..spec.proposer import Proposal


def split_budget(budget: int, num_decodes: int, remaining: list[int]) -> list[int]:
    """Sarathi-Serve's split of one step's token budget: decodes first, then prefill chunks in line.

    ``num_decodes`` requests take one token each; the prefills, in line
    (oldest first), with ``remaining[i]`` uncomputed prompt tokens each, get
    ``min(remaining[i], what is left)``. Returns the chunk of each (0 once the
    budget is spent), so ``num_decodes + sum(chunks) <= budget`` and a chunk is
    nonzero only if every prefill before it got all its remaining tokens.
    """
    if num_decodes > budget:
        raise ValueError(f"{num_decodes} decodes do not fit a budget of {budget} tokens")
    left, chunks = budget - num_decodes, []
    for r in remaining:
        chunks.append(min(r, left))
        left -= chunks[-1]
    return chunks


class WaitingQueue:
    """The FCFS queue of WAITING requests: deque-like, plus O(1) removal of any request.

    Supports what the scheduler (and the labs) use of a deque: ``append``,
    ``appendleft``, ``popleft``, ``q[0]`` (the head), ``len``, truth and
    iteration head first; and ``remove(req)`` in O(1), so aborting a
    request's ``n`` sequences costs O(n), not a scan of the queue per
    sequence. Invariant: at most one entry per ``request_id`` (a request is
    queued once); the order is the queue order; ``num_waiting(c)`` is the
    number of queued requests of client ``c`` (lesson 08's backlogged clients).
    """

    def __init__(self) -> None:
        self._reqs: OrderedDict[str, Request] = OrderedDict()
        self._clients: Counter[str] = Counter()

    def num_waiting(self, client: str) -> int:
        return self._clients.get(client, 0)

    def clients(self) -> list[str]:
        """The clients with at least one waiting request (VTC's backlogged clients)."""
        return list(self._clients)

    def _drop_client(self, req: Request) -> None:
        c = req.client_key
        self._clients[c] -= 1
        if not self._clients[c]:
            del self._clients[c]

    def append(self, req: Request) -> None:
        self._put(req)

    def appendleft(self, req: Request) -> None:
        self._put(req)
        self._reqs.move_to_end(req.request_id, last=False)

    def _put(self, req: Request) -> None:
        if req.request_id in self._reqs:
            raise ValueError(f"request {req.request_id!r} is already waiting")
        self._reqs[req.request_id] = req
        self._clients[req.client_key] += 1

    def popleft(self) -> Request:
        if not self._reqs:
            raise IndexError("pop from an empty waiting queue")
        req = self._reqs.popitem(last=False)[1]
        self._drop_client(req)
        return req

    def remove(self, req: Request) -> None:
        """Drop ``req`` (ValueError if it is not waiting here)."""
        if self._reqs.get(req.request_id) is not req:
            raise ValueError(f"request {req.request_id!r} is not waiting")
        del self._reqs[req.request_id]
        self._drop_client(req)

    def __getitem__(self, index: int) -> Request:
        if index == 0 and self._reqs:
            return next(iter(self._reqs.values()))
        if index < 0:
            index += len(self._reqs)
        if not 0 <= index < len(self._reqs):
            raise IndexError("waiting queue index out of range")
        return list(self._reqs.values())[index]

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._reqs.values()))

    def __len__(self) -> int:
        return len(self._reqs)

    def __bool__(self) -> bool:
        return bool(self._reqs)

    def __repr__(self) -> str:
        return f"WaitingQueue({[r.request_id for r in self]})"


def prefill_now(req: Request, spec_token_ids: list[int] | None = None) -> bool:
    """Would feeding ``req`` now be prompt work? Not a decode, which feeds only the last sampled
    token (and drafts) with everything before it computed."""
    if spec_token_ids:
        return False
    return req.num_computed_tokens < req.num_tokens - 1 or not req.output_token_ids


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int            # tokens fed this step: request.all_token_ids[computed : computed + num_tokens]
    spec_token_ids: list[int] = field(default_factory=list)   # speculative drafts fed after the last token
    # (then num_tokens == 1 + len(spec_token_ids) and the fed tokens are [last token] + drafts; lesson 06)
    draft_probs: torch.Tensor | None = None    # (k, V) q of sampled drafts; None = one-hot (n-gram, greedy)
    prefill: bool | None = None                # set by the scheduler when it schedules (see is_prefill)

    @property
    def is_prefill(self) -> bool:
        """True when the fed tokens are prompt work (a prompt chunk, or the recompute after a
        preemption), False for a decode (the last sampled token, plus drafts). Fixed when the
        scheduler schedules it, so it stays right after `Scheduler.update_computed`."""
        if self.prefill is not None:
            return self.prefill
        return prefill_now(self.request, self.spec_token_ids)

    @property
    def samples(self) -> bool:
        """True when the fed tokens reach the request's last known token, so it gets a new token.

        Valid between `Scheduler.schedule` and `Scheduler.update_computed`. A
        prefill chunk that stops inside the prompt samples nothing.
        """
        if self.spec_token_ids:                                   # verification: 1 .. k + 1 tokens
            return True
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step's decision: what runs, block copies to do first, and who was preempted.

    ``preempted``: requests preempted because the pool ran out of blocks (no
    admissions that step); ``displaced``: requests the policy preempted so a
    waiting request could start (lesson 08; admissions go on).
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst)
    preempted: list[Request] = field(default_factory=list)
    displaced: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_prefills(self) -> int:
        return sum(1 for s in self.scheduled if s.is_prefill)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Waiting queue + running list over a `BlockAllocator`. ``config`` must be resolved.

    ``clock`` (seconds; default `time.monotonic`) stamps each request's
    ``arrival_time`` and is what time-aware policies (Andes) read. ``policy``:
    a `SchedulingPolicy` object to use instead of ``config.scheduling_policy``
    (lab 08 plugs its own in; give it the same clock).
    """

    def __init__(self, config: EngineConfig, allocator: BlockAllocator | None = None,
                 clock: Callable[[], float] | None = None, policy: SchedulingPolicy | None = None) -> None:
        if config.num_kv_blocks is None or config.max_num_batched_tokens is None:
            raise ValueError("Scheduler needs a resolved EngineConfig (call config.resolve(model_config))")
        self.config = config
        self.allocator = allocator or BlockAllocator(config.num_kv_blocks, config.block_size,
                                                     config.enable_prefix_caching)
        self.waiting = WaitingQueue()              # FCFS; O(1) removal (abort)
        self.running: list[Request] = []          # the policy's order (FCFS: admission order, oldest first)
        # KV handoff (lesson 14): RUNNING requests that keep their blocks but are not scheduled (a prefill
        # waiting for its decode replica to pull the KV, a migration's stop-and-copy); see `hold`
        self.held: dict[str, Request] = {}
        self._arrivals = 0
        self.num_preemptions = 0
        self.clock = clock or time.monotonic
        self.policy: SchedulingPolicy = policy if policy is not None else make_policy(config, self.clock)

    # ------------------------------------------------------------ queue management
    def check_fits(self, req: Request) -> None:
        """Raise ValueError when ``req`` could never run, whatever else is running."""
        worst = req.num_prompt_tokens + req.max_tokens          # prompt + every output token
        if worst > self.config.max_model_len:
            raise ValueError(f"prompt ({req.num_prompt_tokens} tokens) + max_tokens ({req.max_tokens}) = "
                             f"{worst} exceeds the model's context of {self.config.max_model_len} tokens")
        need = self.allocator.blocks_for(worst - 1)              # the last token never needs a slot
        if need > self.allocator.num_blocks:
            raise ValueError(f"request {req.request_id!r} needs up to {need} KV blocks "
                             f"({worst - 1} tokens) but the whole pool has {self.allocator.num_blocks}: "
                             f"raise num_kv_blocks / kv_cache_bytes or lower max_tokens")
        if not self.config.enable_chunked_prefill and worst - 1 > self.config.max_num_batched_tokens:
            # prefill-first: a recompute feeds prompt + output at once
            raise ValueError(f"request {req.request_id!r} may need a prefill of {worst - 1} tokens, over "
                             f"max_num_batched_tokens ({self.config.max_num_batched_tokens})")

    def add(self, *reqs: Request) -> None:
        """Queue new WAITING sequences of ONE user request (its ``n`` samples: same prompt, same
        limits), checked once by `check_fits`; ValueError and nothing queued if they can never run."""
        for req in reqs:
            if req.status is not RequestStatus.WAITING or req.num_computed_tokens:
                raise ValueError(f"request {req.request_id!r} is {req.status.name}, not a new WAITING request")
        if len({(r.num_prompt_tokens, r.max_tokens) for r in reqs}) > 1:
            raise ValueError("sequences added together must share their prompt length and max_tokens")
        self.check_fits(reqs[0])
        now = self.clock()
        for req in reqs:
            req.arrival = self._arrivals
            req.arrival_time = now
            self._arrivals += 1
            self.waiting.append(req)
            self.policy.on_arrival(req, self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Retire a request now (finished or aborted): free its blocks, drop it from its queue."""
        if req.status is RequestStatus.RUNNING:
            if self.held.pop(req.request_id, None) is None:
                self.running.remove(req)
            self.allocator.free(req.request_id)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)              # O(1): see WaitingQueue
        req.transition(RequestStatus.FINISHED)
        req.finish_reason = reason
        self.policy.on_finish(req)

    # ------------------------------------------------------------ KV handoff (lesson 14)
    def hold(self, req: Request) -> None:
        """Stop scheduling a decoding request but keep its blocks (a prefill whose KV waits to be pulled,
        a migration's last round). `unhold` resumes it here; `finish` frees it."""
        if req.status is not RequestStatus.RUNNING or req not in self.running or self._is_prefilling(req):
            raise ValueError(f"request {req.request_id!r} is not decoding here: only a decoding request is held")
        self.running.remove(req)
        self.held[req.request_id] = req

    def unhold(self, req: Request) -> None:
        """A held request decodes here again (its transfer failed or was cancelled)."""
        if self.held.pop(req.request_id, None) is not req:
            raise ValueError(f"request {req.request_id!r} is not held")
        self.running.append(req)

    def admit_imported(self, req: Request) -> bool:
        """Make a request whose first ``req.num_computed_tokens`` tokens' K/V come from another engine
        RUNNING here, decoding: blocks for those tokens (no prefix-cache reuse: every block is written
        by the import). False, nothing changed, without a seat or the blocks."""
        if req.status is not RequestStatus.WAITING or not 0 < req.num_computed_tokens == req.num_tokens - 1:
            raise ValueError(f"request {req.request_id!r}: an import is WAITING with all but its last token computed")
        self.check_fits(req)
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if not self.allocator.allocate(req.request_id, req.token_slice(0, req.num_computed_tokens), use_cache=False):
            return False
        req.arrival, req.arrival_time = self._arrivals, self.clock()
        self._arrivals += 1
        req.transition(RequestStatus.RUNNING)
        self.running.append(req)
        return True

    # ------------------------------------------------------------ the step decision
    def schedule(self, drafts: Mapping[str, Proposal] | None = None) -> SchedulerOutput:
        """This step's decision. ``drafts`` (speculative decoding, lesson 06): {request_id: Proposal}
        from `minisys.spec.Speculator.propose`; each gets slots if the pool has them, else is dropped."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.policy.preempts_for_waiting:
            self._displace(out)
        prefilling = self._schedule_running(out, drafts)
        budget -= sum(s.num_tokens for s in out.scheduled)        # 1 per decode (1 + k with drafts)
        if self.config.enable_chunked_prefill:
            budget = self._schedule_chunks(out, prefilling, budget)
            if not out.preempted:
                self._admit_waiting_chunked(out, budget)
        elif not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _is_prefilling(self, req: Request) -> bool:
        """A running request with uncomputed prompt tokens (all their slots already reserved)."""
        return self.allocator.tables[req.request_id].num_tokens == req.num_tokens > req.num_computed_tokens

    def _schedule_running(self, out: SchedulerOutput,
                          drafts: Mapping[str, Proposal] | None = None) -> list[Request]:
        """Give every decoding request a slot for its next token, preempting the newest on shortage.

        Schedules the decodes (1 token each) and returns the running requests
        still in their prefill (chunked prefill only), oldest first.
        """
        queue = deque(self.policy.order_running(self.running))    # most deserving first (FCFS: oldest)
        kept: list[Request] = []
        prefilling: list[Request] = []
        while queue:
            req = queue.popleft()
            if self._is_prefilling(req):                          # needs no new slot
                kept.append(req)
                prefilling.append(req)
                continue
            draft = drafts.get(req.request_id) if drafts else None
            if draft is not None and self._schedule_speculative(req, draft, out):
                kept.append(req)                                  # last token + its drafts got slots
                continue
            while not (res := self.allocator.append_slot(req.request_id, req.all_token_ids[-1])):
                if queue:                                         # victim: the newest running request
                    self.preempt(queue.pop(), out)
                else:                                             # req is the newest: preempt itself
                    self.preempt(req, out)
                    break
            else:
                if res.copy is not None:
                    out.block_copies.append(res.copy)
                kept.append(req)
                self._put(out, ScheduledRequest(req, 1))
        self.running = kept
        return [r for r in prefilling if r.status is RequestStatus.RUNNING]

    def _schedule_chunks(self, out: SchedulerOutput, prefilling: list[Request], budget: int) -> int:
        """Chunked prefill: the next chunk of each running prefill, oldest first; return the budget left."""
        chunks = split_budget(budget, 0, [r.num_tokens - r.num_computed_tokens for r in prefilling])
        for r, n in zip(prefilling, chunks):
            if n:
                self._put(out, ScheduledRequest(r, n))
        return budget - sum(chunks)

    def _admit_waiting_chunked(self, out: SchedulerOutput, budget: int) -> None:
        """Chunked prefill: admission in the policy's order while a token of budget, a sequence and
        the blocks are left.

        The first chunk of each admitted request is what is left of the budget
        (at most its whole uncached prompt).
        """
        while budget > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.policy.pick(self.waiting)
            if not self._admit(req):
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            budget -= n
            self._put(out, ScheduledRequest(req, n))

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admission in the policy's order while sequences, tokens and blocks allow (stop at the
        first pick that does not fit: nobody jumps it)."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.policy.pick(self.waiting)
            if req.num_tokens > budget:                           # upper bound (no prefix hit)
                break
            if not self._admit(req):
                break
            n = req.num_tokens - req.num_computed_tokens
            budget -= n
            self._put(out, ScheduledRequest(req, n))

    def _admit(self, req: Request) -> bool:
        """Blocks for a waiting request's whole prompt (prefix-cache hits included); on success it
        leaves the queue and becomes RUNNING with its cached tokens counted as computed."""
        alloc = self.allocator.allocate(req.request_id, req.all_token_ids,
                                        use_cache=not req.needs_prompt_logprobs)
        if not alloc:
            return False
        self.waiting.remove(req)
        req.num_computed_tokens = alloc.num_cached_tokens
        req.transition(RequestStatus.RUNNING)
        self.running.append(req)
        return True

    def _put(self, out: SchedulerOutput, s: ScheduledRequest) -> None:
        """Schedule ``s`` and charge its service to the policy (prompt tokens, or decode tokens)."""
        out.scheduled.append(s)
        s.prefill = prefill_now(s.request, s.spec_token_ids)
        if s.prefill:
            self.policy.charge(s.request, s.num_tokens, 0)
        else:
            self.policy.charge(s.request, 0, s.num_tokens)

    def _has_room(self, req: Request) -> bool:
        """A seat and enough free blocks for ``req``'s whole prompt (no prefix hit counted)."""
        return (len(self.running) < self.config.max_num_seqs
                and self.allocator.can_allocate(req.num_tokens))

    def _displace(self, out: SchedulerOutput) -> None:
        """Before the decodes: while the policy's pick does not fit, preempt the running request the
        policy names for it (at most a quarter of the seats per step, so the batch never churns)."""
        for _ in range(max(1, self.config.max_num_seqs // 4)):
            if not self.waiting:
                return
            cand = self.policy.pick(self.waiting)
            if self._has_room(cand):
                return
            victim = self.policy.displace(cand, self.running)
            if victim is None:
                return
            self.running.remove(victim)
            self.preempt(victim, out, displaced=True)

    # ------------------------------------------------------------ speculative decoding (lesson 06)
    def _schedule_speculative(self, req: Request, draft: Proposal, out: SchedulerOutput) -> bool:
        """Reserve slots for the last token + the draft tokens at once; False (nothing changed)
        when the pool cannot hold them all: the request then decodes one token as usual (drafts are
        dropped before anything is preempted for them)."""
        fed = [req.all_token_ids[-1]] + list(draft.token_ids)
        res = self.allocator.append_slots(req.request_id, fed)
        if not res:
            return False
        out.block_copies += [r.copy for r in res if r.copy is not None]
        self._put(out, ScheduledRequest(req, len(fed), list(draft.token_ids), draft.draft_probs))
        return True

    def rollback_speculative(self, s: ScheduledRequest, num_accepted: int) -> None:
        """After verification (and `update_computed`): forget the K/V of the rejected drafts.

        The fed drafts ``spec_token_ids[num_accepted:]`` were rejected: their
        positions stop counting as computed and the block table is truncated
        to the accepted length, freeing blocks that only held rejected drafts.
        Afterwards the table again holds ``req.num_tokens - 1`` tokens.
        """
        rejected = len(s.spec_token_ids) - num_accepted
        if not 0 <= rejected <= len(s.spec_token_ids):
            raise ValueError(f"accepted {num_accepted} of {len(s.spec_token_ids)} drafts")
        req = s.request
        req.num_computed_tokens -= rejected
        self.allocator.truncate(req.request_id, req.num_computed_tokens)

    def preempt(self, req: Request, out: SchedulerOutput, displaced: bool = False) -> None:
        """Preemption by recompute: free the blocks, keep the tokens, re-queue at the head (the
        caller has taken ``req`` out of the running line). ``displaced``: the policy's choice for
        a waiting request (recorded in ``out.displaced``), not a block shortage."""
        self.allocator.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.transition(RequestStatus.PREEMPTED)
        req.transition(RequestStatus.WAITING)
        self.waiting.appendleft(req)
        (out.displaced if displaced else out.preempted).append(req)

    # ------------------------------------------------------------ after the forward
    def update_computed(self, out: SchedulerOutput) -> None:
        """The forward ran: the fed tokens now have K/V in the pool."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_tokens

    # ------------------------------------------------------------ invariants
    def check_invariants(self) -> None:
        ids = [r.request_id for r in self.waiting] + [r.request_id for r in self.running]
        assert len(ids) == len(set(ids)), "a request is queued twice"
        assert all(r.status is RequestStatus.WAITING for r in self.waiting), "non-WAITING request in waiting"
        assert all(r.status is RequestStatus.RUNNING for r in self.running), "non-RUNNING request in running"
        assert len(self.running) <= self.config.max_num_seqs, "more running requests than max_num_seqs"
        assert set(self.allocator.tables) == {r.request_id for r in self.running} | set(self.held), \
            "blocks held by something other than the running (or held) requests"
        assert not set(self.held) & {r.request_id for r in self.running}, "a request both running and held"
        for r in self.running + list(self.held.values()):
            assert self.allocator.tables[r.request_id].num_tokens in (r.num_tokens, r.num_tokens - 1), \
                f"request {r.request_id!r}: allocator and request disagree on its length"
            assert 0 <= r.num_computed_tokens <= r.num_tokens, f"request {r.request_id!r}: bad computed count"
        self.allocator.check_invariants()
