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
from typing import Callable

from ..model.llama import LlamaModel
from ..model.tokenizer import Tokenizer
from ..sampling import make_generator, sequence_seed
from ..scheduling.policy import SchedulingPolicy
from ..scheduling.qoe import QoESpec
from ..scheduling.service import ServiceMeter
from ..spec.metrics import SpecMetrics
from ..spec.speculator import Speculator
from ..structured.compiler import GrammarCompiler
from .config import EngineConfig
from .cuda_graph import cuda_graph_spec
from .kv_handoff import KVHandoffMixin, check_transferable
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from .request import Request, check_prompt_ids, check_request_meta
from .sampling_params import RequestOutputKind, SamplingParams
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
    service: ServiceMeter = field(default_factory=ServiceMeter)  # weighted tokens per client (lesson 08)

    @property
    def mean_batch_size(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0


@dataclass
class _Group:
    """A user request: its n sequences (each owns its token ids) and their output processors (each
    owns its text). ``sent[i]``: output tokens of sequence i already returned (DELTA outputs)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Request]
    procs: list[OutputProcessor]
    sent: list[int]
    prompt_sent: int = 0      # prompt logprobs already returned (DELTA outputs)
    hold_after_first: bool = False   # disaggregated prefill: held with its KV after its first token


class LLMEngine(KVHandoffMixin):
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 clock: Callable[[], float] | None = None, policy: SchedulingPolicy | None = None) -> None:
        """``clock``: the scheduler's clock in seconds (default `time.monotonic`; a replay passes a
        virtual one, see `minisys.bench.scheduling`). ``policy``: a `SchedulingPolicy` object instead
        of ``config.scheduling_policy`` (lab 08 plugs its own in)."""
        self.model, self.tokenizer = model, tokenizer
        self.config = (config or EngineConfig()).resolve(model.config, model.dtype, model.device)
        self.scheduler = Scheduler(self.config, clock=clock, policy=policy)
        self.runner = self._make_runner(model)
        self.stats = EngineStats(service=ServiceMeter(self.config.vtc_input_weight, self.config.vtc_output_weight))
        self.speculator = Speculator.from_config(self.config, model, self.stats.spec)   # None: no speculation
        self._groups: dict[str, _Group] = {}
        self._seq_group: dict[str, _Group] = {}
        self._held: dict[str, tuple[_Group, float]] = {}   # KV handoff: held requests, their deadline
        self._grammars: GrammarCompiler | None = None      # built at the first structured-output request

    def _make_runner(self, model: LlamaModel) -> ModelRunner:
        """One process's `ModelRunner`, or rank 0 of ``tensor_parallel_size`` (lesson 13: it starts the
        other ranks as worker processes; `shutdown` stops them)."""
        tp = self.config.tensor_parallel_size
        if getattr(model, "tp_size", 1) != tp:
            raise ValueError(f"tensor_parallel_size={tp} needs rank 0's shard of a model split {tp} ways, got "
                             f"a model split {getattr(model, 'tp_size', 1)} ways (load it with "
                             f"minisys.model.load(..., tp_size={tp}), as LLM does)")
        if tp == 1:
            return ModelRunner(model, self.config.num_kv_blocks, self.config.block_size, cuda_graph_spec(self.config, model))
        from .tp_model_runner import TPModelRunner
        return TPModelRunner(model, self.config.num_kv_blocks, self.config.block_size)

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer step (a tensor-parallel worker died); None while healthy."""
        return self.runner.failure

    def shutdown(self) -> None:
        """Stop what the engine started (tensor-parallel workers); idempotent."""
        self.runner.shutdown()

    # ------------------------------------------------------------ requests in
    def _make_seq(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, index: int,
                  **who) -> Request:
        max_len = self.config.max_model_len
        max_tokens = params.max_tokens or max(max_len - len(prompt_ids), 1)
        if params.max_tokens is None and len(prompt_ids) >= max_len:
            max_tokens = max_len - len(prompt_ids) + 1      # over the context: check_fits refuses it
        gen = None
        if not params.greedy:
            gen = make_generator(sequence_seed(params.seed, index), self.model.device)
        matcher = self.grammars.matcher(params.structured_outputs) if params.structured_outputs else None
        return Request(seq_id, list(prompt_ids), params, gen, max_tokens=max_tokens,
                       eos_token_ids=tuple(self.tokenizer.eos_token_ids),
                       prompt_logprobs=[] if params.prompt_logprobs is None else [None],
                       structured=matcher, **who)

    @property
    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler (its tokenizer info is built on first use, once)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_tokenizer(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    prompt: str | None = None, *, client: str | None = None, priority: int = 0,
                    qoe: QoESpec | None = None, hold_after_first_token: bool = False) -> None:
        """Queue a request (``params.n`` sequences); ValueError, and nothing queued, if it can never
        be served. This is the request's one validation.

        ``client`` (the OpenAI ``user``), ``priority`` (lower first) and ``qoe`` (the reader's
        expected TTFT and pace) are for the scheduling policy (lesson 08); every policy reads them.
        ``hold_after_first_token`` (disaggregated prefill, lesson 14): once its first token is sampled
        the request is held with its KV (`hold_request`) and its output finishes with
        ``kv_transfer_params``; a decode engine takes it over (`minisys.engine.kv_handoff`).
        """
        params = params or SamplingParams()
        request_id = str(request_id)
        if request_id in self._groups or request_id in self._held:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if hold_after_first_token:
            check_transferable(params, "a disaggregated prefill (kv_transfer_params)")
            if self.speculator is not None:
                raise ValueError("kv_transfer_params is not supported with speculative decoding")
        check_prompt_ids(prompt_token_ids, self.model.config.vocab_size)   # context/KV limits: Scheduler.add
        check_request_meta(client, priority, qoe)
        params.check_vocab(self.model.config.vocab_size)
        if self.speculator is not None and (params.logprobs is not None or params.prompt_logprobs is not None):
            name = "logprobs" if params.logprobs is not None else "prompt_logprobs"
            raise ValueError(f"{name} is not supported with speculative decoding: serve this request "
                             "without speculation")
        if self.speculator is not None and params.history_knobs:
            raise ValueError(f"{params.history_knobs[0]} is not supported with speculative decoding "
                             "(verification does not apply it): serve this request without speculation")
        so = params.structured_outputs
        if so is not None:
            if self.speculator is not None:
                raise ValueError(f"{so.field_name} (structured outputs) is not supported with speculative "
                                 "decoding: serve this request without speculation")
            self.grammars.compile(so)               # ValueError naming the field if it does not compile
        seqs = [self._make_seq(f"{request_id}#{i}", prompt_token_ids, params, i,
                               client=client, priority=priority, qoe=qoe) for i in range(params.n)]
        self.scheduler.add(*seqs)                   # the context and KV-pool limits, checked once
        procs = [OutputProcessor(self.tokenizer, params, len(prompt_token_ids), self.config.max_model_len,
                                 s.structured) for s in seqs]
        group = _Group(request_id, prompt, list(prompt_token_ids), params, seqs, procs, [0] * len(seqs),
                       hold_after_first=hold_after_first_token)
        for s in seqs:
            self._seq_group[s.request_id] = group
        self._groups[request_id] = group

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is not in the engine."""
        if self.release_held(str(request_id), "abort"):
            return True
        group = self._groups.pop(str(request_id), None)
        if group is None:
            return False
        for s in group.seqs:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")
            if self.speculator is not None:
                self.speculator.release(s.request_id)
            self._seq_group.pop(s.request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._groups)

    def request_ids(self) -> list[str]:
        """The ids of the requests not yet finished or aborted."""
        return list(self._groups)

    # ------------------------------------------------------------ one iteration
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, process the new tokens; return the outputs of the requests touched."""
        spec = self.speculator
        if spec is None:
            sched = self.scheduler.schedule()
        else:                                       # lesson 06: slots for the drafts the pool can fit
            sched = self.scheduler.schedule(spec.propose(self.scheduler.running))
        self.stats.preemptions += len(sched.preempted) + len(sched.displaced)
        if sched.is_empty:
            return []
        token_lists = self.runner.execute(sched, self.scheduler.allocator)   # [] for a chunk inside a prompt
        logprobs = self.runner.last_logprobs                  # {scheduled index: its logprobs}, if asked
        self.scheduler.update_computed(sched)
        touched: dict[str, _Group] = {}
        generated = 0
        for k, (s, tokens) in enumerate(zip(sched.scheduled, token_lists)):
            lps = logprobs.get(k, {})
            s.request.prompt_logprobs += [self._entry(*lp) for lp in lps.get("prompt", [])]
            if not tokens:
                continue
            req = s.request
            req.logprobs += [self._entry(*lp) for lp in lps.get("sampled", [])]
            group = self._seq_group[req.request_id]
            i = group.seqs.index(req)
            for token in tokens:                    # 1 token, or accepted drafts + 1 when speculating
                req.output_token_ids.append(token)
                generated += 1
                event = group.procs[i].append(token)
                if event.finish_reason is not None:
                    self.scheduler.finish(req, event.finish_reason)
                    if spec is not None:
                        spec.release(req.request_id)
                    break
            if s.spec_token_ids:
                spec.record(len(s.spec_token_ids), tokens)
                if not req.is_finished:             # roll the rejected drafts' KV back
                    self.scheduler.rollback_speculative(s, len(tokens) - 1)
            touched[group.request_id] = group
        self._count(sched, generated)
        outs = []
        for g in touched.values():
            finished = all(s.is_finished for s in g.seqs)
            if g.hold_after_first and not finished and g.seqs[0].output_token_ids:
                outs.append(self._held_output(g))
                continue
            if finished:
                del self._groups[g.request_id]
                for s in g.seqs:
                    self._seq_group.pop(s.request_id, None)
            if finished or g.params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outs.append(self._output(g, finished))
        return outs

    def _held_output(self, g: _Group) -> RequestOutput:
        """Disaggregated prefill: hold the request with its KV; its output ends here ("length", as vLLM's
        max_tokens=1 prefill does) and says where the KV waits (`kv_transfer_params`)."""
        seq = g.seqs[0]
        self.hold_request(g.request_id)
        out = self._output(g, True)
        out.outputs[0].finish_reason = "length"
        out.kv_transfer_params = {"do_remote_prefill": True, "remote_request_id": g.request_id,
                                  "num_tokens": seq.num_tokens, "num_computed_tokens": seq.num_computed_tokens}
        return out

    def _count(self, sched: SchedulerOutput, generated: int) -> None:
        st = self.stats
        st.steps += 1
        st.batch_sizes.append(len(sched.scheduled))
        st.batched_tokens += sched.num_tokens
        st.prefill_tokens += sum(s.num_tokens for s in sched.scheduled if s.is_prefill)
        st.generated_tokens += generated
        st.service.record(sched)
        alloc = self.scheduler.allocator
        st.max_kv_usage = max(st.max_kv_usage, alloc.num_used / alloc.num_blocks)

    def _entry(self, token: int, logprob: float, rank: int, top_ids: list[int], top_lps: list[float]
               ) -> TokenLogprobs:
        """One token's logprobs, vLLM's shape: the token first, then its top alternatives (ranks 1, 2, ...)."""
        def text(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False)
        entry = {token: Logprob(logprob, rank, text(token))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            if t not in entry:
                entry[t] = Logprob(v, r, text(t))
        return entry

    def _output(self, g: _Group, finished: bool) -> RequestOutput:
        """The request's output as ``params.output_kind`` asks: whole so far, or only what is new."""
        outs = []
        delta = g.params.output_kind is RequestOutputKind.DELTA
        want_lp = g.params.logprobs is not None
        for i, (s, p) in enumerate(zip(g.seqs, g.procs)):
            if delta:
                lps = s.logprobs[g.sent[i]:] if want_lp else None
                text, ids, g.sent[i] = p.take_delta(), s.output_token_ids[g.sent[i]:], len(s.output_token_ids)
            else:
                text, ids, lps = p.text, list(s.output_token_ids), list(s.logprobs) if want_lp else None
            outs.append(CompletionOutput(i, text, ids, p.finish_reason, p.stop_reason, lps))
        prompt_lps = None
        # the prompt's logprobs, from any sequence that has them all (one that emitted a token has)
        done = next((s for s in g.seqs if not s.needs_prompt_logprobs), None)
        if g.params.prompt_logprobs is not None and done is not None:
            prompt_lps = (done.prompt_logprobs[g.prompt_sent:] or None) if delta else list(done.prompt_logprobs)
            g.prompt_sent = len(done.prompt_logprobs)
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, outs, finished=finished,
                             prompt_logprobs=prompt_lps)

    @property
    def kv_usage(self) -> float:
        alloc = self.scheduler.allocator
        return alloc.num_used / alloc.num_blocks
