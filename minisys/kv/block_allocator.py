"""The block allocator of the paged KV cache: pure Python, no torch.

The KV cache is cut into ``num_blocks`` fixed-size blocks of ``block_size``
token slots. A sequence owns a *block table*: the list of block ids holding
its tokens in order, so token ``pos`` lives in slot
``block_ids[pos // block_size] * block_size + pos % block_size`` of the pool
(like a page table maps virtual pages to physical frames).

Sharing:
  - ``fork(parent, child)`` gives the child the parent's block table and
    bumps every block's reference count (parallel sampling, beam search).
    When one of them appends into a *partial* last block that is shared, the
    allocator copies it first (copy-on-write) and reports ``(src, dst)`` so
    the cache tensors can copy the slots.
  - Prefix caching (vLLM's design): a *full* block gets a hash that chains its
    parent block's hash and its own tokens, ``hash((parent_hash, tokens))``,
    so equal hashes mean equal whole prefixes. ``allocate`` looks up each full
    block of a new prompt in the hash table and reuses the hits. A freed block
    keeps its hash and content and waits in an LRU of *cached free* blocks; it
    is reused on a hit, or evicted (hash dropped) when a fresh block is needed
    and no never-hashed free block is left.

Invariants (``check_invariants`` asserts all of them; tests call it after
every step):
  1. conservation: every block is exactly one of in use (ref_count > 0),
     free uncached, or free cached; ``used + num_free == num_blocks``;
  2. exact refcounts: ``ref_count[b]`` == number of block tables holding b;
  3. a hashed block's hash matches its tokens and its parent's hash; the
     hash table maps each hash to a block carrying it; free uncached blocks
     carry no hash;
  4. coverage: a sequence of n tokens has exactly ``ceil(n / block_size)``
     blocks.

Misuse raises ``AllocatorError`` (double free, unknown sequence, a sequence
id used twice). Running out of blocks is not misuse: ``allocate`` and
``append_slot`` return a falsy ``Refusal`` that says how many blocks were
needed, so a scheduler can wait or preempt.
"""
from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

NO_HASH = None


class AllocatorError(RuntimeError):
    """The caller broke the allocator's contract (double free, unknown sequence, ...)."""


@dataclass
class Refusal:
    """Not enough free blocks. Falsy, so ``if not (r := alloc.allocate(...)):`` works."""

    reason: str
    blocks_needed: int
    blocks_free: int

    def __bool__(self) -> bool:
        return False


@dataclass
class BlockTable:
    """A sequence's blocks in order and how many token slots they cover.

    The sequence's token ids belong to its owner (the engine's `Request`),
    not to the table: the allocator sees each token once, when it is
    allocated or appended, and keeps only what prefix caching needs to hash
    a block when it fills: ``tail``, the tokens of the partial last block
    (always empty with prefix caching off). Full blocks keep their own tokens
    with their hash (`_Block.token_ids`).
    """

    block_ids: list[int]
    num_tokens: int
    block_size: int
    tail: list[int] = field(default_factory=list)    # tokens of the partial last block (prefix caching on)

    def slot(self, pos: int) -> int:
        """Slot of token ``pos`` in the flat pool: block_id * block_size + offset."""
        return self.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, start: int, end: int) -> list[int]:
        return [self.slot(p) for p in range(start, end)]


@dataclass
class Allocation:
    """What ``allocate`` did: the table, and how many leading tokens hit the prefix cache."""

    table: BlockTable
    num_cached_tokens: int      # their K/V are already in the pool: do not recompute them
    new_block_ids: list[int] = field(default_factory=list)


@dataclass
class AppendResult:
    """Where the appended token's K/V go, and a block copy to do first (copy-on-write)."""

    slot: int
    copy: tuple[int, int] | None = None      # (src_block, dst_block)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = NO_HASH
    parent_hash: int | None = NO_HASH
    token_ids: tuple[int, ...] = ()          # set when the block is hashed (full)


def chain_hash(parent_hash: int | None, token_ids) -> int:
    """Hash of a full block: its parent's hash chained with its own tokens."""
    return hash((parent_hash, tuple(token_ids)))


