"""Lab 16 tests: the canonical RAG prompt for KV reuse, the DAG scheduler's ready-set step.

Oracles: for the prompt, the engine's own prefix cache (minisys's
``BlockAllocator``, the pure-Python allocator the engine uses) counting the
blocks a second query finds, plus the prompt's layout worked out here (each
segment starts on a block boundary, the passages' text in id order once
pad tokens are dropped); for the ready set, the standard library's
``graphlib.TopologicalSorter`` stepped through the same completions.

``reference_impl`` is minisys's own: ``minisys/rag/prompt.py`` (the canonical
order and the padding) and ``minisys/programs/scheduler.py`` (``ready_set``).
"""
from __future__ import annotations

import graphlib
import random
import types

import pytest

from minisys.kv.block_allocator import BlockAllocator

PAD = 0


def reference_impl():
    from minisys.programs.scheduler import ready_set
    from minisys.rag.prompt import _pad, canonical_order

    def canonical_prompt(head, passages, retrieved, question, block_size, pad_id):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        order = canonical_order([types.SimpleNamespace(id=pid) for pid in retrieved])     # sorted by .id
        out = _pad(list(head), block_size, pad_id)
        for p in order:
            out += _pad(list(passages[p.id]), block_size, pad_id)
        return out + list(question)

    return types.SimpleNamespace(rules=(canonical_order, _pad), canonical_prompt=canonical_prompt,
                                 ready_set=ready_set)


# ------------------------------------------------------------------ helpers (the oracles)
def corpus(rng: random.Random, n: int = 6) -> dict[int, list[int]]:
    """Passage id -> token ids (no pad token inside, lengths that rarely fill a block)."""
    return {pid: [rng.randint(1, 999) for _ in range(rng.randint(1, 23))] for pid in rng.sample(range(100), n)}


def cached_tokens_of_second(first: list[int], second: list[int], block_size: int) -> int:
    """Tokens of ``second`` the engine's prefix cache finds after ``first`` was served (then freed)."""
    alloc = BlockAllocator(64, block_size)
    assert alloc.allocate("a", first)
    alloc.free("a")
    got = alloc.allocate("b", second)
    assert got
    return got.num_cached_tokens


# ------------------------------------------------------------------ exercise: canonical_prompt
@pytest.mark.points(2)
@pytest.mark.exercise("canonical_prompt")
@pytest.mark.parametrize("seed", range(4))
def test_the_same_passages_in_any_order_give_the_same_prompt(impl, seed):
    rng = random.Random(seed)
    docs = corpus(rng)
    head, q = [7] * rng.randint(1, 20), [5, 6]
    picks = rng.sample(sorted(docs), 3)
    a = impl.canonical_prompt(head, docs, picks, q, 4, PAD)
    for _ in range(3):
        shuffled = picks[:]
        rng.shuffle(shuffled)
        assert impl.canonical_prompt(head, docs, shuffled + [shuffled[0]], q, 4, PAD) == a   # duplicates too


@pytest.mark.points(2)
@pytest.mark.exercise("canonical_prompt")
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_the_layout_is_head_then_passages_by_id_each_on_block_boundaries(impl, block_size):
    rng = random.Random(block_size)
    docs = corpus(rng)
    head, q = [9] * 5, [3, 4, 5]
    picks = rng.sample(sorted(docs), 3)
    ids = impl.canonical_prompt(head, docs, picks, q, block_size, PAD)
    assert ids[-len(q):] == q
    pos = 0
    for seg in [head] + [docs[p] for p in sorted(picks)]:
        assert pos % block_size == 0                     # every segment starts on a block boundary
        assert ids[pos:pos + len(seg)] == seg
        padded = len(seg) + (-len(seg) % block_size)
        assert ids[pos + len(seg):pos + padded] == [PAD] * (padded - len(seg))
        pos += padded
    assert len(ids) == pos + len(q)


@pytest.mark.points(2)
@pytest.mark.exercise("canonical_prompt")
def test_the_prefix_cache_reuses_every_passage_block_of_a_reordered_query(impl):
    """{a, b} then {b, a} with another question: the cache finds head + both passages."""
    rng = random.Random(7)
    docs = corpus(rng)
    a, b = sorted(docs)[:2]
    head, bs = [1, 2, 3], 4
    first = impl.canonical_prompt(head, docs, [b, a], [11, 12, 13, 14, 15], bs, PAD)
    second = impl.canonical_prompt(head, docs, [a, b], [21, 22, 23, 24, 25], bs, PAD)
    shared = len(first) - 5                             # everything before the question, whole blocks
    assert shared % bs == 0
    assert cached_tokens_of_second(first, second, bs) == shared
    # and a query retrieving only b after {a, b} shares at least the head's blocks
    third = impl.canonical_prompt(head, docs, [b], [31], bs, PAD)
    assert cached_tokens_of_second(first, third, bs) >= len(head) + (-len(head) % bs)


@pytest.mark.points(1)
@pytest.mark.exercise("canonical_prompt")
def test_bad_arguments_are_refused(impl):
    with pytest.raises(KeyError):
        impl.canonical_prompt([1], {1: [2]}, [3], [4], 4, PAD)
    with pytest.raises(ValueError):
        impl.canonical_prompt([1], {1: [2]}, [1], [4], 0, PAD)
    assert impl.canonical_prompt([1, 2], {}, [], [4], 2, PAD) == [1, 2, 4]


# ------------------------------------------------------------------ exercise: ready_set
def random_dag(rng: random.Random, n: int) -> dict[str, list[str]]:
    names = [f"c{i}" for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    return {names[i]: [names[j] for j in range(i) if rng.random() < 0.35] for i in order}


@pytest.mark.points(3)
@pytest.mark.exercise("ready_set")
@pytest.mark.parametrize("seed", range(8))
def test_ready_set_matches_graphlib_at_every_step(impl, seed):
    rng = random.Random(seed)
    deps = random_dag(rng, rng.randint(1, 10))
    rank = {n: (rng.randint(0, 1), i) for i, n in enumerate(deps)}
    oracle = graphlib.TopologicalSorter(deps)
    oracle.prepare()
    done, started, running = set(), set(), []
    while len(done) < len(deps):
        ready = impl.ready_set(deps, set(done), set(started), rank)
        assert sorted(ready) == sorted(oracle.get_ready())
        started.update(ready)
        running += ready
        finished = running.pop(rng.randrange(len(running)))
        done.add(finished)
        oracle.done(finished)
    assert impl.ready_set(deps, done, started, rank) == []


@pytest.mark.points(2)
@pytest.mark.exercise("ready_set")
def test_ready_calls_come_in_rank_order_and_never_twice(impl):
    deps = {"m0": [], "m1": [], "m2": [], "side": [], "combine": ["m0", "m1", "m2"], "final": ["combine", "side"]}
    rank = {"m0": (0, 0), "m1": (0, 1), "m2": (0, 2), "side": (1, 3), "combine": (0, 4), "final": (0, 5)}
    assert impl.ready_set(deps, set(), set(), rank) == ["m0", "m1", "m2", "side"]
    rank2 = {**rank, "side": (0, -1), "m2": (1, 2)}
    assert impl.ready_set(deps, set(), set(), rank2) == ["side", "m0", "m1", "m2"]
    started = {"m0", "m1", "m2", "side"}
    assert impl.ready_set(deps, {"m0", "m1"}, started, rank) == []         # combine waits for m2
    assert impl.ready_set(deps, {"m0", "m1", "m2"}, started, rank) == ["combine"]
    assert impl.ready_set(deps, {"m0", "m1", "m2"}, started | {"combine"}, rank) == []
