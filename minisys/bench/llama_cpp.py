"""llama.cpp as the batch-1 yardstick: an f32 GGUF of minisys's own weights, and a timed greedy decode.

llama.cpp (through ``llama-cpp-python``, an optional benchmark dependency: ``make bench-deps``)
is the reference for one stream on a CPU: hand-written SIMD matrix-vector kernels reading the
weights once per token. To compare at equal precision it must run the SAME weights minisys runs:

* `f32_gguf` writes, once, an F32 copy of the default model's GGUF: every Q4_1 tensor dequantized
  exactly as minisys dequantizes it (`minisys.model.quant`, checked against ``gguf.quants``), all
  metadata copied (tokenizer, chat template, RoPE base), ``general.file_type`` set to ALL_F32. The
  Q/K rows stay in llama.cpp's own permuted order (minisys undoes it when it converts; llama.cpp
  expects it), so both sides compute the same fp32 model.
* `decode_llama_cpp` feeds a prompt, then N greedy tokens one at a time (``Llama.eval``, argmax
  of the last row of logits), and times the prefill (TTFT) and each decode step.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -r requirements-bench.txt   '
           '(or: make bench-deps; builds llama.cpp from source: several minutes)')


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None when it is not importable."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def f32_gguf(src: Path | None = None, dst: Path | None = None, quiet: bool = True) -> Path:
    """An F32 GGUF of ``src`` (default: the default model's verified GGUF), written once next to it."""
    from ..model.store import fetch_gguf
    src = src or fetch_gguf(quiet=quiet)
    dst = dst or src.with_name(src.name.replace(".Q4_1.gguf", "").removesuffix(".gguf") + ".F32.gguf")
    if dst.exists():
        return dst
    part = dst.with_suffix(".part")
    write_f32_gguf(src, part)
    part.rename(dst)
    return dst


def write_f32_gguf(src: Path, dst: Path) -> None:
    """Copy ``src``'s metadata and its tensors, dequantized to float32, into a new GGUF ``dst``."""
    import gguf
    import numpy as np

    from ..model.quant import dequantize
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue                                   # written by GGUFWriter itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type.name).reshape([int(s) for s in reversed(t.shape)])
        writer.add_tensor(t.name, np.ascontiguousarray(w, dtype=np.float32))   # (rows, cols): F32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_llama_cpp(path: Path, threads: int, n_ctx: int):
    """A llama.cpp context on ``path`` with ``threads`` threads (prefill and decode alike), quiet."""
    from llama_cpp import Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def decode_llama_cpp(llm, prompt_ids: list[int], new_tokens: int) -> dict:
    """Greedy: the prompt in one batch, then ``new_tokens - 1`` single-token steps (argmax of the logits).

    Returns ttft_s (prompt in, first token out), the per-step decode seconds and the tokens.
    """
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids)
    tokens = [_argmax_last(llm)]
    ttft = time.perf_counter() - t
    steps = []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        llm.eval(tokens[-1:])
        tokens.append(_argmax_last(llm))
        steps.append(time.perf_counter() - t)
    return {"ttft_s": ttft, "step_s": steps, "ms_per_token": 1e3 * statistics.median(steps), "tokens": tokens}


def _argmax_last(llm) -> int:
    """Greedy token from the last evaluated position's logits (read from the context: ``Llama.scores``
    is only filled with ``logits_all=True``, which would copy every position's logits)."""
    import numpy as np
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))
