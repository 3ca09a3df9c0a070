"""A vector index over normalised embeddings: faiss (flat, IVF, HNSW) with numpy brute force beside it.

    VectorIndex.build(vectors, kind="flat" | "ivf" | "hnsw")  ->  .search(queries, k) -> (scores, ids)
    search_naive(vectors, queries, k)                          the oracle: every inner product, sorted

Similarity is the inner product (cosine, for the L2-normalised vectors of
`minisys.rag.embed`); higher is closer. Results: ``scores`` (Q, k) float32
in decreasing order and ``ids`` (Q, k) int64 row numbers of ``vectors``;
when k exceeds the collection, the tail is score ``-inf``, id ``-1`` (faiss's
convention).

* ``flat`` (``IndexFlatIP``): exact; every query scores every vector — what
  `search_naive` does, in faiss's SIMD/BLAS kernels.
* ``ivf`` (``IndexIVFFlat``): k-means into ``nlist`` cells, a query scans the
  ``nprobe`` nearest cells only — approximate, needs a training pass.
* ``hnsw`` (``IndexHNSWFlat``): a navigable small-world graph of ``M`` links
  per node, searched greedily with a beam of ``ef_search`` — approximate, no
  training.

Ties: vectors with equal scores may come back in any order (faiss's heap does
not order them); `search_naive` orders them by id.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    """How to build the index. ``nlist`` 0 = about sqrt(N) cells (at least 1, at most N // 39 so every
    cell gets faiss's 39 training points); ``nprobe`` cells scanned per query (IVF);
    ``hnsw_m`` links per node and ``ef_search`` the search beam (HNSW)."""

    kind: str = "flat"
    nlist: int = 0
    nprobe: int = 8
    hnsw_m: int = 32
    ef_search: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("nlist",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("nprobe", "hnsw_m", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _as_matrix(x, name: str) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {a.shape}")
    return a


def search_naive(vectors, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: every inner product in float64, sorted by (score descending, id ascending)."""
    X, Q = _as_matrix(vectors, "vectors").astype(np.float64), _as_matrix(queries, "queries").astype(np.float64)
    scores = Q @ X.T                                                         # (Q, N)
    n = X.shape[0]
    ids = np.full((Q.shape[0], k), -1, dtype=np.int64)
    out = np.full((Q.shape[0], k), -np.inf, dtype=np.float32)
    for q in range(Q.shape[0]):
        order = np.lexsort((np.arange(n), -scores[q]))[:k]                  # primary key last
        ids[q, :len(order)] = order
        out[q, :len(order)] = scores[q, order]
    return out, ids


class VectorIndex:
    """A faiss index of ``dim``-dimensional vectors (ids = insertion order)."""

    def __init__(self, index, config: IndexConfig) -> None:
        self.index, self.config = index, config

    @classmethod
    def build(cls, vectors, config: IndexConfig | None = None) -> "VectorIndex":
        import faiss
        config = config or IndexConfig()
        X = _as_matrix(vectors, "vectors")
        n, d = X.shape
        if config.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = config.ef_search
        else:
            nlist = config.nlist or max(1, min(int(round(np.sqrt(n))), n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = config.seed
            index.train(X)
            index.nprobe = min(config.nprobe, nlist)
        index.add(X)
        return cls(index, config)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) descending, ids (Q, k)) of each query's k nearest vectors."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        Q = _as_matrix(queries, "queries")
        if Q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {Q.shape[1]}, the index {self.dim}")
        scores, ids = self.index.search(Q, k)
        scores[ids < 0] = -np.inf                    # faiss pads with -FLT_MAX for inner products
        return scores, ids.astype(np.int64)

    def save(self, path: str | Path) -> None:
        import faiss
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, config: IndexConfig) -> "VectorIndex":
        import faiss
        index = faiss.read_index(str(path))
        if config.kind == "ivf":
            index.nprobe = config.nprobe
        elif config.kind == "hnsw":
            index.hnsw.efSearch = config.ef_search
        return cls(index, config)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Fraction of the true k neighbours (ids >= 0) that the approximate search found."""
    hits = total = 0
    for f, t in zip(found_ids, true_ids):
        truth = set(int(i) for i in t if i >= 0)
        hits += len(truth & set(int(i) for i in f))
        total += len(truth)
    return hits / max(total, 1)
