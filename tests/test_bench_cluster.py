"""bench cluster's workload (minisys/bench/cluster.py): skewed as documented, the same for every policy."""
from __future__ import annotations

from minisys.bench.cluster import parts, routing_size, skewed_requests


def test_skewed_workload_has_a_long_tail_and_shared_system_prompts():
    size = routing_size(quick=False)
    reqs = skewed_requests(size, salt="policy0")
    lengths = [r.max_tokens for r in reqs]
    long = [n for n in lengths if n >= size.long[0]]
    assert all(size.short[0] <= n <= size.short[1] or size.long[0] <= n <= size.long[1] for n in lengths)
    assert 0 < len(long) < len(reqs) / 2                                  # a few long ones, most short
    systems = {r.prompt.split("\n\n")[0] for r in reqs}
    assert len(systems) == size.num_system_prompts and all(s.startswith("policy0 ") for s in systems)


def test_every_policy_gets_the_same_lengths_and_choices_but_its_own_prompts():
    size = routing_size(quick=True)
    a, b = skewed_requests(size, "policy0"), skewed_requests(size, "policy1")
    assert [r.max_tokens for r in a] == [r.max_tokens for r in b]
    assert [r.prompt.split(" ", 1)[1] for r in a] == [r.prompt.split(" ", 1)[1] for r in b]
    assert not {r.prompt for r in a} & {r.prompt for r in b}               # no cache shared between runs


def test_every_part_is_one_command():
    assert sorted(parts()) == ["a", "b", "c", "transfer"]
