"""`python -m minisys serve`: load the model, build the engine and the app, run uvicorn.

Binds 127.0.0.1 unless ``--host`` says otherwise. ``--engine eager`` serves
the one-request-at-a-time baseline behind the same API (what the online
benchmark compares against). Device and dtype default to CUDA + bf16 when a
GPU is present, CPU + fp32 otherwise (see `minisys.model.loader`).

Start-up order: the flags are checked and the port is bound *before* the
model loads, so a busy port fails at once (exit code 1, a clear message)
instead of after the load and the banner. The API key comes from
``--api-key`` or, better (not visible in ``ps``), ``$MINISYS_API_KEY``
(vLLM's ``VLLM_API_KEY`` convention); it is never printed.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

from ..engine.config import EngineConfig
from .engine_args import add_engine_args, engine_config_from_args, flag, given_engine_args
from .kv_args import add_kv_args, kv_config_from_args
from .limits import add_limit_args, limits_from_args
from .timeouts import add_timeout_args, timeouts_from_args
from .tools import TOOL_CALL_PARSERS

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "MINISYS_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The server's own flags, written here; then one flag per `EngineConfig` field (`engine_args`)."""
    p.add_argument("--model", default=None, help="local HF directory or .gguf (default: $MINISYS_MODEL "
                   "or SmolLM2-135M-Instruct from the package cache)")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="convert the model into the cache again (a damaged cache is rebuilt anyway)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 and /metrics "
                   f"(default: ${API_KEY_ENV}; prefer the variable: a flag is visible in ps)")
    p.add_argument("--metrics-open", action="store_true", help="serve /metrics without the API key (scrapers)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU; auto: bf16 where the hardware computes it "
                        "natively (CUDA, AVX-512-BF16/AMX CPUs), else float32 (minisys/model/dtype.py)")
    p.add_argument("--engine", default="llm", choices=["llm", "eager"],
                   help="llm: continuous batching over the paged KV cache; eager: one request at a time")
    p.add_argument("--attention", default="auto",
                   help="attention backend (auto: paged K/V through the block tables; packed fp32 on CPU: "
                        "decode; else sdpa)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per physical core, minisys.threads; 1 is fastest on a busy "
                        "shared machine)")
    p.add_argument("--log-level", default="warning", help="log level of uvicorn and minisys (default: warning; "
                   "errors are always logged, with a traceback and the error id the client got)")
    p.add_argument("--access-log", action="store_true", help="log one line per request (whatever the --log-level)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='serve tool_choice "auto" (the default when a request has tools): the model may call a '
                        'tool, and --tool-call-parser reads the calls from its text (vLLM\'s flag)')
    p.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how calls are read from the text for tool_choice \"auto\" (hermes: <tool_call>{...}"
                        "</tool_call>; a chat template without a tool format is shown the tools in that format)")
    p.add_argument("--replicas", type=int, default=1,
                   help="N > 1: N servers, one process each (1 torch thread unless --threads), behind a router "
                        "on --port (lesson 14); 1: this one server")
    p.add_argument("--routing-policy", default=None, choices=["round_robin", "least_loaded", "prefix_affinity"],
                   help="how the router picks a replica (--replicas N > 1; default: least_loaded)")
    p.add_argument("--prefill-replicas", type=int, default=None, metavar="K",
                   help="disaggregated prefill and decode (lesson 14; needs --replicas N and --kv-connector): "
                        "replicas 0..K-1 only prefill, the others decode; the router moves each request's KV")
    p.add_argument("--rebalance-every-s", type=float, default=None, metavar="S",
                   help="with --replicas and --kv-connector: every S seconds migrate the newest stream of the least "
                        "free replica to the most free one when their freeness differs by more than --rebalance-gap "
                        "(Llumnix; default: off)")
    p.add_argument("--rebalance-gap", type=float, default=8.0,
                   help="the freeness gap (free KV blocks per running sequence) that triggers a rebalance (default: 8)")
    add_limit_args(p)
    add_timeout_args(p)
    add_engine_args(p)
    add_kv_args(p)


def tool_call_parser(args) -> Optional[str]:
    """The parser of tool_choice "auto" (None: "auto" is refused); ValueError unless the two flags come
    together, as vLLM requires."""
    enable, parser = getattr(args, "enable_auto_tool_choice", False), getattr(args, "tool_call_parser", None)
    if enable != (parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: give both "
                         "(e.g. --enable-auto-tool-choice --tool-call-parser hermes) or neither")
    return parser


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
    """The "Try it" banner. With a key it shows ``$MINISYS_API_KEY``, never the key itself."""
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    base = f"http://{shown}:{port}/v1"
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key else ""
    key = f'os.environ["{API_KEY_ENV}"]' if api_key else '"EMPTY"'
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


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port), as uvicorn would make it; OSError if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # not SO_REUSEPORT: a busy port fails
        sock.bind((host, port))
        sock.listen(2048)                          # connections queue while the model loads
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def setup_logging(level: str) -> None:
    """minisys's own log (logger ``minisys``) to stderr at ``level``, errors always."""
    logger = logging.getLogger("minisys")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    logger.setLevel(min(numeric, logging.ERROR) if isinstance(numeric, int) else logging.WARNING)
    logger.propagate = False


