"""A Llama-architecture decoder (Llama, SmolLM2, Qwen2) over a flat token batch.

    tokens -> embed -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head

`forward` takes the new tokens of every sequence in the step packed into one
1-D tensor, their positions, and `AttentionMetadata` saying which rows belong
to which sequence. The attention backend and the KV cache are plugged in
from outside, so later lessons swap them without touching this file.

The contract between them, in `Attention.forward`: the cache *writes* the new
tokens' K/V (``kv_cache.write``) and hands back a view of what the step may
attend to (``kv_cache.read``); the view calls the backend's method for its
kind: ``forward_packed`` for packed K/V (contiguous cache, or no cache),
``forward_paged`` for a paged cache's block pools (`minisys.attention.views`).

Tensor parallelism (lesson 13) is this same file built with ``tp_size > 1``:
rank ``tp_rank`` holds its own heads (q/k/v column-parallel, o row-parallel),
its slice of the MLP (gate/up column-, down row-parallel) and of the
vocabulary (`minisys.parallel.linear`); every rank runs `forward` on the same
batch and the row-parallel layers' all-reduces make their outputs whole.
Heads go by whole KV-head groups (`minisys.parallel.shard.head_shard`), so a
rank's KV cache holds only its own KV heads (``local_config``). With
``tp_size == 1`` every parallel layer is the plain `nn.Linear`/`nn.Embedding`.

Batch-1 decode (lesson 04, ``python -m minisys bench latency``): a decode step
of one sequence streams every weight once, so the loader prepares the model
for that (``load(..., fuse=False, input_major=False)`` keeps the plain one):
`fuse_projections` turns q/k/v and gate/up into one matmul each (per rank,
from its own shards), `store_input_major` lays fp32 CPU weights out for fast
matrix-vector products, and the forward looks RoPE's rows up once, not per layer.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..attention import AttentionBackend, AttentionMetadata, PackedKV, get_backend
from ..kv.base import KVCache
from ..parallel.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                               VocabParallelEmbedding)
from ..parallel.shard import head_feature_sizes, head_shard
from .config import ModelConfig
from . import flat_decode
from .flat_decode import FlatDecoder
from .layers import RMSNorm, RotaryEmbedding, SwiGLU


class Attention(nn.Module):
    """Self-attention over this rank's heads: all of them when ``tp_size == 1``."""

    def __init__(self, config: ModelConfig, layer_idx: int, rope: RotaryEmbedding,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        heads = head_shard(config, tp_size, tp_rank)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.num_heads, heads.num_kv_heads, config.head_dim
        bias, C, D = config.attention_bias, config.hidden_size, config.head_dim
        q_sizes, kv_sizes = head_feature_sizes(config, tp_size, kv=False), head_feature_sizes(config, tp_size, kv=True)
        tp = dict(tp_rank=tp_rank, tp_size=tp_size)
        self.q_proj = ColumnParallelLinear(C, config.num_heads * D, bias, out_sizes=q_sizes, **tp)
        self.k_proj = ColumnParallelLinear(C, config.num_kv_heads * D, bias, out_sizes=kv_sizes, **tp)
        self.v_proj = ColumnParallelLinear(C, config.num_kv_heads * D, bias, out_sizes=kv_sizes, **tp)
        self.o_proj = RowParallelLinear(config.num_heads * D, C, False, in_sizes=q_sizes, **tp)
        self.rope = rope  # shared by all layers; not a submodule of each
        self.qkv_proj: MergedColumnParallelLinear | None = None          # set by fuse_qkv

    def fuse_qkv(self) -> None:
        """Replace q/k/v by ONE matmul over this rank's rows of each (`MergedColumnParallelLinear`).

        The parameters become ``qkv_proj.weight`` (and ``.bias``): the loader fuses them from the
        checkpoint's q/k/v tensors (`LlamaModel.fuse_projections`). Same math, one kernel instead of three.
        """
        if self.qkv_proj is None:
            self.qkv_proj = MergedColumnParallelLinear.fuse([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, C) -> q (T, Hq, D), k (T, Hkv, D) rotated by RoPE, and v (T, Hkv, D)."""
        T, D, Hq, Hkv = x.shape[0], self.head_dim, self.num_heads, self.num_kv_heads
        if self.qkv_proj is None:                            # the plain path: three matmuls, RoPE twice
            q = self.q_proj(x).view(T, Hq, D)                                # (T, Hq, D)
            k = self.k_proj(x).view(T, Hkv, D)                               # (T, Hkv, D)
            v = self.v_proj(x).view(T, Hkv, D)                               # (T, Hkv, D)
            return self.rope(q, positions), self.rope(k, positions), v
        qkv = self.qkv_proj(x).view(T, Hq + 2 * Hkv, D)                      # one matmul: (T, Hq+2Hkv, D)
        qk = self.rope(qkv[:, :Hq + Hkv], positions)                         # RoPE once, q and k heads together
        return qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv:]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, kv_cache: KVCache | None) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x, positions)                                 # (T, Hq, D), (T, Hkv, D) x 2
        if kv_cache is None:
            kv = PackedKV(k, v)                                          # the new tokens only, (T, Hkv, D)
        else:
            kv_cache.write(self.layer_idx, k, v, meta)                   # store this step's K/V
            kv = kv_cache.read(self.layer_idx, meta)                     # PackedKV (S, Hkv, D) or PagedKV pools
        o = kv.attend(backend, q, meta)   # backend.forward_packed / forward_paged -> (T, Hq, D)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rope: RotaryEmbedding,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, rope, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, tp_rank, tp_size)

    def forward(self, x, positions, meta, backend, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, backend, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's (``model.layers.0.self_attn.q_proj.weight``),
    so a safetensors checkpoint loads with a plain ``load_state_dict``.

    ``tp_rank``/``tp_size``: this module is rank ``tp_rank``'s shard (load it with
    `minisys.model.loader.load_model(..., tp_rank=, tp_size=)`); ``config`` stays the full model's.
    """

    flat_decode = False        # class defaults too: a subclass that skips __init__ (spec's SelfDraftModel)
    _flat = None               # never takes the flat path

    def __init__(self, config: ModelConfig, attention_backend: str | AttentionBackend = "auto",
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.fused = False                                 # fuse_projections() sets it
        self.input_major = False                           # store_input_major() sets it
        self.flat_decode = False      # batch-1 decode steps through `minisys.model.flat_decode` (the loader sets it)
        self._flat = None             # that path's FlatDecoder, built on first use
        heads = head_shard(config, tp_size, tp_rank)       # refuses a tp_size the heads cannot take
        # what this rank's KV cache is sized by: its own heads only
        self.local_config = replace(config, num_heads=heads.num_heads, num_kv_heads=heads.num_kv_heads)
        tp = dict(tp_rank=tp_rank, tp_size=tp_size)
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **tp)
        self.model.layers = nn.ModuleList(DecoderLayer(config, i, self.rope, **tp) for i in range(config.num_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=False, **tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_attention_backend(attention_backend)

    def fuse_projections(self) -> "LlamaModel":
        """Fuse every layer's q/k/v and gate/up projections into one matmul each, in place (the loader's
        default, ``load(..., fuse=True)``). Parameter names become ``self_attn.qkv_proj.*`` and
        ``mlp.gate_up_proj.weight``; outputs are the same up to float rounding. With tensor parallelism each
        rank fuses its own shards, so the fused rows are exactly the rows the rank held. Returns self."""
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv()
            layer.mlp.fuse_gate_up()
        self.fused = True
        self._flat = None                                  # it held the layers this replaced
        return self

    def flat_decoder(self) -> FlatDecoder:
        """The batch-1 decode path over this model's parameters (`minisys.model.flat_decode`)."""
        if self._flat is None:
            self._flat = FlatDecoder(self)
        return self._flat

    def store_input_major(self) -> "LlamaModel":
        """Store every matmul weight input-major, in place: the (out, in) parameter becomes a view of a
        contiguous (in, out) tensor. Same values, same shapes and names, same ``F.linear`` call.

        Why: at batch 1 each linear layer is a matrix-vector product, bound by how fast its weight
        streams from memory. On a CPU in fp32, torch's matmul reads an (in, out) weight row by row,
        scaling each row by one input feature into the output vector, and streams it 1.3-1.5x
        faster than it computes the (out, in) layout's dot products (``python -m minisys bench latency``,
        lesson 04); batched prefills run as fast either way. Not in bf16, where the (out, in) layout
        is faster: the loader applies this to fp32 CPU models only. A single row against such a weight
        runs on numpy's BLAS (`minisys.parallel.linear.linear`), faster again. The tied embedding table is the
        LM head's weight: its lookup gathers columns of the input-major storage
        (`minisys.parallel.linear.embedding_rows`). Returns self.
        """
        seen = set()
        for module in self.modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, nn.Parameter) or w.dim() != 2 or id(w) in seen:
                continue
            seen.add(id(w))                                              # a tied weight once
            w.data = w.data.t().contiguous().t()                         # (out, in) view of (in, out) storage
        self.input_major = True
        return self

    def set_attention_backend(self, backend: str | AttentionBackend) -> None:
        self.attention = get_backend(backend) if isinstance(backend, str) else backend

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache | None = None, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: (T,) -> logits (T, V) in fp32, or (len(logits_indices), V).

        Pass ``logits_indices`` (e.g. ``meta.last_token_indices()``) to run the
        LM head only where a next token is needed: it is the largest matmul
        of a small model.
        """
        run = flat_decode.applies(self, meta, kv_cache, logits_indices)
        if run is not None:                      # one sequence, one token: the flat loop, same arithmetic
            return self.flat_decoder()(input_ids, positions, kv_cache, run)                  # (1, V)
        x = self.model.embed_tokens(input_ids)                           # (T, C)
        with self.rope.once_for(positions):                              # RoPE rows looked up once, not per layer
            for layer in self.model.layers:
                x = layer(x, positions, meta, self.attention, kv_cache)
        if logits_indices is not None:
            x = x[logits_indices]                                        # (B, C)
        return self.lm_head(self.model.norm(x)).float()                  # (T or B, V)

    def forward_sequence(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Convenience: logits (T, V) for one whole sequence, no cache."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(seqlens_q=[ids.numel()], context_lens=[0])
        return self.forward(ids, meta.positions(self.device), meta)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> the last layer's hidden states after the final norm, (T, C),
        in the model's dtype, no KV cache: the input of the LM head (embeddings, lesson 16).
        One process only: a tensor-parallel shard cannot run a forward without its peers (ValueError)."""
        if self.tp_size > 1:
            raise ValueError("embeddings run on one process: not with tensor parallelism "
                             f"(this model is rank {self.tp_rank} of {self.tp_size})")
        x = self.model.embed_tokens(input_ids)                           # (T, C)
        with self.rope.once_for(positions):
            for layer in self.model.layers:
                x = layer(x, positions, meta, self.attention, None)
        return self.model.norm(x)                                        # (T, C)
