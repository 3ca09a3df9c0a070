"""Decode attention: one new query per sequence against a long KV cache.

In a decode step each sequence brings one token, whose query attends to all
S cached keys. Per KV head this is a matrix-vector product, (G, D) x (D, S):
every key and value is read once and used for 2 * G multiply-adds only, so
the step is bound by how fast the cache streams from memory, not by compute.
Two shapes of the same computation:

* ``decode``: one pass over the whole cache per sequence,
  softmax(q K^T / sqrt(D)) V, no mask needed (the newest query sees every key).
* ``decode-splitk`` (FlashDecoding): cut the cache into chunks, compute a
  *partial* attention per chunk -- its output o_c (normalised within the chunk)
  and its log-sum-exp lse_c = log(sum_j exp(s_j)) -- all chunks at once, then
  merge:

      w_c = exp(lse_c - max_c lse_c)
      O   = sum_c w_c * o_c / sum_c w_c

  which is exact because chunk c's softmax denominator is exp(lse_c). On a GPU
  the chunks run on different SMs, so a batch of a few long sequences fills
  the machine; the merge is tiny. FlashDecoding++ goes further and skips the
  max-rescaling by using one unified max fixed ahead of time.

Both handle grouped-query attention without copying KV heads (queries viewed
as (Hkv, G, D)) and compute in fp32. A sequence with more than one new token
(a prefill or a chunk of one) is handed to ``prefill`` (SDPA by default), so
these backends are correct on mixed batches too.
"""
from __future__ import annotations

import math

import torch

from .base import AttentionBackend, AttentionMetadata
from .sdpa import SDPAAttention


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries over N chunks of keys, each chunk on its own.

    q: (Hkv, G, D) already scaled by 1/sqrt(D); k, v: (N, C, Hkv, D), usually
    a view of the cache (``cache[:N * C].unflatten(0, (N, C))``).
    Returns outs (N, Hkv, G, D), each normalised within its chunk, and
    lses (N, Hkv, G), the log-sum-exp of each chunk's scores.

    One batched matmul per KV head, over the N chunks: ``k[:, :, h]`` is a
    strided view, so the cache is never copied (a single 4-D matmul over
    (Hkv, N) would have to make K and V contiguous first).
    """
    outs, lses = [], []
    for h in range(k.shape[2]):
        kh, vh = k[:, :, h].float(), v[:, :, h].float()                # (N, C, D), views in fp32
        scores = q[h].expand(k.shape[0], -1, -1) @ kh.transpose(1, 2)  # (N, G, C)
        m = scores.amax(dim=-1, keepdim=True)                           # (N, G, 1)
        p = torch.exp(scores - m)
        l = p.sum(dim=-1, keepdim=True)
        outs.append((p @ vh) / l)                                       # (N, G, D)
        lses.append((m + torch.log(l)).squeeze(-1))                     # (N, G)
    return torch.stack(outs, dim=1), torch.stack(lses, dim=1)           # (N, Hkv, G, D), (N, Hkv, G)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp merge of N partial attentions over disjoint key chunks.

    outs: (N, ..., D) chunk outputs, each normalised within its chunk;
    lses: (N, ...) log-sum-exp of each chunk's scores (-inf for an empty chunk).
    Returns (..., D): the attention over all keys of all chunks.
    """
    lse_max = lses.amax(dim=0)                                          # (...)
    lse_max = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(lses - lse_max)                                       # (N, ...)
    return (w.unsqueeze(-1) * outs).sum(dim=0) / w.sum(dim=0).unsqueeze(-1)


class DecodeAttention(AttentionBackend):
    """One pass over each sequence's cache; sequences with q_len > 1 go to ``prefill``."""

    name = "decode"

    def __init__(self, prefill: AttentionBackend | None = None) -> None:
        self.prefill = prefill if prefill is not None else SDPAAttention()

    def forward(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        if meta.seqlens_q == [1]:                     # batch 1 decoding: no output buffer, no loop
            return self.decode_query(q, k, v)
        out = torch.empty_like(q)
        cq, ck = meta.cu_q, meta.cu_k
        for i in range(meta.num_seqs):
            qi, ki, vi = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
            if meta.seqlens_q[i] == 1:
                out[cq[i]] = self.decode_query(qi, ki, vi)[0]
            else:
                sub = AttentionMetadata(seqlens_q=[meta.seqlens_q[i]], context_lens=[meta.context_lens[i]])
                out[cq[i]:cq[i + 1]] = self.prefill.forward_packed(qi, ki, vi, sub)
        return out

    def decode_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence's one query q (1, Hq, D) against its k, v (S, Hkv, D) -> (1, Hq, D) in q's dtype."""
        _, Hq, D = q.shape
        x = q if q.dtype == torch.float32 else q.float()
        qg = x.view(k.shape[1], -1, D) * self.scale(D)          # (Hkv, G, D): head h reads KV head h // G
        o = self.decode_one(qg, k, v).reshape(1, Hq, D)           # (1, Hq, D)
        return o if o.dtype == q.dtype else o.to(q.dtype)

    def decode_one(self, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """qg (Hkv, G, D) scaled; k, v (S, Hkv, D) -> (Hkv, G, D) in fp32."""
        k, v = (k, v) if k.dtype == torch.float32 else (k.float(), v.float())
        scores = qg @ k.permute(1, 2, 0)                        # (Hkv, G, S)
        probs = torch.softmax(scores, dim=-1)
        return probs @ v.permute(1, 0, 2)                       # (Hkv, G, D)


# One query against packed (S, Hkv, D) keys, without the split-K variant: the batch-1 attention of the
# paged cache's view (`minisys.attention.paged.decode_run`) and of the flat decode loop.
one_query = DecodeAttention().decode_query


class SplitKDecodeAttention(DecodeAttention):
    """FlashDecoding: partial attention per KV chunk, then a log-sum-exp merge.

    ``chunk_size`` keys per chunk (default 512), or, when ``num_splits`` is
    given, the cache of each sequence is cut into that many nearly equal
    chunks. The full chunks are views of the cache (no copy, no padding); a
    shorter last chunk is computed separately and merged like the others.
    """

    name = "decode-splitk"

    def __init__(self, chunk_size: int = 512, num_splits: int | None = None,
                 prefill: AttentionBackend | None = None) -> None:
        super().__init__(prefill)
        if chunk_size <= 0 or (num_splits is not None and num_splits <= 0):
            raise ValueError(f"chunk_size and num_splits must be positive, got {chunk_size}, {num_splits}")
        self.chunk_size, self.num_splits = chunk_size, num_splits

    def decode_one(self, qg, k, v):
        S = k.shape[0]
        C = math.ceil(S / self.num_splits) if self.num_splits else self.chunk_size
        n_full = S // C
        outs, lses = [], []
        if n_full:
            o, s = partial_attention(qg, k[:n_full * C].unflatten(0, (n_full, C)),   # (N, C, Hkv, D)
                                     v[:n_full * C].unflatten(0, (n_full, C)))
            outs.append(o)
            lses.append(s)
        if n_full * C < S:                                      # the shorter last chunk
            o, s = partial_attention(qg, k[n_full * C:].unsqueeze(0), v[n_full * C:].unsqueeze(0))
            outs.append(o)
            lses.append(s)
        return merge_partials(torch.cat(outs), torch.cat(lses))  # (Hkv, G, D)