class BlockAllocator:
    """Fixed-size blocks, a free list, reference counts, fork with copy-on-write, prefix caching.

    Counters: ``num_free``, ``num_cached`` (free blocks still holding a
    reusable prefix), ``queries`` / ``hits`` (full prompt blocks looked up /
    found in the prefix cache), ``evictions``.
    ``seed`` shuffles the initial free list (tests use it so a paged read of
    the wrong slot cannot pass by luck). ``debug=True`` runs
    `check_invariants` after every allocate / append_slot / fork / free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 seed: int | None = None, debug: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching, self.debug = enable_prefix_caching, debug
        self.blocks = [_Block(i) for i in range(num_blocks)]
        order = list(range(num_blocks))
        if seed is not None:
            random.Random(seed).shuffle(order)
        self._free: deque[int] = deque(order)                 # free, never hashed (or evicted)
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, hashed; LRU first
        self._hash_to_block: dict[int, int] = {}
        self.tables: dict[object, BlockTable] = {}
        self.queries = self.hits = self.evictions = 0

    # ------------------------------------------------------------ counters
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        return len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """True when a prompt of ``num_tokens`` fits even with no prefix-cache hit."""
        return self.blocks_for(num_tokens) <= self.num_free

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count

    def table(self, seq_id) -> BlockTable:
        if seq_id not in self.tables:
            raise AllocatorError(f"unknown sequence {seq_id!r} (never allocated, or already freed)")
        return self.tables[seq_id]

    def held_tokens(self, seq_id) -> list[int]:
        """The tokens the allocator knows the sequence's blocks hold: each full block's hashed tokens,
        then the tail (for tests and debugging; prefix caching on only, else nothing is kept)."""
        if not self.enable_prefix_caching:
            raise AllocatorError("with prefix caching off the allocator keeps no token ids")
        t = self.table(seq_id)
        full = [tok for b in t.block_ids[:t.num_tokens // self.block_size] for tok in self.blocks[b].token_ids]
        return full + t.tail

    # ------------------------------------------------------------ allocate / append
    def allocate(self, seq_id, token_ids: list[int], use_cache: bool = True) -> Allocation | Refusal:
        """Give a new sequence blocks for its prompt, reusing cached full blocks (unless not ``use_cache``:
        then every token is to be computed; its full blocks are still registered for others).

        At most ``(n - 1) // block_size`` blocks are taken from the cache, so
        at least one token is left to compute (the model needs a query to
        produce the next token's logits).
        """
        if seq_id in self.tables:
            raise AllocatorError(f"sequence {seq_id!r} already has blocks; free it first")
        if not token_ids:
            raise AllocatorError("cannot allocate an empty sequence")
        token_ids = list(token_ids)
        hits = self._lookup_prefix(token_ids) if use_cache else []
        need = self.blocks_for(len(token_ids)) - len(hits)
        free_after_hits = self.num_free - sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if need > free_after_hits:
            return Refusal(f"prompt of {len(token_ids)} tokens needs {need} new blocks, "
                           f"{free_after_hits} free", need, free_after_hits)
        block_ids = []
        for b in hits:
            self._take(b)
            block_ids.append(b)
        new = [self._take(self._pop_free()) for _ in range(need)]
        block_ids += new
        num_full = len(token_ids) // self.block_size
        table = BlockTable(block_ids, len(token_ids), self.block_size,
                           token_ids[num_full * self.block_size:] if self.enable_prefix_caching else [])
        self.tables[seq_id] = table
        for i in range(len(hits), num_full):                             # newly filled blocks
            self._register_full(table, i, token_ids[i * self.block_size:(i + 1) * self.block_size])
        self._debug_check()
        return Allocation(table, len(hits) * self.block_size, new)

    def append_slot(self, seq_id, token_id: int) -> AppendResult | Refusal:
        """Append one token; return its slot (and a (src, dst) block copy if copy-on-write)."""
        table = self.table(seq_id)
        pos = table.num_tokens
        copy = None
        if pos % self.block_size == 0:                       # last block full (or none): new block
            if self.num_free == 0:
                return Refusal("no free block for the next token", 1, 0)
            table.block_ids.append(self._take(self._pop_free()))
        else:
            last = table.block_ids[-1]
            if self.blocks[last].ref_count > 1:              # shared partial block: copy on write
                if self.num_free == 0:
                    return Refusal("no free block for copy-on-write", 1, 0)
                dst = self._take(self._pop_free())
                self._release(last)
                table.block_ids[-1] = dst
                copy = (last, dst)
        table.num_tokens += 1
        if self.enable_prefix_caching:
            table.tail.append(token_id)
        if table.num_tokens % self.block_size == 0:
            self._register_full(table, len(table.block_ids) - 1, table.tail)
            table.tail = []
        self._debug_check()
        return AppendResult(table.slot(pos), copy)

    def append_slots(self, seq_id, token_ids: list[int]) -> list[AppendResult] | Refusal:
        """Append several tokens at once, all or nothing (speculative decoding: last token + k drafts).

        Refuses (changing nothing) unless the free blocks cover every new block
        and a copy-on-write of a shared partial last block.
        """
        table = self.table(seq_id)
        pos, n = table.num_tokens, len(token_ids)
        need = self.blocks_for(pos + n) - len(table.block_ids)
        if pos % self.block_size and n and self.blocks[table.block_ids[-1]].ref_count > 1:
            need += 1                                        # the shared partial block is copied first
        if need > self.num_free:
            return Refusal(f"{n} tokens need {need} new blocks, {self.num_free} free", need, self.num_free)
        return [self.append_slot(seq_id, t) for t in token_ids]

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Roll a sequence back to its first ``num_tokens`` tokens (rejected speculative tokens).

        Blocks past ``ceil(num_tokens / block_size)`` are released (freed when
        no other table holds them). A kept last block left partial loses its
        prefix-cache hash (it was hashed with tokens that are gone); it must
        then be this sequence's alone. Keeps every invariant of the module.
        """
        table = self.table(seq_id)
        if not 0 < num_tokens <= table.num_tokens:
            raise AllocatorError(f"truncate {seq_id!r} to {num_tokens} tokens: it has {table.num_tokens}")
        keep, offset = self.blocks_for(num_tokens), num_tokens % self.block_size
        last = table.block_ids[keep - 1]
        if self.enable_prefix_caching and offset:            # the new partial block's tokens
            blk = self.blocks[last]
            table.tail = list(blk.token_ids[:offset]) if blk.hash is not NO_HASH else table.tail[:offset]
        elif self.enable_prefix_caching:
            table.tail = []
        if offset and self.blocks[last].hash is not NO_HASH:
            if self.blocks[last].ref_count > 1:
                raise AllocatorError(f"truncate {seq_id!r} into shared full block {last}")
            self._drop_hash(last)
        for b in reversed(table.block_ids[keep:]):
            self._release(b)
        del table.block_ids[keep:]
        table.num_tokens = num_tokens
        self._debug_check()

    def fork(self, parent_id, child_id) -> BlockTable:
        """The child shares all of the parent's blocks (refcounts + 1); never needs a free block."""
        parent = self.table(parent_id)
        if child_id in self.tables:
            raise AllocatorError(f"sequence {child_id!r} already exists")
        for b in parent.block_ids:
            self.blocks[b].ref_count += 1
        child = BlockTable(list(parent.block_ids), parent.num_tokens, self.block_size, list(parent.tail))
        self.tables[child_id] = child
        self._debug_check()
        return child

    def free(self, seq_id) -> None:
        """Drop a sequence; its blocks whose refcount reaches 0 become free (hashed ones stay cached)."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            raise AllocatorError(f"free of unknown sequence {seq_id!r} (double free?)")
        for b in reversed(table.block_ids):                  # tail first: evicted before the prefix
            self._release(b)
        self._debug_check()

    # ------------------------------------------------------------ internals
    def _lookup_prefix(self, token_ids: list[int]) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], NO_HASH
        for i in range((len(token_ids) - 1) // self.block_size):
            toks = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, toks)
            self.queries += 1
            b = self._hash_to_block.get(h)
            if b is None or self.blocks[b].token_ids != toks or self.blocks[b].parent_hash != parent:
                break                                        # miss (or a hash collision)
            self.hits += 1
            hits.append(b)
            parent = h
        return hits

    def _register_full(self, table: BlockTable, i: int, token_ids: list[int]) -> None:
        """Block i of the table just became full with ``token_ids``: give it its chained hash."""
        if not self.enable_prefix_caching:
            return
        blk = self.blocks[table.block_ids[i]]
        if blk.hash is not NO_HASH:
            return                                           # a prefix-cache hit: already hashed
        parent = self.blocks[table.block_ids[i - 1]].hash if i > 0 else NO_HASH
        toks = tuple(token_ids)
        blk.parent_hash, blk.token_ids, blk.hash = parent, toks, chain_hash(parent, toks)
        self._hash_to_block.setdefault(blk.hash, blk.block_id)

    def _pop_free(self) -> int:
        if self._free:
            return self._free.popleft()
        b, _ = self._cached_free.popitem(last=False)         # evict the least recently freed
        self._drop_hash(b)
        self.evictions += 1
        return b

    def _take(self, b: int) -> int:
        blk = self.blocks[b]
        if blk.ref_count == 0:
            self._cached_free.pop(b, None)
        blk.ref_count += 1
        return b

    def _release(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.ref_count <= 0:
            raise AllocatorError(f"block {b} freed while not in use (double free)")
        blk.ref_count -= 1
        if blk.ref_count > 0:
            return
        if blk.hash is not NO_HASH and self._hash_to_block.get(blk.hash) == b:
            self._cached_free[b] = None                      # most recently used end
        else:
            self._drop_hash(b)
            self._free.append(b)

    def _drop_hash(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.hash is not NO_HASH and self._hash_to_block.get(blk.hash) == b:
            del self._hash_to_block[blk.hash]
        blk.hash = blk.parent_hash = NO_HASH
        blk.token_ids = ()

    # ------------------------------------------------------------ invariants
    def _debug_check(self) -> None:
        if self.debug:
            self.check_invariants()

    def check_invariants(self) -> None:
        """Assert the four invariants of the module docstring; raise AssertionError naming the broken one."""
        free, cached = list(self._free), list(self._cached_free)
        used = [b.block_id for b in self.blocks if b.ref_count > 0]
        assert len(set(free)) == len(free), "a block is twice in the free list"
        assert not set(free) & set(cached), "a block is both free-uncached and free-cached"
        assert not (set(free) | set(cached)) & set(used), "a free block has a nonzero refcount"
        assert len(used) + len(free) + len(cached) == self.num_blocks, "blocks not conserved"
        counts = [0] * self.num_blocks
        for sid, t in self.tables.items():
            for b in t.block_ids:
                counts[b] += 1
            assert len(t.block_ids) == self.blocks_for(t.num_tokens), \
                f"sequence {sid!r}: {len(t.block_ids)} blocks for {t.num_tokens} tokens"
            if self.enable_prefix_caching:
                parent = NO_HASH
                for i in range(t.num_tokens // self.block_size):
                    blk = self.blocks[t.block_ids[i]]
                    assert blk.hash is not NO_HASH and blk.parent_hash == parent, \
                        f"sequence {sid!r} block {i}: full but not hashed, or not chained to block {i - 1}"
                    parent = blk.hash
                assert len(t.tail) == t.num_tokens % self.block_size, f"sequence {sid!r}: tail length"
            else:
                assert not t.tail, f"sequence {sid!r}: a tail kept with prefix caching off"
        for blk in self.blocks:
            assert blk.ref_count == counts[blk.block_id], \
                f"block {blk.block_id}: refcount {blk.ref_count}, held by {counts[blk.block_id]} tables"
            if blk.hash is not NO_HASH:
                assert blk.hash == chain_hash(blk.parent_hash, blk.token_ids), \
                    f"block {blk.block_id}: hash does not match its tokens"
        for b in free:
            assert self.blocks[b].hash is NO_HASH, f"uncached free block {b} carries a hash"
        for b in cached:
            assert self._hash_to_block.get(self.blocks[b].hash) == b, f"cached free block {b} not findable"
        for h, b in self._hash_to_block.items():
            assert self.blocks[b].hash == h, f"hash table entry for block {b} is stale"
        assert 0 <= self.hits <= self.queries, "more prefix-cache hits than lookups"
