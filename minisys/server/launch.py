"""`python -m minisys serve`: load the model, build the engine and the app, run uvicorn.

Binds 127.0.0.1 unless ``--host`` says otherwise. ``--engine eager`` serves
the one-request-at-a-time baseline behind the same API (what the online
benchmark compares against). Device and dtype default to CUDA + bf16 when a
GPU is present, CPU + fp32 otherwise (see `minisys.model.loader`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..engine.config import EngineConfig
from .engine_args import add_engine_args, engine_config_from_args, flag, given_engine_args

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The server's own flags, written here; then one flag per `EngineConfig` field (`engine_args`)."""
    p.add_argument("--model", default=None, help="local HF directory or .gguf (default: $MINISYS_MODEL "
                   "or SmolLM2-135M-Instruct from the package cache)")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="convert the model into the cache again (a damaged cache is rebuilt anyway)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--engine", default="llm", choices=["llm", "eager"],
                   help="llm: continuous batching over the paged KV cache; eager: one request at a time")
    p.add_argument("--attention", default="auto",
                   help="attention backend (auto: paged K/V through the block tables; packed fp32 on CPU: "
                        "decode; else sdpa)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a busy shared machine)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (info shows every request)")
    add_engine_args(p)


def model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    path = Path(args.model)
    return path.stem if path.suffix == ".gguf" else path.name


def engine_config(args: argparse.Namespace) -> EngineConfig | None:
    """The `EngineConfig` of the engine flags given (None for ``--engine eager``, which takes none).

    Raises ValueError naming the flags that ``--engine eager`` cannot take, or the invalid value.
    """
    given = given_engine_args(args)
    if args.engine == "eager":
        if given:
            named = ", ".join(flag(name, value) for name, value in given.items())
            raise ValueError(f"--engine eager takes no engine flags, got {named} (they configure --engine llm)")
        return None
    return engine_config_from_args(args)


def build_engine(args, config: EngineConfig | None):
    """(async engine, tokenizer, model) for the parsed arguments and `engine_config`'s result."""
    from ..llm import LLM
    from .async_engine import AsyncEagerEngine, AsyncLLMEngine

    llm = LLM(args.model, device=args.device, dtype=args.dtype, attention_backend=args.attention,
              quiet=True, engine=args.engine, engine_config=config, rebuild_cache=args.rebuild_cache)
    engine = AsyncLLMEngine(llm.engine) if args.engine == "llm" else AsyncEagerEngine(llm.runner)
    return engine, llm.tokenizer, llm.model


def usage_text(host: str, port: int, name: str, api_key: Optional[str]) -> str:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    base = f"http://{shown}:{port}/v1"
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    key = repr(api_key) if api_key else '"EMPTY"'
    return f"""
Try it:
  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} \\
       -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_completion_tokens": 64}}'
  curl -N {base}/completions -H 'Content-Type: application/json'{auth} \\
       -d '{{"model": "{name}", "prompt": "Once upon a time", "max_tokens": 32, "stream": true}}'

From Python (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key={key})
  r = client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hi!"}}])
  print(r.choices[0].message.content)

Metrics: http://{shown}:{port}/metrics   Health: http://{shown}:{port}/health   Stop: Ctrl-C
"""


def serve(args) -> int:
    import uvicorn

    from .app import build_app

    try:
        config = engine_config(args)               # refused before the model loads
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    engine, tokenizer, model = build_engine(args, config)
    name = model_name(args)
    app = build_app(engine, tokenizer, name, api_key=args.api_key)
    kind = "continuous batching (LLMEngine)" if args.engine == "llm" else "eager baseline, one request at a time"
    print(f"minisys serving {name} on {model.device} ({str(model.dtype).replace('torch.', '')}), "
          f"engine: {kind}, at http://{args.host}:{args.port}", flush=True)
    print(usage_text(args.host, args.port, name, args.api_key), flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: bound to {args.host} without --api-key: anyone who can reach this port can use it",
              flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
