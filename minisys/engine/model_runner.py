"""One engine step on the device: assemble the flat batch, run one forward, sample.

Batch assembly (the scheduler said which requests feed how many tokens):

    input_ids    (T,)  the fed tokens of every request, concatenated
    positions    (T,)  num_computed, num_computed + 1, ... per request
    slot_mapping (T,)  where each fed token's K/V are written in the pool
    block_tables (B, max_blocks)   each request's blocks (the paged attention reads them)
    LM-head rows                   the last fed token of each request that samples (+ its k drafts'
                                   positions when speculating): the LM head runs only there

A prefill chunk and a decode token look the same here: a run of ``n >= 1``
tokens after ``num_computed`` cached ones, so prefills and decodes share one
forward. Sampling is per request with its own `SamplingParams` and its own
``torch.Generator`` (`minisys.sampling`, the sampler the eager baseline uses
too), so a seeded request draws the same tokens whatever it is batched with;
`minisys.spec.verify.verify_rows` turns the logits into tokens, with or
without drafts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.base import AttentionMetadata
from ..kv.block_allocator import BlockAllocator
from ..kv.paged import PagedKVCache
from ..model.llama import LlamaModel
from ..spec.verify import verify_rows
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
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, allocator: BlockAllocator) -> list[list[int]]:
        """One forward over every scheduled token; the LM head runs only at the rows that sample.

        Those rows are, per emitting request, its last ``1 + k`` fed positions
        (k = its drafts, 0 without speculation): the target's next-token
        distributions after the last token and after each draft.
        """
        for src, dst in out.block_copies:
            self.cache.copy_block(src, dst)
        batch = build_batch(out, allocator, self.model.device)
        emitting = [s for s in out.scheduled if s.samples]               # chunks inside a prompt: none
        ends = batch.meta.cu_seqlens_q[1:].tolist()
        rows = [r for s, end in zip(out.scheduled, ends) if s.samples
                for r in range(end - 1 - len(s.spec_token_ids), end)]
        logits = self.model(batch.input_ids, batch.positions, batch.meta, kv_cache=self.cache,
                            logits_indices=torch.tensor(rows, dtype=torch.long, device=self.model.device))
        picked = iter(verify_rows(logits, emitting) if emitting else [])                  # logits (rows, V)
        return [next(picked) if s.samples else [] for s in out.scheduled]
