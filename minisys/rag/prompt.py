"""The RAG prompt: retrieved passages in a canonical order, block-aligned, so their KV is reused.

    head | passage a | passage b | ... | question + the chat template's tail
    (each of head and passages padded to a multiple of the KV block size)

The engine's prefix cache (lesson 03) reuses the KV of whole blocks whose
token prefix — everything from the first token — is identical. RAGCache's
idea (Jin et al., 2024), in its simplest form here: make retrieved documents
a *shared prefix* as often as possible, so a popular passage is prefilled once
and later queries that retrieve it reuse its blocks.

* **Canonical order.** The passages of one query are sorted by passage id
  (a stable key), not by retrieval score: two queries that retrieve {7, 3}
  and {3, 7} get the identical prompt prefix.
* **Token segments.** Each segment (the head, each passage) is tokenized on
  its own and the prompt is the concatenation of the ids, so a passage's
  tokens never depend on the text around it (BPE merges across a boundary
  would change them).
* **Block alignment.** Each segment is padded with newline tokens to a
  multiple of ``block_size``, so the blocks of ``head + a`` are whole and
  reusable whatever follows ``a``; unpadded, the block that holds a's end and
  b's start is reusable only when b follows too.

Limits (stated, not hidden): only a common *prefix* is reused. A passage that
appears after a different one has different KV (its positions and the tokens
it attends to differ), so {3, 9} after {3, 7} reuses head + 3 and recomputes
9. Reusing a passage's KV anywhere in the prompt needs position-independent
caching with a partial recomputation to restore cross-attention: CacheBlend
(Yao et al., 2024) and Prompt Cache (Gim et al., 2024) are the readings. A
popularity-first order (most retrieved passages first) would share longer
prefixes under a skewed stream (``order_key``; `minisys.bench.compound` measures it with counts
of the queries so far) but changes order, and so loses reuse, as popularity drifts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .corpus import Passage

SYSTEM = ("Answer the question using only the passages below, in one or two sentences. "
          "If they do not contain the answer, say so.")
_SLOT = "\x00QUESTION\x00"


@dataclass(frozen=True)
class RagPrompt:
    token_ids: list[int]
    passage_ids: list[int]          # in prompt order
    segment_ends: list[int]         # token offset where the head and each passage end (block multiples if aligned)


def canonical_order(passages: Sequence[Passage], key: Callable[[Passage], Any] | None = None) -> list[Passage]:
    """The retrieved passages sorted by ``key`` (default: the passage id), duplicates dropped: the same
    set gives the same order. A key must be a total order that is stable while prefixes are to be reused
    (e.g. ``(-popularity, id)`` with popularity counts that change rarely)."""
    return sorted({p.id: p for p in passages}.values(), key=key or (lambda p: p.id))


def passage_text(p: Passage) -> str:
    return f"[{p.title()}]\n{p.text}\n\n"


def _pad(ids: list[int], block_size: int, pad_id: int) -> list[int]:
    return ids + [pad_id] * (-len(ids) % block_size)


def build_rag_prompt(tokenizer, question: str, passages: Sequence[Passage], block_size: int = 16,
                     canonical: bool = True, align: bool = True, system: str = SYSTEM,
                     order_key: Callable[[Passage], Any] | None = None) -> RagPrompt:
    """The chat prompt (the model's own template) with ``passages`` before ``question``, as token ids.

    ``canonical``: sort by ``order_key`` (default: passage id; else keep the given order, e.g. by
    retrieval score);
    ``align``: pad the head and each passage to a multiple of ``block_size`` tokens."""
    template = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": _SLOT}], True)
    if template.count(_SLOT) != 1:
        raise ValueError("the chat template must place the user message once")
    before, after = template.split(_SLOT)
    pad_id = tokenizer.encode("\n")[-1]
    ordered = canonical_order(passages, order_key) if canonical else list(passages)
    ids = tokenizer.encode(before + "Passages:\n\n")
    ids = _pad(ids, block_size, pad_id) if align else ids
    ends = [len(ids)]
    for p in ordered:
        seg = tokenizer.encode(passage_text(p))
        ids += _pad(seg, block_size, pad_id) if align else seg
        ends.append(len(ids))
    ids += tokenizer.encode(f"Question: {question}{after}")
    return RagPrompt(ids, [p.id for p in ordered], ends)