def serve(args, on_ready: Optional[Callable[[int], None]] = None) -> int:
    """Run the server until SIGTERM/SIGINT. ``on_ready(port)``: called once the model is loaded and the
    port bound (a replica of lesson 14's router, started with ``--port 0``; no banner is printed then).
    ``--replicas N`` (N > 1) runs the router over N such servers instead (`minisys.cluster.router`)."""
    if (getattr(args, "replicas", 1) != 1 or getattr(args, "routing_policy", None) is not None
            or getattr(args, "prefill_replicas", None) is not None
            or getattr(args, "rebalance_every_s", None) is not None):
        from ..cluster.router import serve_cluster
        return serve_cluster(args)
    import uvicorn

    from .app import build_app
    from .interpreter import freeze_startup_objects, short_switch_interval
    from .shutdown import GracefulServer
    from .timeouts import header_timeout_protocol

    try:
        config = engine_config(args)               # refused before the model loads
        limits = limits_from_args(args)
        timeouts = timeouts_from_args(args)
        parser = tool_call_parser(args)
        kv_config = kv_config_from_args(args, given_engine_args(args) if args.engine == "llm" else {})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        sock = bind_socket(args.host, args.port)   # before the model loads: a busy port fails fast
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
              f"(is another server running there? pick another --port)", file=sys.stderr)
        return 1
    setup_logging(args.log_level)
    from ..threads import configure_threads
    configure_threads(args.threads)             # default: one per physical core (minisys.threads)
    try:
        engine, tokenizer, model = build_engine(args, config)
    except ValueError as exc:                   # e.g. a --tensor-parallel-size the model's heads cannot take
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kv = None
    if kv_config is not None:                  # joins the KV group: waits for every replica of it (lesson 14)
        from .kv_routes import KVState, connect
        kv = KVState(kv_config, connect(kv_config, str(model.device)))
    name = model_name(args)
    freeze_startup_objects()                   # the model and modules: out of every later GC pass
    short_switch_interval()                    # the engine thread is not starved by a parsing thread
    app = build_app(engine, tokenizer, name, api_key=api_key, limits=limits, metrics_open=args.metrics_open,
                    timeouts=timeouts, tool_call_parser=parser, kv=kv)
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    else:
        print_banner(args, name, model, api_key)
    uv_config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                               http=header_timeout_protocol(timeouts.timeout_header_s),
                               timeout_graceful_shutdown=timeouts.shutdown_grace_s)
    if args.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = GracefulServer(uv_config, drain=app.state.server.drain)
    server.run(sockets=[sock])
    print(shutdown_summary(engine, server.signals_received), flush=True)
    if server.signals_received:
        exit_now()
    return 0


def print_banner(args, name: str, model, api_key: Optional[str]) -> None:
    """What a started server prints: where it serves, the key's source, the "Try it" lines."""
    kind = "continuous batching (LLMEngine)" if args.engine == "llm" else "eager baseline, one request at a time"
    print(f"minisys serving {name} on {model.device} ({str(model.dtype).replace('torch.', '')}), "
          f"engine: {kind}, at http://{args.host}:{args.port}", flush=True)
    if api_key:
        source = "--api-key" if args.api_key else f"${API_KEY_ENV}"
        print(f"API key: required (from {source}); /metrics "
              f"{'open' if args.metrics_open else 'needs it too'}", flush=True)
    print(usage_text(args.host, args.port, name, api_key), flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: bound to {args.host} without an API key: anyone who can reach this port can use it",
              flush=True)


def exit_now() -> None:
    """Exit 0 at once, after a graceful shutdown: flush the logs, skip the interpreter's teardown.

    Everything that matters is done (requests answered or aborted, the engine thread
    stopped, the summary printed); what is left is unloading torch and its modules,
    which takes 1-3 s on a busy 2-core machine and would push the exit past
    ``--shutdown-grace-s``.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shutdown_summary(engine, signals: list[int]) -> str:
    """One line after the server stopped: why, and what is left in the engine (nothing, and every KV block
    free, when the shutdown was clean)."""
    import signal as _signal

    stats = engine.stats()
    why = ", ".join(_signal.Signals(s).name for s in signals) or "no signal"
    kv = (f", KV blocks free {int(stats['kv_blocks_free'])}/{int(stats['kv_blocks_total'])}"
          if "kv_blocks_total" in stats else "")
    return (f"minisys: shut down ({why}): {int(stats['num_requests_in_engine'])} requests left in the engine"
            f"{kv}, {engine.num_aborted} aborted in all")
