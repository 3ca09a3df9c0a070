"""One engine step on the device: assemble the flat batch, run one forward, sample.

Batch assembly (the scheduler said which requests feed how many tokens):

    input_ids    (T,)  the fed tokens of every request, concatenated
    positions    (T,)  num_computed, num_computed + 1, ... per request
    slot_mapping (T,)  where each fed token's K/V are written in the pool
    block_tables (B, max_blocks)   each request's blocks (the paged attention reads them)
    LM-head rows                   the last fed token of each request that samples (+ its k drafts'
                                   positions when speculating): the LM head runs only there;
                                   then, for a request that asks for prompt logprobs, every fed
                                   prompt position whose next prompt token has no logprob yet

A prefill chunk and a decode token look the same here: a run of ``n >= 1``
tokens after ``num_computed`` cached ones, so prefills and decodes share one
forward. Sampling is per request with its own `SamplingParams` and its own
``torch.Generator`` (`minisys.sampling`, the sampler the eager baseline uses
too), so a seeded request draws the same tokens whatever it is batched with;
`minisys.spec.verify.verify_rows` turns the logits into tokens, with or
without drafts.

Structured outputs: the emitting requests with a grammar matcher get their
token bitmasks filled on a background thread (`minisys.structured.MaskFiller`)
submitted before the forward and collected after it, so the fill overlaps the
forward; the masks are applied in the batched sampler.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention.base import AttentionMetadata
from ..kv.block_allocator import BlockAllocator
from ..kv.paged import PagedKVCache
from ..model.llama import LlamaModel
from ..sampling import token_logprobs
from ..spec.verify import verify_rows
from ..structured.mask import MaskFiller, RowMasks
from .cuda_graph import CudaGraphSpec, GraphRunner
from .scheduler import SchedulerOutput


@dataclass
class StepBatch:
    input_ids: torch.Tensor         # (T,) int64
    positions: torch.Tensor         # (T,) int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor    # (B,) int64


def build_batch(out: SchedulerOutput, allocator: BlockAllocator, device) -> StepBatch:
    """The flat batch of one step (lists built once per step, one tensor each)."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    tables: list[list[int]] = []
    seqlens_q: list[int] = []
    context_lens: list[int] = []
    bs = allocator.block_size
    for s in out.scheduled:
        req, start = s.request, s.request.num_computed_tokens
        end = start + s.num_tokens
        blocks = allocator.tables[req.request_id].block_ids
        ids += req.token_slice(start, min(end, req.num_tokens)) + s.spec_token_ids   # drafts fed after the last
        positions += range(start, end)
        slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
        tables.append(blocks)
        seqlens_q.append(s.num_tokens)
        context_lens.append(start)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)   # (B, max_blocks)
    meta = AttentionMetadata(seqlens_q=seqlens_q, context_lens=context_lens,
                             slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                             block_tables=bt.to(device))
    return StepBatch(torch.tensor(ids, dtype=torch.long, device=device),
                     torch.tensor(positions, dtype=torch.long, device=device), meta,
                     meta.last_token_indices(device))


