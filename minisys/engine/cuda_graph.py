"""CUDA graphs for decode steps: capture once per batch-size bucket, replay every step (vLLM, nano-vllm).

A decode step of a 135M model launches several hundred small kernels (30
layers x ~15 ops) that each finish in a few microseconds; on a GPU the CPU
cannot launch them as fast as the GPU runs them, so the step costs launch
overhead, not HBM time (lessons/B-gpu.md counts it). A CUDA graph records
the whole step's kernels once and replays them with one launch.

A graph replays fixed addresses and fixed shapes, so the step reads its
inputs from **static buffers**, sized for the largest bucket and written
before each replay:

    input_ids    (max_bs,)           the token each sequence feeds
    positions    (max_bs,)           its position
    slot_mapping (max_bs,)           where its K/V go in the pool
    seq_lens     (max_bs,)           its keys after this step (read on the device by the kernel)
    block_tables (max_bs, W)         its blocks, W = ceil(max_model_len / block_size)
    logits       (max_bs, V)         the step's output, copied in by the graph

A batch of n sequences runs the graph of the smallest bucket b >= n
(`capture_sizes`: 1, 2, 4, 8, then every 16, as nano-vllm). Rows n..b-1 are
**padding** and must not touch real state: they feed token 0 at position 0,
write their K/V into a **scratch block** (one extra block of the pool that
the allocator never hands out), read one key of it, and their logits are
dropped. Unused block-table columns also point at the scratch block, so
every entry is a valid block id (`decode_static` reads them all).

Attention inside the graph reads the lengths from ``seq_lens`` on the device
(``meta.seq_lens_tensor``): the Triton kernel on CUDA, `decode_static` on CPU.
RoPE's range check (``int(positions.max())``, a host sync that a capture
forbids; the model's forward does it once on entry, `RotaryEmbedding.once_for`,
and each layer's RoPE after it) is replaced during the static forward by
`UncheckedRope`, in the layers and as the model's own: the
positions are below ``max_model_len``, which `EngineConfig.resolve` keeps within the
model's context.

On CPU there is nothing to capture: ``run`` calls the same static-buffer
forward directly, so the tests check on CPU that the padded, static step
gives the eager step's logits for every bucket.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..attention.base import AttentionMetadata
from ..kv.paged import PagedKVCache
from ..model.llama import LlamaModel


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch-size buckets: 1, 2, 4, 8, 16, 32, 48, ... up to max_num_seqs (which is always one)."""
    sizes = [s for s in [1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)] if s <= max_num_seqs]
    return sizes if sizes[-1] == max_num_seqs else [*sizes, max_num_seqs]


def pick_bucket(sizes: list[int], n: int) -> int | None:
    """The smallest bucket holding n sequences, or None when n is larger than all of them."""
    return next((s for s in sizes if s >= n), None)


@dataclass(frozen=True)
class CudaGraphSpec:
    """What the graph runner is sized by: the engine's batch limit and context length."""

    max_num_seqs: int
    max_model_len: int


