"""Command-line entry points: generate, chat, serve, grade, labs, bench, rag.

``generate`` and ``chat`` stream one conversation on the eager path
(``LLM(engine="eager")``: a contiguous KV cache sized to the request);
``serve`` runs the engine (continuous batching over a paged KV cache).

    python -m minisys generate "What is the capital of France?"
    python -m minisys chat
    python -m minisys grade labs/01-tokens-to-text.ipynb [--results results.json]
    python -m minisys labs build | check
    python -m minisys labs start 01            # a working copy: work/01-tokens-to-text.ipynb
    python -m minisys bench kv-cache | attention | paged-kv | throughput | latency | chunked | spec | serve | scheduling | soak | facts | compound | tp | cluster
    python -m minisys bench gpu [--dry-run]      # the one-shot GPU check (appendix B); dtype: fp32 vs bf16 here
    python -m minisys serve [--port 8000] [--engine llm|eager] [--api-key KEY]
    python -m minisys serve --replicas 2 [--routing-policy least_loaded]   # lesson 14: a router over 2 servers
    python -m minisys serve --replicas 3 --kv-connector gloo [--prefill-replicas 1]   # lesson 14: KV transfer
    python -m minisys rag index | query "..." | ask "..."   # lesson 16: RAG over the course's text
"""
from __future__ import annotations

import argparse
import sys


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF directory or .gguf (default: $MINISYS_MODEL "
                   "or SmolLM2-135M-Instruct from the package cache)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU; auto: bf16 where the hardware computes it "
                   "natively (CUDA, AVX-512-BF16/AMX CPUs), else float32")
    p.add_argument("--attention", default="auto",
                   help="attention backend (auto, reference, sdpa, tiled, decode, decode-splitk, paged)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="convert the model into the cache again (a damaged cache is rebuilt anyway)")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _llm(args):
    """An `LLM` on the eager path: `generate` and `chat` stream one conversation token by token,
    so they need no engine (and no paged KV pool sized for many requests)."""
    from .llm import LLM
    return LLM(args.model, device=args.device, dtype=args.dtype, attention_backend=args.attention,
               use_kv_cache=not args.no_kv_cache, engine="eager", rebuild_cache=args.rebuild_cache)


def _params(args):
    from .engine.sampling_params import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_tokens=args.max_tokens, stop=args.stop)


def cmd_generate(args) -> int:
    llm = _llm(args)
    params = _params(args)
    prompt = (llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
              if not args.raw else args.prompt)
    ids = llm.tokenizer.encode(prompt)
    llm.runner.check_prompt(ids, params)
    for ev in llm.runner.stream(ids, params):
        print(ev.text_delta, end="", flush=True)
    print()
    return 0


def cmd_chat(args) -> int:
    from rich.console import Console

    console = Console()
    llm = _llm(args)
    params = _params(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    console.print("[bold]minisys chat[/bold] — SmolLM2 on "
                  f"{llm.model.device}. Type a message; /reset clears the history, /quit or Ctrl-D leaves.")
    while True:
        try:
            user = console.input("[bold green]you> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if user.strip() in ("/quit", "/exit"):
            return 0
        if user.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))
        try:
            llm.runner.check_prompt(ids, params)
        except ValueError as e:
            console.print(f"[red]{e}[/red] — try /reset")
            messages.pop()
            continue
        console.print("[bold blue]bot> [/]", end="")
        reply = ""
        for ev in llm.runner.stream(ids, params):
            reply += ev.text_delta
            console.print(ev.text_delta, end="", markup=False, highlight=False)
        console.print()
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    from .server.launch import serve
    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt (chat template applied unless --raw)")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="complete the text as is, no chat template")
    _model_args(g)
    _sampling_args(g, max_tokens=128)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat in the terminal")
    c.add_argument("--system", default=None, help="system prompt")
    _model_args(c)
    _sampling_args(c, max_tokens=256)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default 127.0.0.1:8000)")
    from .server.launch import add_serve_args
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    sub.add_parser("grade", help="grade a lab notebook (see minisys/grading)", add_help=False)
    sub.add_parser("labs", help="build or check the student notebooks; start NN: copy one to work/",
                   add_help=False)
    sub.add_parser("rag", help="retrieval-augmented generation over the course's text: index, query, ask",
                   add_help=False)
    sub.add_parser("bench", help="run a benchmark (kv-cache, attention, paged-kv, throughput, chunked, spec, "
                                 "serve, scheduling, soak, tp, cluster, gpu, dtype, ...) or the lessons' small measured facts (facts)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "grade":
        from .grading.grader import main_grade
        return main_grade(argv[1:])
    if argv and argv[0] == "bench":
        from .bench.__main__ import main as main_bench
        return main_bench(argv[1:])
    if argv and argv[0] == "rag":
        from .rag.cli import main as main_rag
        return main_rag(argv[1:])
    if argv and argv[0] == "labs":
        from .grading.notebooks import main_labs
        return main_labs(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
