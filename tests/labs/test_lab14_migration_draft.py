"""Lab 14 tests (draft part): live migration's block-copy rounds.

Oracles: a per-block rule (block i goes iff not copied yet and, unless the
round is final, full), a round-by-round replay checking every block is copied
exactly once and no partial block before the stop, and hand-computed
timelines (a stop-and-copy of everything; two rounds where the first round's
decoding fills exactly one block).

``reference_impl`` is minisys's own (`minisys/cluster/migration.py`).
"""
from __future__ import annotations

import math
import random
import types

import pytest


def reference_impl():
    from minisys.cluster.migration import plan_copy_round, simulate_migration

    def plan(num_computed_tokens, block_size, num_copied_blocks, stop_threshold_blocks=1, force_final=False):
        r = plan_copy_round(num_computed_tokens, block_size, num_copied_blocks, stop_threshold_blocks, force_final)
        return r.block_indices, r.final

    def simulate(*args, **kw):
        t = simulate_migration(*args, **kw)
        return t.round_blocks, t.downtime_s, t.total_s

    return types.SimpleNamespace(plan_copy_round=plan, simulate_migration=simulate)


def _rule(computed, bs, copied, threshold, force):
    total = -(-computed // bs)
    final = force or total - copied <= threshold
    return [i for i in range(total) if i >= copied and (final or (i + 1) * bs <= computed)], final


@pytest.mark.points(2)
@pytest.mark.exercise("plan_copy_round")
def test_plan_follows_the_per_block_rule(impl):
    for bs in (1, 4, 16):
        for computed in range(1, 4 * bs + 3):
            for copied in range(computed // bs + 1):
                for threshold in (1, 2):
                    for force in (False, True):
                        blocks, final = impl.plan_copy_round(computed, bs, copied, threshold, force)
                        assert (list(blocks), bool(final)) == _rule(computed, bs, copied, threshold, force), \
                            (computed, bs, copied, threshold, force)


@pytest.mark.points(1)
@pytest.mark.exercise("plan_copy_round")
def test_a_replayed_migration_copies_each_block_once_and_no_partial_block_early(impl):
    rng = random.Random(3)
    for _ in range(200):
        bs, computed = rng.choice([2, 4, 16]), rng.randint(1, 120)
        copied, sent = 0, []
        for round_no in range(100):
            blocks, final = impl.plan_copy_round(computed, bs, copied, 1, round_no == 99)
            assert final or all((i + 1) * bs <= computed for i in blocks), "a partial block copied before the stop"
            sent += list(blocks)
            if final:
                break
            copied += len(blocks)
            computed += rng.randint(0, 2 * bs)
        assert sent == list(range(-(-computed // bs)))


@pytest.mark.points(1)
@pytest.mark.exercise("simulate_migration")
def test_stop_and_copy_of_everything_is_one_round_all_downtime(impl):
    rounds, down, total = impl.simulate_migration(100, 16, 0.01, 0.05, stop_threshold_blocks=math.inf)
    assert list(rounds) == [7] and down == pytest.approx(0.07) and total == pytest.approx(0.07)


@pytest.mark.points(2)
@pytest.mark.exercise("simulate_migration")
def test_rounds_find_the_blocks_filled_meanwhile(impl):
    # 64 tokens = 4 full blocks of 16: round 1 copies them in 0.4 s, during which 20 tokens are decoded
    # (84: 5 full blocks + a partial one, 2 left > 1): round 2 copies block 4 (0.1 s, 5 more tokens: 89),
    # then only the partial block 5 is left: the stop copies it.
    rounds, down, total = impl.simulate_migration(64, 16, 0.1, 0.02, stop_threshold_blocks=1)
    assert list(rounds) == [4, 1, 1]
    assert down == pytest.approx(0.1) and total == pytest.approx(0.6)


@pytest.mark.points(1)
@pytest.mark.exercise("simulate_migration")
def test_max_rounds_forces_the_stop(impl):
    # the request fills blocks faster than they are copied: without the cap it would never converge
    rounds, down, total = impl.simulate_migration(64, 4, 1.0, 0.01, max_rounds=3)
    assert len(rounds) == 3
    assert down == pytest.approx(rounds[-1] * 1.0) and total == pytest.approx(sum(rounds) * 1.0)
