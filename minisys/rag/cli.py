"""python -m minisys rag index | query | ask : retrieval-augmented generation over the course's own text.

    python -m minisys rag index [--kind flat|ivf|hnsw]      embed every passage, build the index
    python -m minisys rag query "How does the prefix cache work?" [-k 3]
    python -m minisys rag ask "What does the prefix cache reuse?" [-k 3] [--max-tokens 64]

The index lives in a cache directory, not the repository (default
``$MINISYS_CACHE/rag`` or ``~/.cache/minisys/rag``): ``passages.jsonl``,
``vectors.npy`` (N, C) float32, ``index.faiss`` and ``meta.json`` (what built
it). Queries are embedded by the same model as the passages (the served one,
`minisys.rag.embed`); ``ask`` answers greedily from the retrieved passages,
in the canonical, block-aligned prompt of `minisys.rag.prompt`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .corpus import DEFAULT_MAX_WORDS, Passage, build_corpus, load_passages, save_passages
from .index import KINDS, IndexConfig, VectorIndex

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_dir() -> Path:
    from ..model.store import cache_dir
    return cache_dir() / "rag"


@dataclass
class RagStore:
    """An index on disk and what it indexes: ``passages[i]`` is row i of ``vectors`` and id i of ``index``."""

    passages: list[Passage]
    vectors: np.ndarray            # (N, C) float32, L2-normalised
    index: VectorIndex
    meta: dict

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        save_passages(self.passages, out / "passages.jsonl")
        np.save(out / "vectors.npy", self.vectors)
        self.index.save(out / "index.faiss")
        (out / "meta.json").write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, out: Path) -> "RagStore":
        if not (out / "meta.json").is_file():
            raise ValueError(f"no index in {out}: run `python -m minisys rag index` first")
        meta = json.loads((out / "meta.json").read_text())
        index = VectorIndex.load(out / "index.faiss", IndexConfig(**meta["index"]))
        return cls(load_passages(out / "passages.jsonl"), np.load(out / "vectors.npy"), index, meta)

    def retrieve(self, query_vector: np.ndarray, k: int) -> list[tuple[Passage, float]]:
        """The k passages nearest the query, best first, with their scores."""
        scores, ids = self.index.search(query_vector[None, :], k)
        return [(self.passages[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]


def embed_texts(llm, texts: list[str]) -> np.ndarray:
    """(len(texts), C) float32 vectors from the served model (`LLM.embed`)."""
    return np.asarray([o.outputs.embedding for o in llm.embed(texts)], dtype=np.float32)


def build_store(llm, root: Path, sources: list[str] | None, config: IndexConfig,
                max_words: int = DEFAULT_MAX_WORDS, model_name: str = "default",
                limit: int | None = None) -> RagStore:
    """Embed the passages of ``sources`` under ``root`` (the first ``limit`` of them, if given) and index them."""
    passages = build_corpus(root, sources, max_words)[:limit]
    if not passages:
        raise ValueError("no passages: the sources are empty")
    vectors = embed_texts(llm, [p.embedding_text() for p in passages])
    meta = {"model": model_name, "sources": sorted({p.source for p in passages}),
            "max_words": max_words, "num_passages": len(passages), "index": asdict(config),
            "embedding": "mean-pooled final hidden states, L2-normalised"}
    return RagStore(passages, vectors, VectorIndex.build(vectors, config), meta)


def answer(llm, store: RagStore, question: str, k: int, max_tokens: int, block_size: int = 16):
    """(retrieved [(passage, score)], RagPrompt, answer text): retrieve, build the canonical prompt,
    generate greedily."""
    from ..engine.sampling_params import SamplingParams
    from .prompt import build_rag_prompt
    hits = store.retrieve(embed_texts(llm, [question])[0], k)
    prompt = build_rag_prompt(llm.tokenizer, question, [p for p, _ in hits], block_size=block_size)
    out = llm.generate({"prompt_token_ids": prompt.token_ids}, SamplingParams(temperature=0, max_tokens=max_tokens),
                       use_tqdm=False)[0]
    return hits, prompt, out.outputs[0].text


def _llm(args):
    from ..llm import LLM
    return LLM(args.model, device=args.device, dtype=args.dtype, quiet=True)


def cmd_index(args) -> int:
    llm = _llm(args)
    config = IndexConfig(kind=args.kind, nprobe=args.nprobe, ef_search=args.ef_search)
    store = build_store(llm, Path(args.root), args.source or None, config, args.max_words,
                        model_name=args.model or "default", limit=args.limit)
    store.save(Path(args.dir))
    print(f"indexed {len(store.passages)} passages from {len(store.meta['sources'])} files "
          f"({args.kind}, {store.vectors.shape[1]} dimensions) into {args.dir}")
    return 0


def _load(args):
    """The stored index and the model; refused when the index was built by another model."""
    store = RagStore.load(Path(args.dir))
    if store.meta["model"] != (args.model or "default"):
        raise ValueError(f"the index in {args.dir} was built with model {store.meta['model']!r}; "
                         f"query it with the same --model (or rebuild it)")
    return store, _llm(args)


def cmd_query(args) -> int:
    store, llm = _load(args)
    for rank, (p, score) in enumerate(store.retrieve(embed_texts(llm, [args.question])[0], args.k), 1):
        print(f"{rank}. [{score:.3f}] #{p.id} {p.title()}\n   {p.text[:300].replace(chr(10), ' ')}\n")
    return 0


def cmd_ask(args) -> int:
    store, llm = _load(args)
    hits, prompt, text = answer(llm, store, args.question, args.k, args.max_tokens)
    print("retrieved: " + "; ".join(f"#{p.id} {p.title()} ({s:.3f})" for p, s in hits))
    print(f"prompt: {len(prompt.token_ids)} tokens, passages in canonical order {prompt.passage_ids}")
    print(f"answer: {text.strip()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minisys rag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, hlp in (("index", cmd_index, "embed the course's passages and build the vector index"),
                          ("query", cmd_query, "print the passages nearest a question"),
                          ("ask", cmd_ask, "retrieve, then answer with the model (greedy)")):
        s = sub.add_parser(name, help=hlp)
        if name != "index":
            s.add_argument("question")
            s.add_argument("-k", type=int, default=3, help="passages to retrieve")
        s.add_argument("--dir", default=str(default_dir()), help="where the index is kept")
        s.add_argument("--model", default=None)
        s.add_argument("--device", default=None)
        s.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                           help="default: bfloat16 on CUDA, float32 on CPU; auto: bf16 where the hardware computes it "
                           "natively (CUDA, AVX-512-BF16/AMX CPUs), else float32")
        s.set_defaults(func=fn)
        if name == "index":
            s.add_argument("--kind", default="flat", choices=KINDS)
            s.add_argument("--nprobe", type=int, default=8, help="ivf: cells scanned per query")
            s.add_argument("--ef-search", type=int, default=128, help="hnsw: search beam")
            s.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS, help="words per passage, at most")
            s.add_argument("--limit", type=int, default=None, help="index only the first N passages (quick runs)")
            s.add_argument("--root", default=str(REPO_ROOT), help="the repository whose text is indexed")
            s.add_argument("--source", action="append", default=None,
                           help="a file under --root to index (repeatable; default: lessons/*.md, "
                                "docs/syllabus.md, README.md)")
        if name == "ask":
            s.add_argument("--max-tokens", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "k", 1) < 1:
        print("error: -k must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
