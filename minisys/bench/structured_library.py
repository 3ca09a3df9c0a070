"""Measure the two grammar libraries (xgrammar, llguidance) on this CPU with SmolLM2's tokenizer.

    python -m minisys bench structured-library      # writes bench/results/structured_library.json

Per library, on the 49152-token SmolLM2 tokenizer (read from the model cache):
  * tokenizer-info build time (once per tokenizer),
  * grammar compile time for a nested JSON schema (first compile, cache cleared),
  * per-token bitmask fill time while walking a valid instance's tokens (mean, p90),
  * import time and installed size (the package dirs; plus what pip would pull in).

Both must be installed to measure both (``pip install xgrammar==0.2.8 --no-deps
apache-tvm-ffi==0.1.15.post2`` keeps triton out); a missing one is reported as such.
minisys uses llguidance (`minisys.structured`); this script is the measurement behind the choice.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poetry", "engines"],
            "address": {"city": "London", "zip": "W1"}}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pkg_size_mb(*modules: str) -> float:
    total = 0
    for m in modules:
        spec = importlib.util.find_spec(m)
        if spec is not None and spec.submodule_search_locations:
            total += _dir_size(Path(list(spec.submodule_search_locations)[0]))
    return round(total / 2**20, 1)


def _fill_stats(times: list[float]) -> dict:
    times = sorted(times)
    return {"mask_fill_us_mean": round(1e6 * statistics.mean(times), 1),
            "mask_fill_us_p90": round(1e6 * times[int(0.9 * (len(times) - 1))], 1), "tokens": len(times)}


def measure_llguidance(tokenizer_json: str, eos: list[int], token_ids: list[int], vocab: int) -> dict:
    t = time.perf_counter()
    import llguidance
    imp = time.perf_counter() - t
    import llguidance.torch as lt      # (its import compiles a torch.compile kernel: not counted)
    t = time.perf_counter()
    tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
    build = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(tok, grammar)
    compile_s = time.perf_counter() - t
    assert not m.is_error(), m.get_error()
    mask = lt.allocate_token_bitmask(1, vocab)
    fills = []
    for tid in token_ids:
        t = time.perf_counter()
        lt.fill_next_token_bitmask(m, mask, 0)
        fills.append(time.perf_counter() - t)
        assert (int(mask[0, tid // 32]) >> (tid % 32)) & 1, "a valid token was masked"
        assert m.consume_token(tid), m.get_error()
    return {"version": llguidance.get_version() if hasattr(llguidance, "get_version") else "?",
            "import_s": round(imp, 3), "tokenizer_build_s": round(build, 3),
            "schema_compile_ms": round(1e3 * compile_s, 2), **_fill_stats(fills),
            "installed_mb": _pkg_size_mb("llguidance"), "extra_dependencies": []}


def measure_xgrammar(tokenizer, eos: list[int], token_ids: list[int], vocab: int) -> dict:
    t = time.perf_counter()
    import xgrammar as xgr
    imp = time.perf_counter() - t
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    build = time.perf_counter() - t
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                           separators=(",", ":"))
    compile_s = time.perf_counter() - t
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    fills = []
    for tid in token_ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        fills.append(time.perf_counter() - t)
        assert (int(mask[0, tid // 32]) >> (tid % 32)) & 1, "a valid token was masked"
        assert m.accept_token(tid)
    return {"version": importlib.metadata.version("xgrammar"), "import_s": round(imp, 3),
            "tokenizer_build_s": round(build, 3), "schema_compile_ms": round(1e3 * compile_s, 2),
            **_fill_stats(fills), "installed_mb": _pkg_size_mb("xgrammar", "tvm_ffi"),
            "extra_dependencies": ["apache-tvm-ffi (13 MB)",
                                   "triton 3.9.0 (286 MB wheel; a hard requirement, unused on CPU)"]}


def main(argv: list[str] | None = None) -> int:
    import importlib.metadata

    import torch  # noqa: F401  (imported first so the libraries' import times exclude torch)

    from ..model.loader import resolve_model_dir
    from ..model.tokenizer import Tokenizer
    from .common import save_result
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    tk = Tokenizer.from_dir(resolve_model_dir(None, quiet=True))
    hf_tk = tk._tk
    vocab = hf_tk.get_vocab_size(with_added_tokens=True)
    token_ids = tk.encode(json.dumps(INSTANCE, separators=(",", ":"))) + list(tk.eos_token_ids[:1])
    results: dict[str, dict] = {}
    for name, fn, arg in (("llguidance", measure_llguidance, hf_tk.to_str()), ("xgrammar", measure_xgrammar, hf_tk)):
        if importlib.util.find_spec(name) is None:
            results[name] = {"error": "not installed"}
            continue
        results[name] = fn(arg, list(tk.eos_token_ids), token_ids, vocab)
        print(name, json.dumps(results[name]))
    path = save_result("structured_library", {"vocab_size": vocab, "schema": SCHEMA, "instance": INSTANCE,
                                              "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
