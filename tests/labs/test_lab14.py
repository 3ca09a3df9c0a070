"""Lab 14 tests: Llumnix's freeness and the least-loaded routing choice.

Oracles: freeness by hand from its definition (free blocks net of queued
demand, per running sequence plus the newcomer); the choice against a
brute-force scan written here (compute every replica's freeness, keep the
best by the router's order: highest freeness, then fewer running + waiting,
then the lower index) over random load tables.

``reference_impl`` is minisys's own: ``minisys/cluster/policies.py`` (what the router runs).
"""
from __future__ import annotations

import random
import types

import pytest

from minisys.cluster.policies import LoadReport


def reference_impl():
    from minisys.cluster.policies import freeness, pick_least_loaded
    return types.SimpleNamespace(freeness=freeness, pick_least_loaded=pick_least_loaded)


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
