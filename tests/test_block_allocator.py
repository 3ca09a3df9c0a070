"""The block allocator alone: unit cases, misuse errors, and a hypothesis state machine.

The state machine keeps its own simple model (each sequence's token list)
and checks, after every step, the allocator's invariants and that each
sequence's slots are distinct from every other live sequence's slots except
where blocks are legitimately shared (full prefix blocks, forked blocks).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minisys.kv.block_allocator import AllocatorError, BlockAllocator, Refusal

MODULE = Path(__file__).resolve().parents[1] / "minisys" / "kv" / "block_allocator.py"


def test_module_imports_no_torch():
    tree = ast.parse(MODULE.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names
    code = ("import sys, importlib.util; sys.modules['torch'] = None\n"
            f"spec = importlib.util.spec_from_file_location('ba', {str(MODULE)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['ba'] = m; spec.loader.exec_module(m)\n"
            "a = m.BlockAllocator(4, 2); a.allocate(0, [1, 2, 3]); a.check_invariants()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_append_free_conserves_blocks():
    a = BlockAllocator(8, 4, enable_prefix_caching=False)
    res = a.allocate("s", list(range(6)))
    assert res and len(res.table.block_ids) == 2 and res.num_cached_tokens == 0
    assert a.num_free == 6
    b0, b1 = res.table.block_ids
    assert res.table.slots(0, 6) == [b0 * 4, b0 * 4 + 1, b0 * 4 + 2, b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
    assert a.append_slot("s", 6).slot == b1 * 4 + 2
    a.append_slot("s", 7)
    r = a.append_slot("s", 8)                      # 9th token opens a third block
    assert len(a.table("s").block_ids) == 3 and r.slot == a.table("s").block_ids[2] * 4
    a.check_invariants()
    a.free("s")
    assert a.num_free == 8
    a.check_invariants()


def test_refusal_not_crash():
    a = BlockAllocator(2, 4)
    assert a.allocate("a", list(range(8)))
    r = a.allocate("b", [1])
    assert isinstance(r, Refusal) and not r and r.blocks_needed == 1 and r.blocks_free == 0
    assert not a.can_allocate(1)
    assert not a.append_slot("a", 9)
    assert a.table("a").num_tokens == 8            # a refused append changes nothing
    a.check_invariants()


def test_misuse_errors():
    a = BlockAllocator(4, 2)
    a.allocate("a", [1, 2, 3])
    with pytest.raises(AllocatorError, match="already"):
        a.allocate("a", [1])
    with pytest.raises(AllocatorError, match="already exists"):
        a.fork("a", "a")
    a.free("a")
    with pytest.raises(AllocatorError, match="double free"):
        a.free("a")
    with pytest.raises(AllocatorError, match="unknown"):
        a.append_slot("zzz", 1)
    with pytest.raises(AllocatorError, match="not in use"):
        a._release(0)
    with pytest.raises(ValueError):
        BlockAllocator(0, 4)


def test_fork_copy_on_write():
    a = BlockAllocator(8, 4, enable_prefix_caching=False)
    a.allocate("p", list(range(6)))                # blocks: full + partial (2 of 4)
    a.fork("p", "c")
    full, partial = a.table("p").block_ids
    assert a.ref_count(full) == a.ref_count(partial) == 2
    r = a.append_slot("c", 100)
    assert r.copy is not None and r.copy[0] == partial
    dst = r.copy[1]
    assert a.table("c").block_ids == [full, dst] and r.slot == dst * 4 + 2
    assert a.ref_count(partial) == 1 and a.ref_count(dst) == 1 and a.ref_count(full) == 2
    r2 = a.append_slot("p", 200)                   # parent now owns its partial block alone
    assert r2.copy is None and r2.slot == partial * 4 + 2
    a.check_invariants()
    a.free("p"), a.free("c")
    assert a.num_free == 8


def test_prefix_cache_hit_and_lru_eviction():
    a = BlockAllocator(4, 2)
    prompt = [1, 2, 3, 4, 5]                       # 2 full blocks + 1 partial
    first = a.allocate("a", prompt)
    assert first.num_cached_tokens == 0
    a.free("a")
    assert a.num_cached == 2 and a.num_free == 4
    second = a.allocate("b", prompt)
    assert second.num_cached_tokens == 4 and a.hits == 2
    assert second.table.block_ids[:2] == first.table.block_ids[:2]
    a.free("b")
    third = a.allocate("c", [9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks: evicts both cached ones
    assert third and a.evictions == 2 and a.num_cached == 0
    a.free("c")
    assert a.allocate("d", prompt).num_cached_tokens == 0
    a.check_invariants()


def test_fully_cached_prompt_leaves_one_token_to_compute():
    a = BlockAllocator(8, 2)
    a.allocate("a", [1, 2, 3, 4])
    a.free("a")
    r = a.allocate("b", [1, 2, 3, 4])
    assert r.num_cached_tokens == 2                # last block recomputed, never written shared
    a.check_invariants()


def test_shared_prefix_between_live_sequences():
    a = BlockAllocator(8, 2)
    a.allocate("a", [1, 2, 3, 4, 5])
    r = a.allocate("b", [1, 2, 3, 4, 7, 8])
    assert r.num_cached_tokens == 4
    assert a.table("a").block_ids[:2] == a.table("b").block_ids[:2]
    assert a.ref_count(a.table("a").block_ids[0]) == 2
    a.check_invariants()


def test_appended_full_block_becomes_cacheable():
    a = BlockAllocator(8, 2)
    a.allocate("a", [1])
    for t in [2, 3, 4]:
        a.append_slot("a", t)
    a.free("a")
    assert a.allocate("b", [1, 2, 3, 4, 5]).num_cached_tokens == 4


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/append/fork/free/re-allocate (cache hits) with eviction pressure."""

    def __init__(self):
        super().__init__()
        self.a = BlockAllocator(12, 3, seed=0, debug=True)   # checks after every operation too
        self.tokens: dict[int, list[int]] = {}     # the model: each live sequence's tokens
        self.next_id = 0
        self.history: list[list[int]] = []         # prompts seen, replayed to hit the cache

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=14))
    def allocate(self, prompt):
        sid = self._new_id()
        before_free = self.a.num_free
        res = self.a.allocate(sid, prompt)
        if not res:
            assert isinstance(res, Refusal) and self.a.num_free == before_free
            assert sid not in self.a.tables
            return
        self.tokens[sid] = list(prompt)
        self.history.append(list(prompt))
        assert res.num_cached_tokens % 3 == 0 and res.num_cached_tokens < len(prompt)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def allocate_again(self, data):
        """Re-send an earlier prompt (optionally extended): a multi-turn chat."""
        prompt = data.draw(st.sampled_from(self.history)) + data.draw(st.lists(st.integers(0, 3), max_size=4))
        hits = self.a.hits
        self.allocate(prompt)
        assert self.a.hits >= hits

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data, token):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        table = self.a.table(sid)
        last = table.block_ids[-1]
        shared_partial = table.num_tokens % 3 != 0 and self.a.ref_count(last) > 1
        res = self.a.append_slot(sid, token)
        if not res:
            return
        self.tokens[sid].append(token)
        assert (res.copy is not None) == shared_partial
        assert res.slot == self.a.table(sid).slot(len(self.tokens[sid]) - 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self._new_id()
        self.a.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.a.free(sid)
        del self.tokens[sid]

    @invariant()
    def invariants_hold(self):
        self.a.check_invariants()
        for sid, toks in self.tokens.items():
            assert self.a.table(sid).num_tokens == len(toks) and self.a.held_tokens(sid) == toks
        # a slot written by one sequence is never a slot another sequence can still write:
        # the partial (writable) last block of each live sequence is private, or shared only by forks
        owners: dict[int, set] = {}
        for sid, toks in self.tokens.items():
            t = self.a.table(sid)
            if len(toks) % 3:
                owners.setdefault(t.block_ids[-1], set()).add(tuple(toks))
        for b, prefixes in owners.items():
            assert len(prefixes) == 1, f"partial block {b} shared by sequences with different tokens"


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_allocator_state_machine = AllocatorMachine.TestCase
