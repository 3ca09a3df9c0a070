"""Baseline (b): static batching, the way serving worked before Orca.

Requests are cut into fixed batches of ``batch_size`` in arrival order; a
batch starts only when the previous one is completely done, and every
sequence of the batch keeps decoding (its extra tokens thrown away, i.e.
padding) until the batch's longest request ends. That is the waste
iteration-level scheduling removes: finished rows still cost compute, and
waiting requests cannot use their slots.

It runs on the same model, paged KV cache, paged attention and sampler as
`LLMEngine`, so a benchmark measures the scheduling policy alone. (Prompts
are not padded here: the flat varlen batch does not need it, which makes this
baseline slightly kinder than a padded implementation.)
"""
from __future__ import annotations

from ..model.llama import LlamaModel
from ..model.tokenizer import Tokenizer
from .output_processor import OutputProcessor
from .outputs import CompletionOutput
from .paged_runner import PagedRunner
from .request import Request
from ..sampling import make_generator, sample_rows
from .sampling_params import SamplingParams


class StaticBatchGenerator:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, batch_size: int = 16, block_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.block_size = model, tokenizer, batch_size, block_size
        self.steps = 0
        self.padded_tokens = 0          # decode rows computed for already finished sequences

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[CompletionOutput]:
        for sp in params:
            if sp.structured_outputs is not None:
                raise ValueError("structured_outputs is not supported by the static-batching baseline: "
                                 "use the engine")
        outs: list[CompletionOutput] = []
        for b in range(0, len(prompts), self.batch_size):
            outs += self._run_batch(prompts[b:b + self.batch_size], params[b:b + self.batch_size])
        return outs

    def _run_batch(self, prompts, params) -> list[CompletionOutput]:
        max_len = self.model.config.max_position_embeddings
        budgets = [sp.max_tokens or max_len - len(p) for p, sp in zip(prompts, params)]
        longest = max(len(p) + m for p, m in zip(prompts, budgets))
        blocks_each = -(-longest // self.block_size)
        runner = PagedRunner(self.model, blocks_each * len(prompts), self.block_size, enable_prefix_caching=False)
        reqs = [Request(str(i), list(p), sp, None if sp.greedy else make_generator(sp.seed, self.model.device),
                        eos_token_ids=tuple(self.tokenizer.eos_token_ids))
                for i, (p, sp) in enumerate(zip(prompts, params))]
        procs = [OutputProcessor(self.tokenizer, sp, len(p), max_len) for p, sp in zip(prompts, params)]
        seq_ids = [r.request_id for r in reqs]
        for r in reqs:
            runner.add(r.request_id, r.prompt_token_ids)
        while True:
            tokens = sample_rows(runner.step(seq_ids), params, [r.generator for r in reqs],   # every row
                                 [r.history() for r in reqs])
            self.steps += 1
            for i, (r, p, t) in enumerate(zip(reqs, procs, tokens)):
                if p.finish_reason is None:
                    r.output_token_ids.append(t)
                    p.append(t)
                else:
                    self.padded_tokens += 1
            if all(p.finish_reason is not None for p in procs):
                break
            for r, t in zip(reqs, tokens):
                runner.append(r.request_id, t)
        for r in reqs:
            runner.free(r.request_id)
        return [CompletionOutput(0, p.text, r.output_token_ids, p.finish_reason, p.stop_reason)
                for r, p in zip(reqs, procs)]