class ModelRunner:
    """Owns the paged KV pool; `execute` runs one scheduled step and returns the tokens each request emits.

    A request whose chunk stops inside its prompt (chunked prefill) emits
    nothing: its K/V are written, nothing is sampled, its generator is
    untouched. A decoding request emits one token; a speculating one (it fed
    its last token + k drafts, lesson 06) emits its accepted drafts + one.

    Logprobs come from the same forward's logits (`minisys.sampling.token_logprobs`):
    after `execute`, ``last_logprobs[i]`` (i: index in ``out.scheduled``) is
    ``{"sampled": [(token, logprob, rank, top ids, top logprobs)], "prompt": [...]}``
    for the requests that asked (``"prompt"``: one tuple per newly covered prompt token, in order).
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int,
                 cuda_graphs: CudaGraphSpec | None = None) -> None:
        """``cuda_graphs``: decode steps through `GraphRunner` (its scratch block is one extra pool block)."""
        self.model = model
        # sized by this rank's own KV heads (all of them without tensor parallelism)
        extra = 1 if cuda_graphs else 0
        self.cache = PagedKVCache(model.local_config, num_blocks + extra, block_size, model.dtype, model.device)
        self.graphs, self.graph_error = None, None
        if cuda_graphs:
            try:
                self.graphs = GraphRunner(model, self.cache, cuda_graphs, scratch_block=num_blocks)
            except Exception as exc:                 # a capture that fails leaves decode eager, and says why
                self.graph_error = f"CUDA graph capture failed, decode runs eagerly: {type(exc).__name__}: {exc}"
                logging.getLogger(__name__).warning(self.graph_error)
        self.last_logprobs: dict[int, dict[str, list[tuple]]] = {}
        self.masks = MaskFiller()          # structured outputs: bitmask fills overlapped with the forward

    def forward(self, block_copies: list[tuple[int, int]], batch: StepBatch,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Copy-on-write the step's blocks, then one forward: logits (len(logits_indices), V).

        The one place the model runs: the tensor-parallel runner (`minisys.engine.tp_model_runner`)
        broadcasts these arguments to its workers, then calls this on rank 0."""
        for src, dst in block_copies:
            self.cache.copy_block(src, dst)
        if self.graphs is not None and self.graphs.can_run(batch.meta, logits_indices.numel()):
            return self.graphs.run(batch.input_ids, batch.positions, batch.meta)    # (B, V), a static buffer
        return self.model(batch.input_ids, batch.positions, batch.meta, kv_cache=self.cache,
                          logits_indices=logits_indices)

    @property
    def failure(self) -> str | None:
        """Why this runner can no longer run a step (a tensor-parallel worker died); None when healthy."""
        return None

    def shutdown(self) -> None:
        """Release what the runner started (nothing here; the tensor-parallel runner stops its workers)."""

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, allocator: BlockAllocator) -> list[list[int]]:
        """One forward over every scheduled token; the LM head runs only at the rows that sample.

        Those rows are, per emitting request, its last ``1 + k`` fed positions
        (k = its drafts, 0 without speculation): the target's next-token
        distributions after the last token and after each draft.
        """
        batch = build_batch(out, allocator, self.model.device)
        emitting = [s for s in out.scheduled if s.samples]               # chunks inside a prompt: none
        constrained = [e for e, s in enumerate(emitting) if s.request.structured is not None]
        self.masks.submit([emitting[e].request.structured for e in constrained])   # runs during the forward
        try:
            picked = self._forward_and_sample(out, batch, emitting, constrained)
        except BaseException:
            self.masks.discard()                                         # a failed step leaves nothing pending
            raise
        it = iter(picked)
        return [next(it) if s.samples else [] for s in out.scheduled]


    def _forward_and_sample(self, out: SchedulerOutput, batch, emitting: list, constrained: list[int]) -> list:
        """The forward, the logprobs asked for, and the tokens picked (one list per emitting request)."""
        ends = batch.meta.cu_seqlens_q[1:].tolist()
        rows = [r for s, end in zip(out.scheduled, ends) if s.samples
                for r in range(end - 1 - len(s.spec_token_ids), end)]
        num_sampling = len(rows)
        prompt_rows: list[tuple[int, list[int]]] = []        # (scheduled index, the prompt tokens scored)
        for i, (s, end) in enumerate(zip(out.scheduled, ends)):
            req = s.request
            if not req.needs_prompt_logprobs:
                continue
            start = req.num_computed_tokens
            first = max(start, len(req.prompt_logprobs) - 1)     # position j scores prompt token j + 1
            last = min(start + s.num_tokens, req.num_prompt_tokens - 1)
            assert start <= len(req.prompt_logprobs) - 1 or first >= last, "prompt logprobs would skip tokens"
            if first < last:
                base = end - s.num_tokens - start                # flat row of position 0
                rows += [base + j for j in range(first, last)]
                prompt_rows.append((i, req.prompt_token_ids[first + 1:last + 1]))
        logits = self.forward(out.block_copies, batch,
                              torch.tensor(rows, dtype=torch.long, device=self.model.device))
        self.last_logprobs = {}
        if prompt_rows:
            r = num_sampling
            for i, toks in prompt_rows:
                k = out.scheduled[i].request.params.prompt_logprobs
                self.last_logprobs.setdefault(i, {})["prompt"] = token_logprobs(logits[r:r + len(toks)], toks,
                                                                                [k] * len(toks))
                r += len(toks)
        logits = logits[:num_sampling]
        want = [(e, row) for e, (s, row) in enumerate(zip(emitting, _starts(emitting)))
                if s.request.params.logprobs is not None]
        raw = logits[[row for _, row in want]] if want else None     # a copy: the raw logits, whatever the sampler does
        bitmask = self.masks.result()                                    # (len(constrained), W) or None
        masks = RowMasks(constrained, bitmask) if constrained else None
        picked = verify_rows(logits, emitting, masks) if emitting else []               # logits (rows, V)
        if want:
            assert not any(emitting[e].spec_token_ids for e, _ in want), "logprobs with speculative decoding"
            lps = token_logprobs(raw, [picked[e][0] for e, _ in want],
                                 [emitting[e].request.params.logprobs for e, _ in want])
            index = {id(s): i for i, s in enumerate(out.scheduled)}
            for (e, _), lp in zip(want, lps):
                self.last_logprobs.setdefault(index[id(emitting[e])], {})["sampled"] = [lp]
        return picked

def _starts(emitting: list) -> list[int]:
    """Each sampling request's first row among the sampling rows (1 + k rows each)."""
    starts, r = [], 0
    for s in emitting:
        starts.append(r)
        r += 1 + len(s.spec_token_ids)
    return starts
