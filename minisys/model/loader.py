"""Load a model and its tokenizer: the default one, or any local HF directory.

``load(None)`` (or ``$MINISYS_MODEL`` unset) gives SmolLM2-135M-Instruct
from the package cache (see `store`); ``load("/path/to/dir")`` loads a
Hugging Face directory of a Llama or Qwen2 model (config.json,
*.safetensors, tokenizer.json); a path ending in ``.gguf`` is converted first.
Weights are fp32 on CPU and bf16 on CUDA unless a dtype is given; ``dtype="auto"``
chooses by the hardware (`minisys.model.dtype`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .dtype import default_dtype, resolve_dtype  # noqa: F401  (default_dtype: re-exported)
from .llama import LlamaModel
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from: what a tensor-parallel worker needs to load its own shard."""

    path: Path
    attention_backend: str
    fuse: bool = True               # q/k/v and gate/up fused at load (`LlamaModel.fuse_projections`)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"




def resolve_model_dir(model: str | os.PathLike | None = None, quiet: bool = False,
                      rebuild_cache: bool = False) -> Path:
    """The Hugging Face directory to load: a local one as given, or a converted one from the cache
    (checked against its manifest; ``rebuild_cache`` converts again)."""
    model = model or os.environ.get("MINISYS_MODEL")
    if model is None:
        from .store import default_model_dir
        return default_model_dir(quiet=quiet, rebuild=rebuild_cache)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        from .gguf_loader import convert_gguf_to_hf_dir
        from .manifest import ensure_converted, sha256_of
        from .store import cache_dir
        out = cache_dir() / "converted" / sha256_of(path)[:16]
        return ensure_converted(out, lambda tmp: convert_gguf_to_hf_dir(path, tmp), str(path), rebuild_cache)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); minisys loads local "
                                "Hugging Face directories or .gguf files and never downloads from a hub")
    return path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:                   # safetensors raises its own error types
            raise ValueError(f"cannot read the weights in {f}: {e}") from None
    return state


def load_state_dict_shard(path: Path, config: ModelConfig, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Rank ``tp_rank``'s slice of the checkpoint, read slice by slice (`safetensors` ``get_slice``): a
    worker never holds the whole model in memory (`minisys.parallel.shard.shard_spec` says which slice)."""
    from safetensors import safe_open

    from ..parallel.shard import shard_spec
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    spec = shard_spec(name, config, tp_rank, tp_size)
                    if spec is None:
                        state[name] = sf.get_tensor(name)
                        continue
                    dim, start, end = spec
                    sl = sf.get_slice(name)
                    state[name] = sl[start:end] if dim == 0 else sl[:, start:end]
        except (OSError, RuntimeError) as e:    # safetensors raises its own error types
            raise ValueError(f"cannot read the weights in {f}: {e}") from None
    return state


def read_config(path: Path) -> ModelConfig:
    """The model's `ModelConfig` from ``path/config.json``; ValueError naming the file if it is bad."""
    try:
        return ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / 'config.json'} is not a valid model config ({type(e).__name__}: {e})") from None


def load_model(path: Path, device: str | None = None, dtype: torch.dtype | str | None = None,
               attention_backend: str = "auto", tp_rank: int = 0, tp_size: int = 1,
               fuse: bool = True, input_major: bool | None = None) -> LlamaModel:
    """The model in ``path``; with ``tp_size > 1`` only rank ``tp_rank``'s shard (lesson 13), read
    slice by slice. ``model.source`` remembers how it was loaded (tensor-parallel workers load the same).

    ``fuse``: q/k/v and gate/up are fused into one matmul each from the checkpoint's own tensors
    (`LlamaModel.fuse_projections`; each rank fuses its shard). ``fuse=False`` keeps the plain
    layers under Hugging Face's names (lesson 13's demo replaces them one by one).
    ``input_major``: weights stored (in, out)-contiguous for batch-1 matrix-vector speed
    (`LlamaModel.store_input_major`); None: where it helps, fp32 on a CPU."""
    device = device or default_device()
    dtype = resolve_dtype(dtype, device)              # None: the device's default; "auto": by capability
    if attention_backend == "triton" and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention backend 'triton' runs its kernel on CUDA only (device {device!r}); "
                         "choose another backend, e.g. auto")
    config = read_config(path)
    with torch.device("meta"):
        model = LlamaModel(config, attention_backend=attention_backend, tp_rank=tp_rank, tp_size=tp_size)
    state = load_state_dict(path) if tp_size == 1 else load_state_dict_shard(path, config, tp_rank, tp_size)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = _check_keys(model, state)
    if missing or unexpected:
        raise ValueError(f"checkpoint in {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # RoPE tables are buffers built at init (on meta): rebuild them for real
    model.rope.__init__(config.head_dim, config.max_position_embeddings, config.rope_theta)
    for layer in model.model.layers:
        layer.self_attn.rope = model.rope
    if fuse:
        model.fuse_projections()
    model.source = ModelSource(path, attention_backend, fuse)
    model = model.to(device=device, dtype=dtype).eval()
    if input_major is None:
        input_major = model.device.type == "cpu" and model.dtype == torch.float32
    if input_major:
        model.store_input_major()
        model.flat_decode = fuse and tp_size == 1          # the batch-1 decode loop (`minisys.model.flat_decode`)
    return model


def _check_keys(model: LlamaModel, state: dict) -> tuple[list[str], list[str]]:
    expected = {k for k in model.state_dict() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    return sorted(expected - state.keys()), sorted(state.keys() - expected)


def load(model: str | os.PathLike | None = None, device: str | None = None,
         dtype: torch.dtype | str | None = None, attention_backend: str = "auto",
         quiet: bool = False, rebuild_cache: bool = False, tp_rank: int = 0,
         tp_size: int = 1, fuse: bool = True, input_major: bool | None = None) -> tuple[LlamaModel, Tokenizer]:
    """Load (model, tokenizer) from the default model or a local path (``rebuild_cache``: convert again);
    ``tp_size > 1``: only rank ``tp_rank``'s shard of the model; ``fuse``, ``input_major``: see `load_model`."""
    path = resolve_model_dir(model, quiet=quiet, rebuild_cache=rebuild_cache)
    m = load_model(path, device, dtype, attention_backend, tp_rank, tp_size, fuse, input_major)
    tok = Tokenizer.from_dir(path, eos_token_ids=m.config.eos_token_ids)
    return m, tok
