"""Lab 03, instructor-only cases (Gradescope shows them after grades are published).

Students see tests/labs/test_lab03.py; these check the same exercises on
inputs they did not see: long random block tables for ``slot_mapping`` and
hash chains that must depend on every earlier block. The oracle is the
definition (position -> block, offset), written out naively here.
"""

from __future__ import annotations

import random

import pytest

from test_lab03 import reference_impl  # noqa: F401 - impl's "reference" kind needs it


@pytest.mark.points(2)
@pytest.mark.exercise("slot_mapping")
@pytest.mark.parametrize("seed", [0, 1])
def test_slot_mapping_long_random_tables(impl, seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 5, 16])
    table = rng.sample(range(1000), 40)
    start = rng.randrange(0, 10 * bs)
    end = rng.randrange(start, 40 * bs + 1)
    expected = [table[pos // bs] * bs + pos % bs for pos in range(start, end)]
    assert list(impl.slot_mapping(table, start, end, bs)) == expected


@pytest.mark.points(2)
@pytest.mark.exercise("prefix_block_hashes")
def test_prefix_hash_depends_on_every_earlier_block(impl):
    base = list(range(32))
    changed = [99] + base[1:]  # only the first block differs
    a, b = impl.prefix_block_hashes(base, 4), impl.prefix_block_hashes(changed, 4)
    assert len(a) == len(b) == 8
    assert all(x != y for x, y in zip(a, b)), "a block's hash must cover the blocks before it"
    assert impl.prefix_block_hashes(base[:7], 4) == a[:1], "partial blocks get no hash"
