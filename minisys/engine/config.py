"""`EngineConfig`: the engine's knobs, validated once.

KV pool size: give ``num_kv_blocks`` directly, or a byte budget
(``kv_cache_bytes``), or a fraction of the device's free memory
(``kv_memory_fraction``, CUDA only). With none of them the pool is
``DEFAULT_CPU_KV_BYTES`` (512 MiB: ~11k tokens of SmolLM2-135M in fp32, enough
for 64 sequences of 170 tokens without preemption) on CPU and 50% of the free
memory on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..model.config import ModelConfig

DEFAULT_CPU_KV_BYTES = 512 * 2**20
DEFAULT_GPU_KV_FRACTION = 0.5
DEFAULT_CHUNKED_BUDGET = 512        # tokens per step with chunked prefill (vLLM 0.x's default then)
SPECULATIVE_METHODS = ("ngram", "draft")
SCHEDULING_POLICIES = ("fcfs", "priority", "vtc", "andes")


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``None`` fields are filled in from the model by `resolve`.

    Each field's meaning is its ``metadata["help"]`` (one place: the server's
    ``--help`` prints the same text, see `minisys.server.engine_args`); its
    default is the dataclass default. Names are vLLM's.

    * The KV pool size: at most one of ``num_kv_blocks`` | ``kv_cache_bytes`` | ``kv_memory_fraction``.
    * ``max_num_batched_tokens`` without chunked prefill must hold a whole prompt (+ output, after a
      preemption); with it, prompts are cut to fit the per-step budget (Sarathi-Serve, lesson 05).
    * Chunked prefill is on by default, as in vLLM V1; off is lesson 04's prefill-first policy.
    * Speculative decoding (lesson 06, `minisys.spec`) is off unless ``speculative_method`` is set.
    * ``scheduling_policy`` (lesson 08, `minisys.scheduling`) orders admission and preemption; the
      ``vtc_*`` and ``andes_*`` knobs belong to those policies.
    * ``tensor_parallel_size`` (lesson 13, `minisys.parallel`): N ranks, N-1 of them worker processes;
      the KV pool has the same number of blocks on every rank, each holding that rank's KV heads.
    """

    block_size: int = field(default=16, metadata={"help": "token slots per KV block"})
    num_kv_blocks: int | None = field(default=None, metadata={
        "help": "KV pool size in blocks (default: from kv_cache_bytes, kv_memory_fraction, or "
                "512 MiB on CPU / 50% of free GPU memory)"})
    kv_cache_bytes: int | None = field(default=None, metadata={"help": "KV pool size as a byte budget"})
    kv_memory_fraction: float | None = field(default=None, metadata={
        "help": "KV pool size as a fraction of free GPU memory, in (0, 1] (CUDA only)"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences running at once (the batch limit)"})
    max_num_batched_tokens: int | None = field(default=None, metadata={
        "help": "tokens in one forward, prefill + decode (default: 512 with chunked prefill, "
                "else max(max_model_len, 2048))"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "prompt + output tokens of one sequence (default: the model's context)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse full prompt blocks already in the pool"})
    enable_chunked_prefill: bool = field(default=True, metadata={
        "help": "decodes first, then prompts cut into chunks that fill the rest of max_num_batched_tokens "
                "(lesson 05, as vLLM V1); off: lesson 04's prefill-first policy, a prompt prefilled whole"})
    speculative_method: str | None = field(default=None, metadata={
        "help": "speculative decoding (lesson 06): ngram (prompt lookup) or draft (a draft model); "
                "off by default (it costs compute under load)", "choices": SPECULATIVE_METHODS})
    num_speculative_tokens: int = field(default=4, metadata={"help": "k, drafts proposed per request per step"})
    ngram_prompt_lookup_max: int = field(default=4, metadata={"help": "longest n-gram tried by ngram"})
    ngram_prompt_lookup_min: int = field(default=1, metadata={"help": "shortest n-gram tried by ngram"})
    speculative_model: str | None = field(default=None, metadata={
        "help": "draft: a local model directory sharing the target's tokenizer (default: self-draft, "
                "the target's first draft_layers layers + its final norm and LM head)"})
    draft_layers: int = field(default=8, metadata={"help": "layers of the self-draft model"})
    scheduling_policy: str = field(default="fcfs", metadata={
        "help": "who goes next (lesson 08): fcfs; priority (lower `priority` first, may preempt); "
                "vtc (fair share per client, the virtual token counter); andes (reader QoE)",
        "choices": SCHEDULING_POLICIES})
    vtc_input_weight: float = field(default=1.0, metadata={"help": "vtc: cost of one prompt token (w_in)"})
    vtc_output_weight: float = field(default=2.0, metadata={"help": "vtc: cost of one decode token (w_out)"})
    andes_ttft_s: float = field(default=1.0, metadata={
        "help": "andes: expected time to first token, seconds (a request may set its own)"})
    andes_tds: float = field(default=5.0, metadata={
        "help": "andes: expected token delivery speed (reading pace), tokens/s (a request may set its own)"})
    andes_preempt_ahead_s: float = field(default=2.0, metadata={
        "help": "andes: pause a running request for a waiting one only when its reader is this many "
                "seconds behind it"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "never use CUDA graphs: run every decode step eagerly (vLLM's flag; graphs are used only on CUDA "
                "with triton installed, one graph per batch-size bucket, see minisys/engine/cuda_graph.py)"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "ranks the model is split over (lesson 13, Megatron's split): N-1 worker processes on this "
                "machine, gloo on CPU / nccl on CUDA; at most the model's number of KV heads"})

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
        for name in ("enable_chunked_prefill", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._check_speculative(positive_int)
        self._check_scheduling()
        positive_int("tensor_parallel_size", allow_none=False)
        if self.tensor_parallel_size > 1 and self.speculative_method is not None:
            raise ValueError("speculative_method is not supported with tensor_parallel_size > 1 (the draft "
                             "would run on rank 0 only): use one of them")

    def _check_scheduling(self) -> None:
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        for name in ("vtc_input_weight", "vtc_output_weight", "andes_tds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("andes_ttft_s", "andes_preempt_ahead_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def _check_speculative(self, positive_int) -> None:
        if self.speculative_method is not None and self.speculative_method not in SPECULATIVE_METHODS:
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
        from ..parallel.shard import check_tensor_parallel
        check_tensor_parallel(model_config, self.tensor_parallel_size)
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
