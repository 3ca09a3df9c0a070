"""`LLMEngine`: continuous batching over a paged KV cache (vLLM's engine, small).

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=32))
    engine.add_request("a", prompt_ids, SamplingParams(temperature=0, max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutputs touched this step
            if out.finished: ...

One `step` = `Scheduler.schedule` (who runs, preempting on memory shortage)
-> `ModelRunner.execute` (one forward over every scheduled token, sampling)
-> per sequence, `OutputProcessor.append` (detokenize, stop checks) -> retire
the finished sequences at once, so their blocks serve the next step.

A request with ``n > 1`` is ``n`` independent sequences sharing a request id.
A request that can never be served (empty, token ids outside the vocabulary,
over the context, larger than the whole KV pool) is refused by `add_request`
with a ValueError; everything added finishes, or is aborted by `abort`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..model.llama import LlamaModel
from ..spec.metrics import SpecMetrics
from ..model.tokenizer import Tokenizer
from .config import EngineConfig
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import CompletionOutput, RequestOutput
from .request import Request
from .sampler import make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput


@dataclass
class EngineStats:
    """Counters since the engine was built (`reset` zeroes them)."""

    steps: int = 0
    batch_sizes: list[int] = field(default_factory=list)       # sequences per step
    batched_tokens: int = 0                                    # tokens fed to the model
    prefill_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    max_kv_usage: float = 0.0                                  # fraction of blocks in use, max over steps
    spec: SpecMetrics = field(default_factory=SpecMetrics)     # speculative decoding (lesson 06)

    @property
    def mean_batch_size(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0


@dataclass
class _Group:
    """A user request: its n sequences and their output processors."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    procs: list[OutputProcessor]
    texts: list[str]


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = (config or EngineConfig()).resolve(model.config, model.dtype, model.device)
        self.scheduler = Scheduler(self.config)
        self.runner = ModelRunner(model, self.config.num_kv_blocks, self.config.block_size)
        self.stats = EngineStats()
        self.proposer = make_proposer(self.config, model)          # None unless speculative_method is set
        self._groups: dict[str, _Group] = {}
        self._seq_group: dict[str, _Group] = {}

    # ------------------------------------------------------------ requests in
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (with the reason) when the request could never be served."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        self.scheduler.check_fits(self._make_seq("check", prompt_token_ids, params, 0, make_gen=False))

    def _make_seq(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, index: int,
                  make_gen: bool = True) -> Request:
        max_len = self.config.max_model_len
        max_tokens = params.max_tokens or max(max_len - len(prompt_ids), 1)
        if params.max_tokens is None and len(prompt_ids) >= max_len:
            max_tokens = max_len - len(prompt_ids) + 1      # over the context: check_fits refuses it
        gen = None
        if make_gen and not params.greedy:
            seed = params.seed if params.seed is None or index == 0 else hash((params.seed, index)) & (2**62 - 1)
            gen = make_generator(seed, self.model.device)
        return Request(seq_id, list(prompt_ids), params, gen, max_tokens=max_tokens)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None) -> None:
        """Queue a request (``params.n`` sequences); ValueError if it can never be served."""
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        self.check_request(prompt_token_ids, params)
        seqs = [self._make_seq(f"{request_id}#{i}", prompt_token_ids, params, i) for i in range(params.n)]
        procs = [OutputProcessor(self.tokenizer, params, len(prompt_token_ids), self.config.max_model_len)
                 for _ in seqs]
        group = _Group(request_id, prompt, list(prompt_token_ids), seqs, procs, [""] * len(seqs))
        for s in seqs:
            self.scheduler.add(s)
            self._seq_group[s.request_id] = group
        self._groups[request_id] = group

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is not in the engine."""
        group = self._groups.pop(str(request_id), None)
        if group is None:
            return False
        for s in group.seqs:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")
            if self.proposer is not None:
                self.proposer.release(s.request_id)
            self._seq_group.pop(s.request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._groups)

    # ------------------------------------------------------------ one iteration
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, process the new tokens; return the outputs of the requests touched."""
        draft_probs = self._propose() if self.proposer is not None else {}     # speculative decoding
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        for r in self.scheduler.running + list(self.scheduler.waiting):
            r.spec_token_ids = []                   # the scheduled ones carry theirs in ScheduledRequest
        if sched.is_empty:
            return []
        if any(s.spec_token_ids for s in sched.scheduled):
            token_lists = self.runner.execute_speculative(sched, self.scheduler.allocator, draft_probs)
        else:
            token_lists = [[t] if t is not None else []           # None: a prefill chunk inside the prompt
                           for t in self.runner.execute(sched, self.scheduler.allocator)]
        self.scheduler.update_computed(sched)
        touched: dict[str, _Group] = {}
        generated = 0
        for s, tokens in zip(sched.scheduled, token_lists):
            if not tokens:
                continue
            req = s.request
            group = self._seq_group[req.request_id]
            i = group.seqs.index(req)
            for token in tokens:                    # 1 token, or accepted drafts + 1 when speculating
                req.output_token_ids.append(token)
                generated += 1
                event = group.procs[i].append(token)
                group.texts[i] += event.text_delta
                if event.finish_reason is not None:
                    self.scheduler.finish(req, event.finish_reason)
                    if self.proposer is not None:
                        self.proposer.release(req.request_id)
                    break
            if s.spec_token_ids:
                self._count_speculative(s, tokens)
                if not req.is_finished:             # roll the rejected drafts' KV back
                    self.scheduler.rollback_speculative(s, len(tokens) - 1)
            touched[group.request_id] = group
        self._count(sched, generated)
        outs = [self._output(g) for g in touched.values()]
        for o in outs:
            if o.finished:
                g = self._groups.pop(o.request_id)
                for s in g.seqs:
                    self._seq_group.pop(s.request_id, None)
        return outs

    # ------------------------------------------------------------ speculative decoding (lesson 06)
    def _propose(self) -> dict:
        """Drafts for every running request that is decoding (all its tokens but the last computed).

        k per request is capped so that drafts never pass ``max_tokens`` (so
        never the context or the request's worst-case KV blocks), and the step's
        token budget holds every running request's 1 + k tokens. Sets
        ``req.spec_token_ids``; returns {request_id: q} for sampled draft-model drafts.
        """
        cfg, running = self.config, self.scheduler.running
        room = cfg.max_num_batched_tokens - len(running)
        reqs, ks = [], []
        for r in running:
            if r.num_computed_tokens != r.num_tokens - 1:
                continue
            k = max(0, min(cfg.num_speculative_tokens, r.max_tokens - len(r.output_token_ids) - 1, room))
            if k:
                reqs.append(r)
                ks.append(k)
                room -= k
        if not reqs:
            return {}
        t0 = time.perf_counter()
        proposals = self.proposer.propose(reqs, ks)
        self.stats.spec.draft_seconds += time.perf_counter() - t0
        probs = {}
        for r, p in zip(reqs, proposals):
            r.spec_token_ids = list(p.token_ids)
            if p.draft_probs is not None:
                probs[r.request_id] = p.draft_probs
        return probs

    def _count_speculative(self, s, tokens: list[int]) -> None:
        sp = self.stats.spec
        sp.num_verifications += 1
        sp.proposed += len(s.spec_token_ids)
        sp.accepted += len(tokens) - 1
        sp.emitted += len(tokens)
        sp.draft_forwards = getattr(self.proposer, "forwards", 0)

    def _count(self, sched: SchedulerOutput, generated: int) -> None:
        st = self.stats
        st.steps += 1
        st.batch_sizes.append(len(sched.scheduled))
        st.batched_tokens += sched.num_tokens
        st.prefill_tokens += sum(s.num_tokens for s in sched.scheduled if s.is_prefill)
        st.generated_tokens += generated
        alloc = self.scheduler.allocator
        st.max_kv_usage = max(st.max_kv_usage, alloc.num_used / alloc.num_blocks)

    def _output(self, g: _Group) -> RequestOutput:
        outs = [CompletionOutput(i, g.texts[i], list(s.output_token_ids), p.finish_reason, p.stop_reason)
                for i, (s, p) in enumerate(zip(g.seqs, g.procs))]
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, outs,
                             finished=all(s.is_finished for s in g.seqs))

    @property
    def kv_usage(self) -> float:
        alloc = self.scheduler.allocator
        return alloc.num_used / alloc.num_blocks


def make_proposer(config: EngineConfig, model: LlamaModel):
    """The proposer ``config.speculative_method`` asks for (None when speculation is off)."""
    if config.speculative_method is None:
        return None
    if config.speculative_method == "ngram":
        from ..spec.ngram import NgramProposer
        return NgramProposer(config.ngram_prompt_lookup_max, config.ngram_prompt_lookup_min)
    from ..spec.draft import DraftModelProposer, SelfDraftModel
    if config.speculative_model is None:
        return DraftModelProposer(SelfDraftModel(model, config.draft_layers), model.config.vocab_size)
    from ..model import load
    draft, _ = load(config.speculative_model, device=str(model.device), dtype=model.dtype, quiet=True)
    return DraftModelProposer(draft, model.config.vocab_size)
