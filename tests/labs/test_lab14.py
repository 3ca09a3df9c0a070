"""Lab 14 tests: Llumnix's freeness, the least-loaded routing choice, live migration's block-copy rounds.

Oracles: freeness by hand from its definition (free blocks net of queued
demand, per running sequence plus the newcomer); the choice against a
brute-force scan written here (compute every replica's freeness, keep the
best by the router's order: highest freeness, then fewer running + waiting,
then the lower index) over random load tables.

Migration: a per-block rule (block i goes iff not copied yet and, unless
the round is final, full), a round-by-round replay checking every block is
copied exactly once and no partial block before the stop, and hand-computed
timelines (a stop-and-copy of everything; two rounds where the first
round's decoding fills exactly one block).

``reference_impl`` is minisys's own: ``minisys/cluster/policies.py`` and
``minisys/cluster/migration.py`` (what the router and the replicas run).
"""
from __future__ import annotations

import math
import random
import types

import pytest

from minisys.cluster.policies import LoadReport


def reference_impl():
    from minisys.cluster.migration import plan_copy_round, simulate_migration
    from minisys.cluster.policies import freeness, pick_least_loaded

    def plan(num_computed_tokens, block_size, num_copied_blocks, stop_threshold_blocks=1, force_final=False):
        r = plan_copy_round(num_computed_tokens, block_size, num_copied_blocks, stop_threshold_blocks, force_final)
        return r.block_indices, r.final

    def simulate(*args, **kw):
        t = simulate_migration(*args, **kw)
        return t.round_blocks, t.downtime_s, t.total_s

    return types.SimpleNamespace(freeness=freeness, pick_least_loaded=pick_least_loaded,
                                 plan_copy_round=plan, simulate_migration=simulate)


def report(free=100, running=0, waiting=0, demand=0, total=128, bs=16) -> LoadReport:
    return LoadReport(free_blocks=free, total_blocks=total, block_size=bs, running=running, waiting=waiting,
                      queued_demand_blocks=demand)


def brute_force(loads: dict[int, LoadReport]) -> int:
    """Scan every replica: the highest (free - demand) / (running + 1); ties by fewer requests, lower index."""
    best_i, best_key = None, None
    for i in sorted(loads):
        r = loads[i]
        key = ((r.free_blocks - r.queued_demand_blocks) / (r.running + 1), -(r.running + r.waiting), -i)
        if best_key is None or key > best_key:
            best_i, best_key = i, key
    return best_i


# ------------------------------------------------------------------ 1. freeness
@pytest.mark.points(1)
@pytest.mark.exercise("freeness")
def test_freeness_by_hand(impl):
    assert impl.freeness(report(free=100)) == pytest.approx(100)            # idle: everything for the newcomer
    assert impl.freeness(report(free=100, running=3)) == pytest.approx(25)  # shared by 3 + 1 sequences
    assert impl.freeness(report(free=90, running=2, waiting=5)) == pytest.approx(30)   # waiting is not the batch


@pytest.mark.points(2)
@pytest.mark.exercise("freeness")
def test_freeness_is_net_of_the_queues_demand(impl):
    assert impl.freeness(report(free=80, demand=60)) == pytest.approx(20)
    assert impl.freeness(report(free=80, running=1, demand=60)) == pytest.approx(10)
    assert impl.freeness(report(free=10, demand=30)) == pytest.approx(-20)   # the queue wants more than is free


# ------------------------------------------------------------------ 2. the least-loaded choice
@pytest.mark.points(2)
@pytest.mark.exercise("pick_least_loaded")
def test_choice_matches_a_brute_force_scan(impl):
    rng = random.Random(0)
    for _ in range(400):
        ids = rng.sample(range(8), rng.randrange(1, 6))
        loads = {i: report(free=rng.randrange(0, 60), running=rng.randrange(0, 6), waiting=rng.randrange(0, 4),
                           demand=rng.randrange(0, 30)) for i in ids}
        assert impl.pick_least_loaded(loads) == brute_force(loads), loads


@pytest.mark.points(1)
@pytest.mark.exercise("pick_least_loaded")
def test_queued_demand_and_the_batch_decide_not_free_blocks_alone(impl):
    assert impl.pick_least_loaded({0: report(free=80, demand=60), 1: report(free=50)}) == 1
    assert impl.pick_least_loaded({0: report(free=100, running=4), 1: report(free=40)}) == 1
    assert impl.pick_least_loaded({0: report(free=40), 1: report(free=100, running=4)}) == 0


@pytest.mark.points(1)
@pytest.mark.exercise("pick_least_loaded")
def test_ties_go_to_fewer_requests_then_the_lower_index(impl):
    same = dict(free=60, running=1)
    assert impl.pick_least_loaded({0: report(**same, waiting=2), 1: report(**same, waiting=0)}) == 1
    assert impl.pick_least_loaded({3: report(**same), 1: report(**same), 2: report(**same)}) == 1
    assert impl.pick_least_loaded({2: report(free=0), 5: report(free=0)}) == 2


@pytest.mark.points(1)
@pytest.mark.exercise("pick_least_loaded")
def test_replicas_out_of_rotation_are_absent_and_none_left_is_an_error(impl):
    assert impl.pick_least_loaded({2: report(free=5)}) == 2                 # the only one left, however full
    assert impl.pick_least_loaded({0: report(free=10), 2: report(free=50)}) == 2
    with pytest.raises(ValueError):
        impl.pick_least_loaded({})


# ------------------------------------------------------------ live migration
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
