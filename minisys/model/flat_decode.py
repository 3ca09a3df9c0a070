"""One sequence, one new token: the decode step as a flat loop over the layers' weights (lesson 04 §6).

At batch 1 on a CPU a decode step streams every weight once; the matmuls that do it run at the
machine's memory bandwidth. What is left is the thousand small ops between them, each a few
microseconds of Python and dispatch -- and each runs with cold caches, because the matmul before it
has just streamed megabytes of weights through them. `LlamaModel.forward` reaches a layer through
modules, the attention backend's dispatch, the KV cache's write/read and the metadata; this module
does the same arithmetic with none of that:

    x = embed(token)
    for each layer:   q,k,v = split(rope(linear(rms_norm(x))))   k,v -> the cache's next slot
                      x += o_proj(attention(q, cached K/V))        (`DecodeAttention.decode_query`)
                      x += down(silu(gate) * up)                   gate,up = split(gate_up(rms_norm(x)))
    logits = lm_head(rms_norm(x))

Same functions on the same tensors in the same order as the modular path (`linear` on the
same parameters, the same RoPE formula and attention), so the two agree bit for bit; the test
suite checks that against the modular path and transformers. Where it applies (`applies`): a
fused, single-process model in fp32 on a CPU with the ``auto`` attention backend, one sequence
decoding one token, its keys in consecutive slots of the cache (`KVCache.decode_run`). Anything
else -- batches, prefills, bf16, tensor parallelism, a backend the user chose, a CUDA-graph step --
takes the modular path. ``model.flat_decode = False`` turns it off.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..attention.decode import one_query
from ..kv.base import KVCache
from ..parallel.linear import linear

if TYPE_CHECKING:
    from .llama import LlamaModel

class FlatDecoder:
    """The decode step of ``model`` for one sequence, holding references to its parameters.

    Invariant: built from a fused model (``fuse_projections`` ran); parameters changed in place
    (``load_state_dict``, ``w.data = ...``) are seen, modules replaced are not: the model drops its
    decoder when it fuses (`LlamaModel.flat_decoder`).
    """

    def __init__(self, model: LlamaModel) -> None:
        cfg = model.config
        self.Hq, self.Hkv, self.D = model.local_config.num_heads, model.local_config.num_kv_heads, cfg.head_dim
        self.C, self.eps = cfg.hidden_size, cfg.rms_norm_eps
        self.rope, self.embed = model.rope, model.model.embed_tokens
        self.layers = []                                  # per layer: what its step reads, in order
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                attn.o_proj.weight, layer.post_attention_layernorm.weight,
                                mlp.gate_up_proj.weight, mlp.down_proj.weight))
        self.final_norm, self.lm_head, self.lm_head_bias = model.model.norm.weight, model.lm_head.weight, model.lm_head.bias
        self.intermediate = model.model.layers[0].mlp.gate_up_proj.output_sizes[0]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                 run: tuple[int, int]) -> torch.Tensor:
        """input_ids, positions: (1,); ``run`` = (first slot, number of keys including this token) in
        ``kv_cache.slots(layer)`` -> logits (1, V) in fp32."""
        Hq, Hkv, D, C, I, eps = self.Hq, self.Hkv, self.D, self.C, self.intermediate, self.eps
        start, length = run
        new = start + length - 1                                          # this token's slot
        cos, sin_signed = self.rope.rows(positions)                       # (1, 1, D) each, range-checked
        x = self.embed(input_ids)                                         # (1, C)
        for i, (n1, w_qkv, b_qkv, w_o, n2, w_gu, w_down) in enumerate(self.layers):
            k_slots, v_slots = kv_cache.slots(i)                          # (num_slots, Hkv, D) views
            qkv = linear(F.rms_norm(x, (C,), n1, eps), w_qkv, b_qkv).view(1, Hq + 2 * Hkv, D)
            qk = qkv[:, :Hq + Hkv]                                        # q and k heads: RoPE together
            qk = self.rope.rotate(qk, cos, sin_signed)                    # `RotaryEmbedding.forward`'s math
            k_slots[new] = qk[0, Hq:]                                     # this token's K/V into the cache
            v_slots[new] = qkv[0, Hq + Hkv:]
            o = one_query(qk[:, :Hq], k_slots[start:start + length], v_slots[start:start + length])
            x = x + linear(o.reshape(1, Hq * D), w_o)                     # (1, C)
            gate_up = linear(F.rms_norm(x, (C,), n2, eps), w_gu)          # (1, 2I): gate, then up
            x = x + linear(F.silu(gate_up[:, :I]) * gate_up[:, I:], w_down)
        return linear(F.rms_norm(x, (C,), self.final_norm, eps), self.lm_head, self.lm_head_bias).float()  # (1, V)


def applies(model: LlamaModel, meta, kv_cache: KVCache | None,
            logits_indices: torch.Tensor | None = None) -> tuple[int, int] | None:
    """The cache run (start, length) if ``model``'s step on ``meta`` can take the flat path, else None.

    Not for: a step that wants no logits row or several (``logits_indices``), a CUDA-graph step (its
    lengths live on the device, ``meta.seq_lens_tensor``), tensor parallelism, a backend the user chose.
    """
    if not (model.flat_decode and kv_cache is not None and meta.seqlens_q == [1] and model.fused
            and model.tp_size == 1 and model.attention.name == "auto" and meta.seq_lens_tensor is None
            and (logits_indices is None or logits_indices.numel() == 1)):
        return None
    if model.lm_head.weight.dtype != torch.float32 or model.lm_head.weight.device.type != "cpu":
        return None
    return kv_cache.decode_run(meta)
