"""Lab 03 tests: slot mapping, the block allocator, the paged read, prefix hashes.

Oracles: the slot formula written out per token; a simulated KV pool (a dict
slot -> value) into which every token writes its own value at the slot the
allocator hands out, with copy-on-write copies applied, and from which every
live sequence must read back exactly its own tokens; conservation and
refcount invariants recomputed from the block tables; torch indexing one
token at a time for the gather; Python's hash on tuples for the chain.
"""
from __future__ import annotations

import random
import types

import pytest
import torch


def reference_impl():
    from minisys.kv import block_allocator as ba

    class LabAllocator:
        """The lab's allocator API on top of minisys's BlockAllocator (prefix caching off)."""

        def __init__(self, num_blocks, block_size):
            self.num_blocks, self.block_size = num_blocks, block_size
            self._a = ba.BlockAllocator(num_blocks, block_size, enable_prefix_caching=False)

        @property
        def num_free(self):
            return self._a.num_free

        def block_table(self, seq_id):
            return self._a.table(seq_id).block_ids

        def ref_count(self, block_id):
            return self._a.ref_count(block_id)

        def allocate(self, seq_id, token_ids):
            r = self._a.allocate(seq_id, token_ids)
            return r.table.block_ids if r else None

        def append_slot(self, seq_id, token_id):
            r = self._a.append_slot(seq_id, token_id)
            return (r.slot, r.copy) if r else None

        def fork(self, parent, child):
            self._a.fork(parent, child)

        def free(self, seq_id):
            try:
                self._a.free(seq_id)
            except ba.AllocatorError as e:
                raise ValueError(str(e)) from e

    def slot_mapping(table, start, end, block_size):
        return ba.BlockTable(table, [], block_size).slots(start, end)

    def gather_context(k_pool, table, n):
        from minisys.kv.paged import block_table_tensor, context_slots
        idx = context_slots(block_table_tensor([table]), [n], k_pool.shape[1])
        return k_pool.reshape(-1, *k_pool.shape[2:])[idx]

    def prefix_block_hashes(tokens, bs):
        out, parent = [], None
        for i in range(len(tokens) // bs):
            parent = ba.chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            out.append(parent)
        return out

    return types.SimpleNamespace(BlockAllocator=LabAllocator, slot_mapping=slot_mapping,
                                 gather_context=gather_context, prefix_block_hashes=prefix_block_hashes)


def _ceil(a, b):
    return -(-a // b)


class SimulatedPool:
    """The independent oracle: a KV pool as a dict, driven through the allocator under test."""

    def __init__(self, impl, num_blocks, block_size):
        self.a = impl.BlockAllocator(num_blocks, block_size)
        self.bs, self.n = block_size, num_blocks
        self.mem: dict[int, tuple] = {}
        self.tokens: dict[object, list[int]] = {}

    def _slot(self, seq, pos):
        table = self.a.block_table(seq)
        return table[pos // self.bs] * self.bs + pos % self.bs

    def allocate(self, seq, tokens):
        free_before = self.a.num_free
        table = self.a.allocate(seq, tokens)
        if table is None:
            assert self.a.num_free == free_before, "a refused allocate must change nothing"
            return False
        assert len(table) == _ceil(len(tokens), self.bs)
        self.tokens[seq] = list(tokens)
        for pos, t in enumerate(tokens):
            self.mem[self._slot(seq, pos)] = (pos, t)
        return True

    def append(self, seq, token):
        free_before = self.a.num_free
        res = self.a.append_slot(seq, token)
        if res is None:
            assert self.a.num_free == free_before, "a refused append must change nothing"
            return False
        slot, copy = res
        if copy is not None:
            src, dst = copy
            for o in range(self.bs):
                if src * self.bs + o in self.mem:
                    self.mem[dst * self.bs + o] = self.mem[src * self.bs + o]
        pos = len(self.tokens[seq])
        assert slot == self._slot(seq, pos), "the returned slot is not where the table says"
        self.tokens[seq].append(token)
        self.mem[slot] = (pos, token)
        return True

    def fork(self, parent, child):
        self.a.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def free(self, seq):
        self.a.free(seq)
        del self.tokens[seq]

    def check(self):
        counts = [0] * self.n
        for seq, toks in self.tokens.items():
            table = self.a.block_table(seq)
            assert len(table) == _ceil(len(toks), self.bs), f"{seq}: wrong number of blocks"
            for b in table:
                counts[b] += 1
            for pos, t in enumerate(toks):
                assert self.mem.get(self._slot(seq, pos)) == (pos, t), \
                    f"sequence {seq} reads the wrong value at position {pos}"
        for b in range(self.n):
            assert self.a.ref_count(b) == counts[b], f"block {b}: refcount {self.a.ref_count(b)} != {counts[b]}"
        used = sum(1 for c in counts if c > 0)
        assert used + self.a.num_free == self.n, "blocks are not conserved"


# ---------------------------------------------------------------- slot mapping
@pytest.mark.points(1)
@pytest.mark.exercise("slot_mapping")
@pytest.mark.parametrize("table,start,end,bs", [([7, 2, 5], 0, 10, 4), ([3], 1, 2, 8), ([4, 0, 9, 1], 5, 12, 3)])
def test_slot_mapping(impl, table, start, end, bs):
    expected = []
    for pos in range(start, end):
        block, offset = divmod(pos, bs)
        expected.append(table[block] * bs + offset)
    assert list(impl.slot_mapping(table, start, end, bs)) == expected


# ---------------------------------------------------------------- allocator
@pytest.mark.points(2)
@pytest.mark.exercise("allocate")
def test_allocate_and_refuse(impl):
    pool = SimulatedPool(impl, 5, 4)
    assert pool.allocate("a", list(range(9)))           # 3 blocks
    assert pool.a.num_free == 2
    assert len(set(pool.a.block_table("a"))) == 3
    assert not pool.allocate("b", list(range(9)))       # needs 3, 2 free: refused, nothing changed
    assert pool.allocate("c", list(range(8)))
    assert pool.a.num_free == 0
    pool.check()


@pytest.mark.points(2)
@pytest.mark.exercise("append_slot")
def test_append_opens_blocks_at_boundaries(impl):
    pool = SimulatedPool(impl, 4, 4)
    pool.allocate("a", [1, 2, 3])
    for t in range(4, 15):
        before = len(pool.a.block_table("a"))
        assert pool.append("a", t)
        n = len(pool.tokens["a"])
        assert len(pool.a.block_table("a")) == before + (1 if n % 4 == 1 else 0)
        pool.check()
    assert pool.append("a", 15) and pool.append("a", 16)   # 16 tokens fill the 4 blocks
    assert not pool.append("a", 17)                        # the 17th needs a fifth block
    pool.check()


@pytest.mark.points(2)
@pytest.mark.exercise("free")
def test_free_returns_blocks_and_rejects_double_free(impl):
    pool = SimulatedPool(impl, 6, 2)
    pool.allocate("a", [1, 2, 3])
    pool.allocate("b", [4, 5, 6, 7])
    pool.free("a")
    assert pool.a.num_free == 4
    pool.check()
    with pytest.raises(ValueError):
        pool.a.free("a")
    with pytest.raises(ValueError):
        pool.a.free("never-allocated")
    assert pool.allocate("c", list(range(8)))            # the freed blocks are reusable
    pool.check()


@pytest.mark.points(1)
@pytest.mark.exercise("fork")
def test_fork_shares_every_block(impl):
    pool = SimulatedPool(impl, 8, 4)
    pool.allocate("p", [10, 11, 12, 13, 14, 15])        # one full block, one partial
    free_before = pool.a.num_free
    pool.fork("p", "c")
    full, partial = pool.a.block_table("p")
    assert pool.a.block_table("c") == [full, partial]
    assert pool.a.ref_count(full) == pool.a.ref_count(partial) == 2
    assert pool.a.num_free == free_before, "fork copies no block: parent and child share them"
    pool.check()


@pytest.mark.points(2)
@pytest.mark.exercise("append_slot")                # copy-on-write is append_slot's job
def test_append_after_fork_copies_on_write(impl):
    pool = SimulatedPool(impl, 8, 4)
    pool.allocate("p", [10, 11, 12, 13, 14, 15])        # one full block, one partial
    pool.fork("p", "c")
    full, partial = pool.a.block_table("p")
    free_before = pool.a.num_free
    assert pool.append("c", 99)                          # copy-on-write of the partial block
    assert pool.a.block_table("c")[0] == full and pool.a.block_table("c")[1] != partial
    assert pool.a.num_free == free_before - 1
    assert pool.append("p", 42)                          # the parent's block is its own again
    assert pool.a.block_table("p") == [full, partial]
    pool.check()                                         # refcounts: 2, 1, 1


@pytest.mark.points(4)
@pytest.mark.exercise("BlockAllocator")    # all four methods together: not charged to one of them
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_against_simulated_pool(impl, seed):
    rng = random.Random(seed)
    pool = SimulatedPool(impl, 16, 4)
    next_id = 0
    for step in range(150):
        live = sorted(pool.tokens)
        op = rng.choice(["alloc", "append", "append", "append", "fork", "free"] if live else ["alloc"])
        try:
            if op == "alloc":
                next_id += 1
                tokens = [rng.randrange(100) for _ in range(rng.randint(1, 12))]
                call = f"allocate({next_id}, <{len(tokens)} tokens>)"
                pool.allocate(next_id, tokens)
            elif op == "append":
                seq = rng.choice(live)
                call = f"append_slot({seq}, ...) at position {len(pool.tokens[seq])}"
                pool.append(seq, rng.randrange(100))
            elif op == "fork":
                next_id += 1
                parent = rng.choice(live)
                call = f"fork({parent}, {next_id})"
                pool.fork(parent, next_id)
            else:
                seq = rng.choice(live)
                call = f"free({seq})"
                pool.free(seq)
            pool.check()
        except Exception as error:  # noqa: BLE001 - name the operation that broke the pool
            raise AssertionError(f"operation {step}, {call}: {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------- paged read
@pytest.mark.points(2)
@pytest.mark.exercise("gather_context")
@pytest.mark.parametrize("n", [1, 5, 8, 11])
def test_gather_context(impl, n):
    g = torch.Generator().manual_seed(n)
    pool = torch.randn(10, 4, 2, 3, generator=g)
    table = [6, 0, 9][:_ceil(n, 4)]
    got = impl.gather_context(pool, table, n)
    expected = torch.stack([pool[table[p // 4], p % 4] for p in range(n)])
    assert got.shape == (n, 2, 3)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- prefix hashes
@pytest.mark.points(2)
@pytest.mark.exercise("prefix_block_hashes")
def test_prefix_block_hashes(impl):
    a = list(range(50, 61))                              # 11 tokens, block 4: 2 full blocks
    h = impl.prefix_block_hashes(a, 4)
    assert h == [hash((None, (50, 51, 52, 53))), hash((hash((None, (50, 51, 52, 53))), (54, 55, 56, 57)))]
    b = a[:4] + [0] + a[5:]                              # differs in block 1 only
    hb = impl.prefix_block_hashes(b, 4)
    assert hb[0] == h[0] and hb[1] != h[1]
    c = [0] + a[1:]                                      # differs in block 0: every hash changes
    hc = impl.prefix_block_hashes(c, 4)
    assert hc[0] != h[0] and hc[1] != h[1]
    assert impl.prefix_block_hashes(a[:3], 4) == []