class UncheckedRope(nn.Module):
    """`RotaryEmbedding`'s math without its host-side range check (the batch was checked on the host)."""

    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.inner = rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (T, H, D), positions: (T,) -> rotated x, same shape and dtype."""
        return self.inner.forward_rotate_half(x, positions)

    def once_for(self, positions: torch.Tensor) -> contextlib.AbstractContextManager:
        """Nothing to look up ahead: `RotaryEmbedding.once_for` checks the range on the host (a sync a
        capture forbids); here each layer gathers its rows on the device, inside the graph."""
        return contextlib.nullcontext()


@contextlib.contextmanager
def unchecked_rope(model: LlamaModel):
    """Every layer's RoPE, and the model's own (whose ``once_for`` its forward enters), swapped for
    `UncheckedRope` inside the block, put back after it."""
    layers = [layer.self_attn for layer in model.model.layers]
    saved, saved_model = [a.rope for a in layers], model.rope
    swap = UncheckedRope(saved_model)
    for a in layers:
        a.rope = swap
    model.rope = swap
    try:
        yield
    finally:
        model.rope = saved_model
        for a, rope in zip(layers, saved):
            a.rope = rope


class GraphRunner:
    """Decode steps through static buffers: replayed CUDA graphs on CUDA, a plain call on CPU.

    Invariant: block ``scratch_block`` of ``cache`` belongs to no sequence (the pool has one block more
    than the allocator hands out); padding rows write and read only there.
    """

    def __init__(self, model: LlamaModel, cache: PagedKVCache, spec: CudaGraphSpec, scratch_block: int) -> None:
        self.model, self.cache, self.scratch_block = model, cache, scratch_block
        self.sizes = capture_sizes(spec.max_num_seqs)
        self.width = -(-spec.max_model_len // cache.block_size)              # W: blocks of the longest sequence
        n, dev = self.sizes[-1], model.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.block_tables = torch.full((n, self.width), scratch_block, dtype=torch.long, device=dev)
        self.logits = torch.zeros(n, model.config.vocab_size, dtype=torch.float32, device=dev)
        self.metas = {b: AttentionMetadata(seqlens_q=[1] * b, context_lens=[0] * b,
                                           slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
                                           seq_lens_tensor=self.seq_lens[:b]) for b in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if dev.type == "cuda":
            self.capture()

    def can_run(self, meta: AttentionMetadata, num_logits: int) -> bool:
        """A decode-only step whose batch fits a bucket and wants every row's logits (no prompt logprobs)."""
        return (meta.is_decode_only and meta.num_seqs <= self.sizes[-1] and num_logits == meta.num_seqs
                and meta.block_tables is not None and meta.block_tables.shape[1] <= self.width)

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copy the step into the static buffers, padding rows after the real ones; returns the bucket."""
        n = meta.num_seqs
        bucket = pick_bucket(self.sizes, n)
        scratch_slot = self.scratch_block * self.cache.block_size
        self.input_ids[n:bucket].zero_()
        self.positions[n:bucket].zero_()
        self.slot_mapping[n:bucket].fill_(scratch_slot)
        self.seq_lens[n:bucket].fill_(1)
        self.block_tables[:bucket].fill_(self.scratch_block)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(torch.tensor(meta.seqlens_k, dtype=torch.long))
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables)
        return bucket

    def static_forward(self, bucket: int) -> torch.Tensor:
        """One decode step of ``bucket`` rows on the static buffers; logits land in ``self.logits[:bucket]``."""
        with unchecked_rope(self.model):
            out = self.model(self.input_ids[:bucket], self.positions[:bucket], self.metas[bucket],
                             kv_cache=self.cache)                              # (bucket, V) fp32
        self.logits[:bucket].copy_(out)
        return self.logits[:bucket]

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool (CUDA only)."""
        pool = None
        self.seq_lens.fill_(1)
        self.slot_mapping.fill_(self.scratch_block * self.cache.block_size)   # capture writes only scratch
        for b in reversed(self.sizes):
            self.static_forward(b)                                             # warm-up: compiles the kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.static_forward(b)
            pool = pool or graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The step's logits (n, V): a graph replay on CUDA, the static forward on CPU. The result is a view
        of the static output buffer, valid until the next step."""
        bucket = self.prepare(input_ids, positions, meta)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            out = self.logits[:bucket]
        else:
            out = self.static_forward(bucket)
        return out[:meta.num_seqs]


def cuda_graph_spec(config, model: LlamaModel) -> CudaGraphSpec | None:
    """The engine's graph sizing, or None when decode runs eagerly: ``enforce_eager``, not CUDA, no triton
    or shapes the kernel does not take (the plain-torch static path reads every block-table column: too
    slow to be worth a graph), a backend other than ``auto``, or a tensor-parallel shard (its peers run
    eagerly). ``config`` is a resolved `EngineConfig`."""
    from ..attention.auto import AutoAttention, kernel_fits, triton_decode_module
    if config.enforce_eager or model.device.type != "cuda" or getattr(model, "tp_size", 1) > 1:
        return None
    if not isinstance(model.attention, AutoAttention) or triton_decode_module() is None:
        return None
    if not kernel_fits(model.config.head_dim, config.block_size):
        return None
    return CudaGraphSpec(max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len)
