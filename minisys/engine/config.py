"""`EngineConfig`: the engine's knobs, validated once.

KV pool size: give ``num_kv_blocks`` directly, or a byte budget
(``kv_cache_bytes``), or a fraction of the device's free memory
(``kv_memory_fraction``, CUDA only). With none of them the pool is
``DEFAULT_CPU_KV_BYTES`` (512 MiB: ~11k tokens of SmolLM2-135M in fp32, enough
for 64 sequences of 170 tokens without preemption) on CPU and 50% of the free
memory on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..model.config import ModelConfig

DEFAULT_CPU_KV_BYTES = 512 * 2**20
DEFAULT_GPU_KV_FRACTION = 0.5
DEFAULT_CHUNKED_BUDGET = 512        # tokens per step with chunked prefill (vLLM 0.x's default then)


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``None`` fields are filled in from the model by `resolve`.

    * ``block_size``: token slots per KV block.
    * ``num_kv_blocks`` | ``kv_cache_bytes`` | ``kv_memory_fraction``: the pool size (at most one).
    * ``max_num_seqs``: sequences running at once (the batch limit).
    * ``max_num_batched_tokens``: tokens in one forward (prefill tokens + decode tokens).
      Without chunked prefill a whole prompt (+ output, after a preemption) must fit in it;
      default ``max(max_model_len, 2048)``. With chunked prefill it is the per-step token
      budget that prompts are cut to fit; default ``DEFAULT_CHUNKED_BUDGET`` (512).
    * ``max_model_len``: prompt + output tokens of one sequence; default the model's context.
    * ``enable_prefix_caching``: reuse full prompt blocks already in the pool.
    * ``enable_chunked_prefill`` (vLLM's name): decodes first, then prompts cut into chunks
      that fill the rest of ``max_num_batched_tokens`` (Sarathi-Serve, lesson 05). False is
      the prefill-first policy of lesson 04: a prompt is prefilled whole in one step.

    Speculative decoding (lesson 06, `minisys.spec`; vLLM's names):

    * ``speculative_method``: None (off), ``"ngram"`` (prompt lookup) or ``"draft"`` (a draft model).
    * ``num_speculative_tokens``: k, drafts proposed per decoding request per step.
    * ``ngram_prompt_lookup_max`` / ``_min``: the n-gram sizes tried, longest first.
    * ``speculative_model``: a local model directory sharing the target's tokenizer; None = self-draft,
      the target's own first ``draft_layers`` layers + its final norm and LM head.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_memory_fraction: float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = False
    speculative_method: str | None = None
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_max: int = 4
    ngram_prompt_lookup_min: int = 1
    speculative_model: str | None = None
    draft_layers: int = 8

    def __post_init__(self) -> None:
        def positive_int(name, allow_none=True):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("block_size", "max_num_seqs"):
            positive_int(name, allow_none=False)
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_num_batched_tokens", "max_model_len"):
            positive_int(name)
        given = [n for n in ("num_kv_blocks", "kv_cache_bytes", "kv_memory_fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of num_kv_blocks, kv_cache_bytes, kv_memory_fraction; got {given}")
        if self.kv_memory_fraction is not None and not (0 < self.kv_memory_fraction <= 1):
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")
        self._check_speculative(positive_int)

    def _check_speculative(self, positive_int) -> None:
        if self.speculative_method not in (None, "ngram", "draft"):
            raise ValueError(f"speculative_method must be None, 'ngram' or 'draft', got {self.speculative_method!r}")
        for name in ("num_speculative_tokens", "ngram_prompt_lookup_max", "ngram_prompt_lookup_min", "draft_layers"):
            positive_int(name, allow_none=False)
        if self.ngram_prompt_lookup_min > self.ngram_prompt_lookup_max:
            raise ValueError(f"ngram_prompt_lookup_min ({self.ngram_prompt_lookup_min}) must be <= "
                             f"ngram_prompt_lookup_max ({self.ngram_prompt_lookup_max})")
        if self.speculative_model is not None and self.speculative_method != "draft":
            raise ValueError("speculative_model needs speculative_method='draft'")

    def resolve(self, model_config: ModelConfig, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> "EngineConfig":
        """A copy with every ``None`` filled in for this model, dtype and device (no field left None but the KV alternatives)."""
        max_model_len = self.max_model_len or model_config.max_position_embeddings
        if max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's context "
                             f"({model_config.max_position_embeddings})")
        batched = self.max_num_batched_tokens or (max(DEFAULT_CHUNKED_BUDGET, self.max_num_seqs)
                                                  if self.enable_chunked_prefill
                                                  else max(max_model_len, 2048, self.max_num_seqs))
        blocks = self.num_kv_blocks
        if blocks is None:
            per_block = (2 * model_config.num_layers * self.block_size * model_config.num_kv_heads
                         * model_config.head_dim * torch.empty((), dtype=dtype).element_size())
            budget = self.kv_cache_bytes
            if budget is None:
                frac = self.kv_memory_fraction
                if torch.device(device).type == "cuda":
                    free, _ = torch.cuda.mem_get_info(torch.device(device))
                    budget = int(free * (frac or DEFAULT_GPU_KV_FRACTION))
                elif frac is not None:
                    raise ValueError("kv_memory_fraction needs a CUDA device; give num_kv_blocks or kv_cache_bytes on CPU")
                else:
                    budget = DEFAULT_CPU_KV_BYTES
            blocks = budget // per_block
            if blocks < 1:
                raise ValueError(f"a KV budget of {budget} bytes holds no block of {per_block} bytes")
        return replace(self, num_kv_blocks=blocks, kv_cache_bytes=None, kv_memory_fraction=None,
                       max_num_batched_tokens=batched, max_model_len=max_model_len)
