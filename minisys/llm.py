"""The offline API, in vLLM's shape.

    from minisys import LLM, SamplingParams
    llm = LLM()                                   # SmolLM2-135M-Instruct by default
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
    llm.chat([{"role": "user", "content": "What is the capital of France?"}])

`generate` runs on `LLMEngine` (continuous batching over a paged KV cache,
lesson 04): every request is added, the engine steps until all are done, and
the outputs come back in input order. ``LLM(engine="eager")`` runs the same
API one request at a time on the eager baseline (later lessons compare the
two behind one API); ``engine_config=EngineConfig(...)`` sets the engine's
limits (KV blocks, max_num_seqs, ...). ``attention_backend`` goes to the
model as given; the default ``"auto"`` reads the engine's paged cache through
its block tables and picks per call for packed K/V (`minisys.attention.auto`).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Sequence, Union

import torch

from .engine.config import EngineConfig
from .engine.eager import EagerGenerator
from .engine.llm_engine import LLMEngine
from .engine.outputs import RequestOutput
from .engine.sampling_params import RequestOutputKind, SamplingParams
from .model.loader import load
from .model.tokenizer import check_text
from .rag.embed import EmbeddingRequestOutput

PromptType = Union[str, dict[str, Any]]   # "text" | {"prompt": "text"} | {"prompt_token_ids": [...]}
Message = dict[str, str]


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, device: str | None = None,
                 dtype: torch.dtype | str | None = None, attention_backend: str = "auto",
                 use_kv_cache: bool = True, quiet: bool = False, engine: str = "llm",
                 engine_config: EngineConfig | None = None, rebuild_cache: bool = False,
                 tensor_parallel_size: int | None = None) -> None:
        """``tensor_parallel_size`` (lesson 13) sets ``engine_config.tensor_parallel_size``: this process
        loads rank 0's shard and the engine starts the other ranks; `shutdown` stops them."""
        if isinstance(dtype, str) and dtype not in ("auto", "float32", "bfloat16", "float16"):
            _bad_dtype(dtype)             # "auto": by the hardware, resolved in the loader (minisys.model.dtype)
        if engine not in ("llm", "eager"):
            raise ValueError(f"engine must be 'llm' (continuous batching) or 'eager', got {engine!r}")
        if tensor_parallel_size is not None:
            engine_config = replace(engine_config or EngineConfig(), tensor_parallel_size=tensor_parallel_size)
        tp = engine_config.tensor_parallel_size if engine_config is not None else 1
        if tp > 1 and engine != "llm":
            raise ValueError(f"tensor_parallel_size={tp} needs engine='llm' (the eager baseline runs one process)")
        self.model, self.tokenizer = load(model, device, dtype, attention_backend, quiet=quiet,
                                          rebuild_cache=rebuild_cache, tp_size=tp)
        # the eager baseline needs the whole model: none beside a tensor-parallel engine
        self.runner = EagerGenerator(self.model, self.tokenizer, use_kv_cache=use_kv_cache) if tp == 1 else None
        self.engine_kind = engine
        self.engine = LLMEngine(self.model, self.tokenizer, engine_config) if engine == "llm" else None
        self._next_id = 0

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers, if any (also done at interpreter exit)."""
        if self.engine is not None:
            self.engine.shutdown()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, priority: Sequence[int] | None = None,
                 client: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in input order.

        ``priority`` (one int per prompt, lower first) and ``client`` (one name, or one per prompt)
        go to the engine's scheduling policy (lesson 08); the eager baseline has no scheduler and
        refuses them.
        """
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else prompts
        if not isinstance(prompt_list, (list, tuple)):
            raise ValueError(f"a prompt is a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, "
                             f"or a list of them; got {type(prompts).__name__}")
        params = _params_per_prompt(sampling_params, len(prompt_list))
        who = _who_per_prompt(priority, client, len(prompt_list))
        requests = [self._tokenize(p) for p in prompt_list]
        if self.engine is not None:        # add_request validates; a refusal aborts those added before it
            return self._run_engine(requests, params, use_tqdm, who)
        if priority is not None or client is not None:
            raise ValueError("priority and client need the engine (LLM(engine='llm')): the eager baseline "
                             "runs one request at a time and has no scheduler")
        for (text, ids), sp in zip(requests, params):             # validate all before running any
            self.runner.check_prompt(ids, sp)
        results = []
        with _Progress(len(requests), enabled=use_tqdm) as progress:
            for (text, ids), sp in zip(requests, params):
                results.append(self._run_one(text, ids, sp, progress))
        return results

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        for c, conversation in enumerate(conversations):
            for i, m in enumerate(conversation):
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    where = f"messages[{i}].content" if len(conversations) == 1 else f"messages[{c}][{i}].content"
                    check_text(m["content"], where)
        prompts = [{"prompt": self.tokenizer.apply_chat_template(c, add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType], use_tqdm: bool = False,
              normalize: bool = True) -> list[EmbeddingRequestOutput]:
        """One vector per prompt, in input order (vLLM's ``LLM.embed``; `minisys.rag.embed`): the served
        model's final hidden states mean-pooled over the prompt's tokens, L2-normalised (unless
        ``normalize=False``). A prompt longer than the context, empty, or with ids outside the
        vocabulary is a ValueError; nothing is truncated. ``use_tqdm`` is accepted for vLLM's signature."""
        from .rag.embed import EmbeddingOutput, check_embedding_input, embed_token_ids
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        ids = [self._tokenize(p)[1] for p in prompt_list]
        for i, p in enumerate(ids):
            check_embedding_input(p, self.model.config.vocab_size, self.model.config.max_position_embeddings,
                                  f"prompt {i}")
        vectors = embed_token_ids(self.model, ids, normalize=normalize)               # (B, C) fp32
        outs = []
        for p, v in zip(ids, vectors):
            outs.append(EmbeddingRequestOutput(str(self._next_id), p, EmbeddingOutput(v.tolist())))
            self._next_id += 1
        return outs

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, ids) of one prompt; ValueError for a malformed one or text UTF-8 cannot encode."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            check_text(prompt["prompt"], "prompt")
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt is a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}; got {prompt!r}")

    def _run_engine(self, requests, params, use_tqdm: bool, who: list[dict]) -> list[RequestOutput]:
        """Add every request to the engine, step until all finish, return them in input order."""
        engine = self.engine
        ids = []
        results: dict[str, RequestOutput] = {}
        try:
            for (text, prompt_ids), sp, meta in zip(requests, params, who):
                rid = str(self._next_id)
                self._next_id += 1
                engine.add_request(rid, prompt_ids, replace(sp, output_kind=RequestOutputKind.FINAL_ONLY),
                                   prompt=text, **meta)
                ids.append(rid)
            with _Progress(len(requests), enabled=use_tqdm) as progress:
                while engine.has_unfinished():
                    before = engine.stats.generated_tokens
                    for out in engine.step():
                        if out.finished:
                            results[out.request_id] = out
                            progress.request_done()
                    progress.tokens += engine.stats.generated_tokens - before
                    progress.refresh()
        finally:
            for rid in ids:                      # an error (or Ctrl-C) leaves no request behind
                if rid not in results:
                    engine.abort(rid)
        return [results[rid] for rid in ids]

    def _run_one(self, text: str | None, ids: list[int], sp: SamplingParams, progress) -> RequestOutput:
        request_id = str(self._next_id)
        self._next_id += 1
        outputs = [self.runner.generate(ids, sp, index=i, on_token=lambda _ev: progress.token())
                   for i in range(sp.n)]
        progress.request_done()
        return RequestOutput(request_id, text, ids, outputs, finished=True)


