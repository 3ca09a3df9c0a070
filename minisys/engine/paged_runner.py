"""Run sequences through the model on a paged KV cache (prefill + decode), vLLM style.

The runner pairs a `BlockAllocator` (which blocks) with a `PagedKVCache`
(the tensors) and builds each step's `AttentionMetadata` (slot mapping and
block tables). It tracks, per sequence, how many tokens already have their
K/V in the pool (``num_computed``); a step feeds every token after that.

    runner = PagedRunner(model, num_blocks=64, block_size=16)
    runner.add("a", prompt_ids)                 # allocate (prefix-cache hits are not recomputed)
    logits = runner.step(["a"])                 # prefill: (1, V)
    runner.append("a", int(logits.argmax()))    # one more slot (copy-on-write if shared)
    logits = runner.step(["a"])                 # decode
    runner.free("a")

It is the lesson-03 driver used by tests and benchmarks; the engine's
scheduler (lesson 04) does the same bookkeeping for many requests.
"""
from __future__ import annotations

import torch

from ..attention.base import AttentionMetadata
from ..kv.block_allocator import Allocation, BlockAllocator
from ..kv.paged import PagedKVCache, block_table_tensor
from ..model.llama import LlamaModel


class PagedRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int = 16,
                 enable_prefix_caching: bool = True, seed: int | None = None, fill: str = "zeros") -> None:
        self.model = model
        self.allocator = BlockAllocator(num_blocks, block_size, enable_prefix_caching, seed)
        self.cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device, fill)
        self.num_computed: dict[object, int] = {}
        self.token_ids: dict[object, list[int]] = {}     # each sequence's tokens (the allocator keeps none)

    def add(self, seq_id, prompt_ids: list[int]) -> Allocation:
        """Allocate a new sequence; raise MemoryError when the pool cannot hold its prompt."""
        res = self.allocator.allocate(seq_id, prompt_ids)
        if not res:
            raise MemoryError(res.reason)
        self.num_computed[seq_id] = res.num_cached_tokens
        self.token_ids[seq_id] = list(prompt_ids)
        return res

    def append(self, seq_id, token_id: int) -> None:
        res = self.allocator.append_slot(seq_id, token_id)
        if not res:
            raise MemoryError(res.reason)
        self.token_ids[seq_id].append(token_id)
        if res.copy is not None:
            self.cache.copy_block(*res.copy)

    def fork(self, parent, child) -> None:
        self.allocator.fork(parent, child)
        self.num_computed[child] = self.num_computed[parent]
        self.token_ids[child] = list(self.token_ids[parent])

    def free(self, seq_id) -> None:
        self.allocator.free(seq_id)
        del self.num_computed[seq_id], self.token_ids[seq_id]

    @torch.no_grad()
    def step(self, seq_ids: list) -> torch.Tensor:
        """Run every not-yet-computed token of each sequence; return (B, V) logits of their last tokens."""
        tables = [self.allocator.table(s) for s in seq_ids]
        starts = [self.num_computed[s] for s in seq_ids]
        device = self.model.device
        feed, slots = [], []
        for s, t, start in zip(seq_ids, tables, starts):
            if start >= t.num_tokens:
                raise ValueError("a sequence has no new token to compute: append one first")
            feed += self.token_ids[s][start:]
            slots += t.slots(start, t.num_tokens)
        meta = AttentionMetadata(
            seqlens_q=[t.num_tokens - s for t, s in zip(tables, starts)], context_lens=starts,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=block_table_tensor([t.block_ids for t in tables], device))
        ids = torch.tensor(feed, dtype=torch.long, device=device)
        logits = self.model(ids, meta.positions(device), meta, kv_cache=self.cache,
                            logits_indices=meta.last_token_indices(device))
        for s, t in zip(seq_ids, tables):
            self.num_computed[s] = t.num_tokens
        return logits

    def greedy_generate(self, prompt_ids: list[int], max_new_tokens: int, seq_id="greedy") -> list[int]:
        """Greedy generation of one sequence; its blocks are freed at the end (full ones stay cached)."""
        self.add(seq_id, prompt_ids)
        out = []
        try:
            for i in range(max_new_tokens):
                token = int(self.step([seq_id])[0].argmax(-1))
                out.append(token)
                if i + 1 < max_new_tokens:
                    self.append(seq_id, token)
        finally:
            self.free(seq_id)
        return out


def paged_greedy_generate(model: LlamaModel, prompt_ids: list[int], max_new_tokens: int,
                          block_size: int = 16) -> list[int]:
    """`minisys.engine.eager.greedy_generate` on a paged cache sized for this one sequence."""
    blocks = -(-(len(prompt_ids) + max_new_tokens) // block_size)
    return PagedRunner(model, blocks, block_size).greedy_generate(prompt_ids, max_new_tokens)
