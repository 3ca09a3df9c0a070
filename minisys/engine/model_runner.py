"""One engine step on the device: assemble the flat batch, run one forward, sample.

Batch assembly (the scheduler said which requests feed how many tokens):

    input_ids    (T,)  the fed tokens of every request, concatenated
    positions    (T,)  num_computed, num_computed + 1, ... per request
    slot_mapping (T,)  where each fed token's K/V are written in the pool
    block_tables (B, max_blocks)   each request's blocks (the paged attention reads them)
    logits_indices (B,)            the last fed token of each request: the LM head runs only there

A prefill chunk and a decode token look the same here: a run of ``n >= 1``
tokens after ``num_computed`` cached ones, so prefills and decodes share one
forward. Sampling is per request with its own `SamplingParams` and its own
``torch.Generator`` (see `sample_rows`), so a seeded request draws the same
tokens whatever it is batched with; greedy rows are argmax-ed together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.base import AttentionMetadata
from ..kv.block_allocator import BlockAllocator
from ..kv.paged import PagedKVCache
from ..model.llama import LlamaModel
from .sampler import apply_temperature, apply_top_k, apply_top_p
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
        table = allocator.tables[req.request_id]
        blocks = table.block_ids
        ids += table.token_ids[start:end]
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
    """Owns the paged KV pool; `execute` runs one scheduled step and returns one token per request.

    A request whose chunk stops inside its prompt (chunked prefill) gets
    ``None``: its K/V are written, nothing is sampled, its generator is untouched.
    """

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, allocator: BlockAllocator) -> list[int | None]:
        for src, dst in out.block_copies:
            self.cache.copy_block(src, dst)
        batch = build_batch(out, allocator, self.model.device)
        rows = [i for i, s in enumerate(out.scheduled) if s.samples]      # chunks inside a prompt: no token
        indices = batch.logits_indices if len(rows) == len(out.scheduled) else batch.logits_indices[rows]
        logits = self.model(batch.input_ids, batch.positions, batch.meta, kv_cache=self.cache,
                            logits_indices=indices)                              # (len(rows), V)
        picked = sample_rows(logits, [out.scheduled[i].request for i in rows]) if rows else []
        tokens: list[int | None] = [None] * len(out.scheduled)
        for i, t in zip(rows, picked):
            tokens[i] = t
        return tokens

    @torch.inference_mode()
    def execute_speculative(self, out: SchedulerOutput, allocator: BlockAllocator,
                            draft_probs: dict | None = None) -> list[list[int]]:
        """Like `execute`, for a step where some requests feed [last token] + k drafts (lesson 06).

        The LM head runs at all k + 1 fed positions of a speculating request
        (p_0 .. p_k: the target's prediction after the last token and after
        each draft) and at the last position of the others, all in this one
        forward; `minisys.spec.verify.verify_rows` turns them into 1 .. k + 1
        emitted tokens per request.
        """
        from ..spec.verify import verify_rows
        for src, dst in out.block_copies:
            self.cache.copy_block(src, dst)
        batch = build_batch(out, allocator, self.model.device)
        ends = batch.meta.cu_seqlens_q[1:].tolist()
        emitting = [i for i, s in enumerate(out.scheduled) if s.samples]   # chunks inside a prompt: none
        rows = [r for i in emitting
                for r in range(ends[i] - 1 - len(out.scheduled[i].spec_token_ids), ends[i])]
        logits = self.model(batch.input_ids, batch.positions, batch.meta, kv_cache=self.cache,
                            logits_indices=torch.tensor(rows, device=self.model.device))   # (rows, V)
        picked = verify_rows(logits, [out.scheduled[i] for i in emitting], draft_probs or {})
        tokens: list[list[int]] = [[] for _ in out.scheduled]
        for i, t in zip(emitting, picked):
            tokens[i] = t
        return tokens


def sample_rows(logits: torch.Tensor, requests) -> list[int]:
    """One token per row of logits (B, V), each request with its own params and generator.

    Greedy rows: one argmax. Sampled rows are grouped by (temperature, top_k,
    top_p) and filtered together; each row then draws ONE uniform number u
    from its own generator and takes the token where its CDF crosses u
    (inverse-CDF sampling). The draw depends only on the request's generator
    and its own logits row, never on its batch companions; and one random
    number per row replaces a ``multinomial`` call per request (the slow part
    of sampling on a CPU).
    """
    tokens = [0] * len(requests)
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if greedy:
        picked = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(requests) \
            else logits.argmax(dim=-1).tolist()
        for i, t in zip(greedy, picked):
            tokens[i] = t
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if not r.params.greedy:
            groups.setdefault((r.params.temperature, r.params.top_k, r.params.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        x = apply_temperature(logits[rows], temperature)                    # (b, V)
        x = apply_top_p(apply_top_k(x, top_k), top_p)
        cdf = torch.softmax(x, dim=-1).cumsum(dim=-1)                      # (b, V)
        u = torch.cat([torch.rand(1, generator=requests[i].generator, device=logits.device) for i in rows])
        idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
        for i, t in zip(rows, idx.clamp_(max=logits.shape[-1] - 1).tolist()):
            tokens[i] = t
    return tokens