def _params_per_prompt(sp, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts: give one, or one per prompt")
    return sp


def _who_per_prompt(priority, client, n: int) -> list[dict]:
    """[{"priority": p, "client": c}] per prompt from vLLM-style per-prompt lists (or one client)."""
    if priority is None:
        priority = [0] * n
    elif isinstance(priority, (int, str, bytes)) or len(priority) != n:
        raise ValueError(f"priority must be a list of one int per prompt ({n}), got {priority!r}")
    clients = [client] * n if client is None or isinstance(client, str) else list(client)
    if len(clients) != n:
        raise ValueError(f"client must be one name or a list of one per prompt ({n}); got {len(clients)}")
    return [{"priority": p, "client": c} for p, c in zip(priority, clients)]


def _bad_dtype(name: str):
    raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")


class _Progress:
    """A rich progress bar over requests showing output tokens/s (silent when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and total > 0
        self.tokens, self.start = 0, time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress("[bold]generating", BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[tps]:.1f} tok/s"), TimeElapsedColumn(),
                                transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("gen", total=self.total, tps=0.0)
        return self

    def token(self) -> None:
        self.tokens += 1

    def request_done(self) -> None:
        if self.enabled:
            tps = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=1, tps=tps)

    def refresh(self) -> None:
        if self.enabled:
            tps = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, tps=tps)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
