"""Read a llama.cpp GGUF file into Hugging Face form: config, weights, tokenizer.

`convert_gguf_to_hf_dir` writes a directory that `minisys.model.loader`
(and transformers) load like any Hugging Face checkpoint:
``config.json``, ``model.safetensors`` (fp32), ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template).

Two things llama.cpp changed on the way in and we undo:
* names: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``;
* the rows of Q and K projections were permuted from HF's "rotate half" RoPE
  layout to llama.cpp's interleaved one (`unpermute_qk`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from .config import ModelConfig
from .quant import dequantize

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens like <|im_start|>


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m or m.group(2) not in LAYER_NAMES:
        raise KeyError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of Q/K rows (and biases).

    llama.cpp's converter did, per head, (2, D/2) -> (D/2, 2): it interleaved
    the two rotated halves. Here we reshape (n_heads, D/2, 2, ...) and swap
    back to (n_heads, 2, D/2, ...).
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


class GGUFFile:
    """A thin view of a GGUF file: metadata values and tensors by name."""

    def __init__(self, path: str | Path) -> None:
        import gguf  # imported here: only needed when reading GGUF

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(path))

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    @property
    def arch(self) -> str:
        return self.get("general.architecture")

    def model_config(self) -> ModelConfig:
        a = self.arch
        n_heads = self.get(f"{a}.attention.head_count")
        hidden = self.get(f"{a}.embedding_length")
        names = {t.name for t in self.reader.tensors}
        eos = self.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            vocab_size=self.get(f"{a}.vocab_size") or len(self.get("tokenizer.ggml.tokens")),
            hidden_size=hidden,
            intermediate_size=self.get(f"{a}.feed_forward_length"),
            num_layers=self.get(f"{a}.block_count"),
            num_heads=n_heads,
            num_kv_heads=self.get(f"{a}.attention.head_count_kv", n_heads),
            head_dim=self.get(f"{a}.rope.dimension_count", hidden // n_heads),
            rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=self.get(f"{a}.context_length", 2048),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            architecture=a,
            bos_token_id=self.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(eos,) if eos is not None else (),
        )

    def state_dict(self, on_tensor: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
        """All weights as float32 numpy arrays under Hugging Face names."""
        cfg = self.model_config()
        out: dict[str, np.ndarray] = {}
        for t in self.reader.tensors:
            w = dequantize(t.data, t.tensor_type.name)
            w = w.reshape([int(s) for s in reversed(t.shape)])   # GGUF lists dims fastest-first
            if t.name.endswith(("attn_q.weight", "attn_q.bias")):
                w = unpermute_qk(w, cfg.num_heads)
            elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
                w = unpermute_qk(w, cfg.num_kv_heads)
            out[hf_name(t.name)] = np.array(w, dtype=np.float32, order="C")
            if on_tensor:
                on_tensor(t.name)
        return out

    def tokenizer_json(self) -> str:
        """A Hugging Face `tokenizers` byte-level BPE built from the GGUF vocabulary."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        if self.get("tokenizer.ggml.model") != "gpt2":
            raise NotImplementedError("only GPT-2 style byte-level BPE GGUF tokenizers are supported")
        tokens = self.get("tokenizer.ggml.tokens")
        types = self.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in self.get("tokenizer.ggml.merges")]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if self.get("tokenizer.ggml.pre") == "smollm":   # SmolLM splits digits one by one
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tk.pre_tokenizer = byte_level
        tk.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
        tk.add_special_tokens(special)
        return tk.to_str()

    def tokenizer_config(self) -> dict:
        tokens = self.get("tokenizer.ggml.tokens")

        def tok(key):
            i = self.get(key)
            return tokens[i] if i is not None else None

        return {
            "chat_template": self.get("tokenizer.chat_template"),
            "bos_token": tok("tokenizer.ggml.bos_token_id"),
            "eos_token": tok("tokenizer.ggml.eos_token_id"),
            "unk_token": tok("tokenizer.ggml.unknown_token_id"),
            "pad_token": tok("tokenizer.ggml.padding_token_id"),
            "add_bos_token": bool(self.get("tokenizer.ggml.add_bos_token", False)),
            "tokenizer_class": "PreTrainedTokenizerFast",
        }


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json for `cfg` (transformers loads it too)."""
    return {
        "architectures": ["Qwen2ForCausalLM" if cfg.architecture == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids),
        "torch_dtype": "float32",
    }


def convert_gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path,
                           on_tensor: Callable[[str], None] | None = None) -> Path:
    """Write config.json, model.safetensors, tokenizer files for `gguf_path` into `out_dir`."""
    import torch
    from safetensors.torch import save_file

    f = GGUFFile(gguf_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = f.model_config()
    tensors = {k: torch.from_numpy(v) for k, v in f.state_dict(on_tensor).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    (out / "tokenizer.json").write_text(f.tokenizer_json())
    (out / "tokenizer_config.json").write_text(json.dumps(f.tokenizer_config(), indent=2))
    return out


def num_tensors(gguf_path: str | Path) -> int:
    return len(GGUFFile(gguf_path).reader.tensors)
