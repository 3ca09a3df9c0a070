"""Routing policies (minisys/cluster/policies.py) against small oracles written here.

Oracles: freeness computed by hand from Llumnix's definition; least_loaded
by a brute-force scan of every replica; round_robin by the replica order;
prefix_affinity by its contract (same first full blocks -> same replica,
whatever follows; a dead replica moves only its own keys; an overloaded home
falls back to the least-loaded replica).
"""
from __future__ import annotations

import random

import pytest

from minisys.cluster.policies import (LeastLoaded, LoadReport, PrefixAffinity, RoundRobin, freeness, make_policy,
                                      pick_least_loaded, prefix_key)


def report(free=100, running=0, waiting=0, demand=0, total=100, bs=16) -> LoadReport:
    return LoadReport(free_blocks=free, total_blocks=total, block_size=bs, running=running, waiting=waiting,
                      queued_demand_blocks=demand)


def test_freeness_by_hand():
    assert freeness(report(free=100)) == 100                   # idle: all of it for the newcomer
    assert freeness(report(free=100, running=3)) == 25         # 4 sequences share 100 blocks
    assert freeness(report(free=100, running=1, demand=40)) == 30
    assert freeness(report(free=10, running=0, demand=30)) == -20   # the queue wants more than is free


def brute_least_loaded(loads: dict[int, LoadReport]) -> int:
    best = None
    for i in sorted(loads):
        r = loads[i]
        f = (r.free_blocks - r.queued_demand_blocks) / (r.running + 1)
        key = (f, -(r.running + r.waiting), -i)
        if best is None or key > best[0]:
            best = (key, i)
    return best[1]


def test_least_loaded_matches_a_brute_force_scan():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randrange(1, 6)
        loads = {i: report(free=rng.randrange(0, 50), running=rng.randrange(0, 5), waiting=rng.randrange(0, 3),
                           demand=rng.randrange(0, 20)) for i in rng.sample(range(8), n)}
        assert pick_least_loaded(loads) == brute_least_loaded(loads) == LeastLoaded().choose(None, loads)
    with pytest.raises(ValueError):
        pick_least_loaded({})


def test_least_loaded_counts_queued_demand_not_just_free_blocks():
    """Two replicas with the same free blocks: the one whose queue will take 60 of them is not free."""
    loads = {0: report(free=80, demand=60), 1: report(free=70)}
    assert pick_least_loaded(loads) == 1
    assert pick_least_loaded({0: report(free=80), 1: report(free=80, running=1)}) == 0


def test_pending_requests_count_as_demand():
    r = report(free=50, waiting=1, demand=5).plus_pending(2, 10)
    assert (r.waiting, r.queued_demand_blocks, r.free_blocks) == (3, 15, 50)


def test_round_robin_takes_turns_over_the_replicas_in_rotation():
    rr = RoundRobin()
    loads = {0: report(), 1: report(free=0, running=9), 2: report()}
    assert [rr.choose(None, loads) for _ in range(6)] == [0, 1, 2, 0, 1, 2]      # blind to load
    del loads[1]
    picks = [rr.choose(None, loads) for _ in range(4)]
    assert sorted(set(picks)) == [0, 2] and picks.count(0) == 2


def test_prefix_key_reads_only_the_first_full_blocks():
    a = list(range(40))
    assert prefix_key(a[:15], 16, 4) is None                     # no full block: nothing cached anywhere
    assert prefix_key(a[:16], 16, 4) == prefix_key(a[:16] + [999], 16, 4)
    assert prefix_key(a, 16, 2) == prefix_key(a[:32] + [7, 7, 7], 16, 2)
    assert prefix_key(a, 16, 2) != prefix_key([1] + a[1:], 16, 2)


def test_prefix_affinity_sends_a_shared_prefix_to_one_replica_and_spreads_the_rest():
    pa = PrefixAffinity(affinity_blocks=2)
    loads = {0: report(), 1: report(), 2: report()}
    rng = random.Random(1)
    homes = []
    for k in range(60):
        head = [rng.randrange(1000) for _ in range(32)]
        picks = {pa.choose(head + [rng.randrange(1000) for _ in range(rng.randrange(0, 40))], loads)
                 for _ in range(5)}
        assert len(picks) == 1, "one prefix, several replicas"
        homes.append(picks.pop())
    assert set(homes) == {0, 1, 2}                               # keys are spread over the replicas


def test_prefix_affinity_moves_only_the_dead_replicas_keys():
    pa = PrefixAffinity(affinity_blocks=1)
    rng = random.Random(2)
    prompts = [[rng.randrange(1000) for _ in range(16)] for _ in range(100)]
    three = {0: report(), 1: report(), 2: report()}
    before = [pa.choose(p, three) for p in prompts]
    after = [pa.choose(p, {0: report(), 2: report()}) for p in prompts]
    assert all(a == b for a, b in zip(after, before) if b != 1)
    assert all(a in (0, 2) for a in after)


def test_prefix_affinity_falls_back_when_its_replica_is_overloaded_or_the_prompt_is_short():
    pa = PrefixAffinity(affinity_blocks=1, overload_ratio=0.5)
    prompt = list(range(48))
    idle = {0: report(), 1: report()}
    home = pa.choose(prompt, idle)
    other = 1 - home
    busy = {home: report(free=100, running=4), other: report(free=100, running=1)}    # 20 < 0.5 * 50
    assert pa.choose(prompt, busy) == other
    mild = {home: report(free=100, running=1), other: report(free=100, running=0)}    # 50 >= 0.5 * 100
    assert pa.choose(prompt, mild) == home
    full = {home: report(free=3, demand=1), other: report(free=40, running=9)}   # F 2 >= 0.5 * 4, but 2 < 3 blocks
    assert pa.choose(prompt, full) == other
    assert pa.choose(list(range(10)), {0: report(running=2), 1: report()}) == 1       # no full block: least loaded


def test_make_policy_names_the_choices():
    assert [make_policy(n).name for n in ("round_robin", "least_loaded", "prefix_affinity")] == \
        ["round_robin", "least_loaded", "prefix_affinity"]
    with pytest.raises(ValueError, match="round_robin, least_loaded, prefix_affinity"):
        make_policy("random")


def test_rebalance_pair_follows_llumnix_rule_against_a_scan():
    """`rebalance_pair` against a scan written here: the least free replica that runs something, the most free
    other one, moved only when their freeness differs by more than the gap."""
    import random

    from minisys.cluster.router_kv import rebalance_pair
    rng = random.Random(7)

    def f(r):
        return (r.free_blocks - r.queued_demand_blocks) / (r.running + 1)
    for _ in range(300):
        loads = {i: LoadReport(rng.randint(0, 64), 64, 16, rng.randint(0, 4), 0, 0) for i in rng.sample(range(5), 3)}
        gap = rng.choice([0.0, 4.0, 16.0])
        busy = sorted((f(r), -i, i) for i, r in loads.items() if r.running)
        got = rebalance_pair(loads, gap)
        if not busy:
            assert got is None
            continue
        src = busy[0][2]
        dst = max((f(loads[i]), -i, i) for i in loads if i != src)[2]
        assert got == ((src, dst) if f(loads[dst]) - f(loads[src]) > gap else None), (loads, gap)
