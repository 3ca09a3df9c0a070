"""The map-reduce summarisation program (lesson 16's benchmark and lab): N chunk summaries, then a combine.

    chunk_0 ... chunk_{N-1}   (inputs)
      s0 = "Summarise ... {{chunk_0}}"   ...   s{N-1}      (map: independent, same instruction prefix)
      final = "Combine ... {{s0}} ... {{s{N-1}}}"          (reduce: waits for every map)

The map prompts start with the same instruction, so under the chat template
they share a prefix of whole KV blocks that the prefix cache computes once.
"""
from __future__ import annotations

from pathlib import Path

from .graph import Program

MAP = "Summarise the following text in one sentence.\n\nText:\n"
REDUCE = "Here are summaries of parts of one document. Combine them into a short paragraph.\n\n"


def map_reduce_program(chunks: list[str], map_tokens: int = 32, reduce_tokens: int = 64) -> Program:
    """One map call per chunk (``s0``, ``s1``, ...) and a ``final`` combine of their outputs."""
    prog = Program()
    summaries = []
    for i, text in enumerate(chunks):
        chunk = prog.input(f"chunk_{i}", text)
        summaries.append(prog.call(f"s{i}", f"{MAP}{chunk}", max_tokens=map_tokens))
    body = "".join(f"Part {i + 1}: {s}\n" for i, s in enumerate(summaries))
    prog.call("final", f"{REDUCE}{body}", max_tokens=reduce_tokens)
    return prog


def course_chunks(n: int, max_words: int = 60, source: str = "lessons/04-continuous-batching.md",
                  root: str | Path | None = None) -> list[str]:
    """``n`` passages of one lesson (at least 20 words each), as the document to summarise."""
    from ..rag.cli import REPO_ROOT
    from ..rag.corpus import build_corpus
    passages = [p.text for p in build_corpus(root or REPO_ROOT, [source], max_words=max_words)
                if len(p.text.split()) >= 20]
    if len(passages) < n:
        raise ValueError(f"{source} has {len(passages)} passages of 20+ words, fewer than {n}")
    return passages[:n]
