# %% [markdown]
# # Lab 03: The paged KV cache
#
# Companion to `lessons/03-paged-kv.md`. A contiguous KV cache reserves the
# longest a sequence could get; most of it never holds a token. vLLM's
# PagedAttention cuts the cache into small fixed-size **blocks** and gives each
# sequence a **block table**, the way an OS gives a process a page table. You
# will write the bookkeeping that makes this work:
#
# 1. **the slot mapping** — where token `pos` of a sequence lives in the pool
#    (`slot_mapping`);
# 2. **a block allocator** — `allocate`, `append_slot`, `free`, `fork` with
#    copy-on-write (`BlockAllocator`), in pure Python;
# 3. **a paged read** — gather a sequence's keys back out of the pool
#    (`gather_context`);
# 4. **prefix hashes** — the chained block hashes behind prefix caching
#    (`prefix_block_hashes`).
#
# Fill in every `raise NotImplementedError` and grade yourself with
#
#     python -m minisys labs start 03     # once: copies this notebook to work/03-paged-kv.ipynb
#     python -m minisys grade work/03-paged-kv.ipynb
#
# Work in that copy, not in `labs/` (regenerated from `solutions/`; `git pull` updates it).
#
# The tests drive your allocator with random operations against a simulated
# KV pool: every token writes a value to the slot your allocator hands out,
# and every sequence must read back exactly its own tokens. The last cells run
# your allocator on a chat-like workload and compare its memory use with the
# contiguous cache of the eager baseline.

# %%
from collections import deque

import torch

# %% [markdown]
# ## 1. Blocks, block tables, slots
#
# The pool of one layer is a tensor `(num_blocks, block_size, Hkv, D)`; viewed
# flat it is `(num_blocks * block_size, Hkv, D)`, one row (a **slot**) per token.
# A sequence's block table is the list of its block ids in order, so token
# `pos` sits in block `table[pos // block_size]` at offset `pos % block_size`:
#
#     slot = table[pos // block_size] * block_size + pos % block_size
#
# Write `slot_mapping`: the slots of positions `start .. end - 1` (a list of
# ints). The model's cache writes a step's new keys/values to exactly these slots.

# %%
def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of token positions start..end-1 of a sequence with this block table."""
    ### BEGIN SOLUTION
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
    ### END SOLUTION


# %% tags=["benchmark"]
print(slot_mapping([7, 2, 5], 0, 10, 4))    # block 7's 4 slots, block 2's, then 2 slots of block 5

# %% [markdown]
# ## 2. The block allocator
#
# The allocator owns `num_blocks` blocks. `__init__` is written for you:
#
# * `self.free_blocks` — a deque of free block ids (take from the left, return
#   to the right);
# * `self.ref_counts[b]` — how many block tables hold block `b` (0 = free);
# * `self.tables[seq_id]` — the sequence's block table (list of block ids);
# * `self.tokens[seq_id]` — the sequence's token ids (one per position);
# * `self._take()` — pops a free block, sets its refcount to 1, returns its id.
#
# Write the four operations:
#
# * `allocate(seq_id, token_ids)` — a new sequence with a prompt: take
#   `ceil(len / block_size)` blocks, refcount 1 each; return its block table.
#   If there are not enough free blocks, return `None` **and change nothing**
#   (a scheduler will wait or preempt; running out is not an error).
# * `append_slot(seq_id, token_id)` — one more token: return `(slot, copy)`,
#   the slot its K/V go to and `copy`, `None` or a `(src_block, dst_block)`
#   pair. If the last block is full (or there is none) take a new block. If the
#   last block is *partial and shared* (refcount > 1, after a `fork`), writing
#   into it would corrupt the other sequence: **copy on write** — take a new
#   block, move this sequence's table entry to it, drop one reference from the
#   old one and return `(old, new)` so the cache copies the slots already
#   written. Return `None` (changing nothing) when no free block is left.
# * `fork(parent, child)` — the child shares all the parent's blocks (bump
#   each refcount) and its tokens; no free block is needed.
# * `free(seq_id)` — drop one reference from each of its blocks; a block whose
#   refcount reaches 0 goes back to `free_blocks`. Freeing an unknown (or
#   already freed) sequence raises `ValueError`.
#
# Invariants the tests check after every operation: `allocated + free ==
# num_blocks`; refcounts equal the number of tables holding each block; a
# sequence of `n` tokens has exactly `ceil(n / block_size)` blocks.

# %%
class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks
        self.tables: dict[object, list[int]] = {}
        self.tokens: dict[object, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def block_table(self, seq_id) -> list[int]:
        return self.tables[seq_id]

    def ref_count(self, block_id: int) -> int:
        return self.ref_counts[block_id]

    def _take(self) -> int:
        b = self.free_blocks.popleft()
        self.ref_counts[b] = 1
        return b

    def allocate(self, seq_id, token_ids: list[int]) -> list[int] | None:
        ### BEGIN SOLUTION
        need = -(-len(token_ids) // self.block_size)
        if need > self.num_free:
            return None
        self.tables[seq_id] = [self._take() for _ in range(need)]
        self.tokens[seq_id] = list(token_ids)
        return self.tables[seq_id]
        ### END SOLUTION

    def append_slot(self, seq_id, token_id: int) -> tuple[int, tuple[int, int] | None] | None:
        ### BEGIN SOLUTION
        table, pos = self.tables[seq_id], len(self.tokens[seq_id])
        copy = None
        if pos % self.block_size == 0:                  # last block full (or none): a new block
            if not self.free_blocks:
                return None
            table.append(self._take())
        elif self.ref_counts[table[-1]] > 1:            # shared partial block: copy on write
            if not self.free_blocks:
                return None
            old, new = table[-1], self._take()
            self.ref_counts[old] -= 1
            table[-1] = new
            copy = (old, new)
        self.tokens[seq_id].append(token_id)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size, copy
        ### END SOLUTION

    def fork(self, parent, child) -> None:
        ### BEGIN SOLUTION
        for b in self.tables[parent]:
            self.ref_counts[b] += 1
        self.tables[child] = list(self.tables[parent])
        self.tokens[child] = list(self.tokens[parent])
        ### END SOLUTION

    def free(self, seq_id) -> None:
        ### BEGIN SOLUTION
        if seq_id not in self.tables:
            raise ValueError(f"free of unknown sequence {seq_id!r} (double free?)")
        for b in self.tables.pop(seq_id):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks.append(b)
        del self.tokens[seq_id]
        ### END SOLUTION


# %% tags=["benchmark"]
alloc = BlockAllocator(num_blocks=6, block_size=4)
print("allocate 6 tokens ->", alloc.allocate("a", list(range(6))), " free:", alloc.num_free)
alloc.fork("a", "b")
print("fork: refcounts", alloc.ref_counts)
print("b appends ->", alloc.append_slot("b", 99), "(slot, copy-on-write)")
print("a appends ->", alloc.append_slot("a", 42), "(a owns its block again)")
alloc.free("a"), alloc.free("b")
print("after free: free blocks", alloc.num_free)

# %% [markdown]
# ## 3. Reading through the block table
#
# Attention needs a sequence's keys in order. Given the pool of one layer,
# `k_pool` of shape `(num_blocks, block_size, Hkv, D)`, a block table and the
# number of tokens, return the `(num_tokens, Hkv, D)` keys of the sequence —
# without a Python loop over tokens (index the pool with the table, reshape, cut).
# minisys's `PagedKV.gather` does this for a whole batch (`minisys/attention/views.py`),
# and `minisys/attention/paged.py` folds the gather into batched attention.

# %%
def gather_context(k_pool: torch.Tensor, block_table: list[int], num_tokens: int) -> torch.Tensor:
    """(num_blocks, block_size, Hkv, D) pool -> (num_tokens, Hkv, D) keys of one sequence."""
    ### BEGIN SOLUTION
    blocks = k_pool[torch.tensor(block_table, dtype=torch.long)]      # (n_blocks, bs, Hkv, D)
    return blocks.reshape(-1, *k_pool.shape[2:])[:num_tokens]          # (n_blocks * bs, Hkv, D) -> cut
    ### END SOLUTION


# %% [markdown]
# ## 4. Prefix caching: chained block hashes
#
# Many requests start with the same tokens (a system prompt, the earlier turns
# of a chat). vLLM keeps full blocks findable by a hash of **the whole prefix
# up to and including the block**, built as a chain so each block costs one
# hash of `block_size` tokens:
#
#     h[0] = hash((None, tuple(tokens[0:bs])))
#     h[i] = hash((h[i-1], tuple(tokens[i*bs:(i+1)*bs])))
#
# Only full blocks get a hash (a partial block is still being written). Write
# `prefix_block_hashes`, returning `[h[0], h[1], ...]` for the full blocks. Two
# prompts share blocks `0..i` exactly when their hashes agree up to `i`;
# `minisys.kv.block_allocator.BlockAllocator` looks them up at `allocate`, and
# keeps freed hashed blocks in an LRU until it needs the space.

# %%
def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of token_ids."""
    ### BEGIN SOLUTION
    hashes, parent = [], None
    for i in range(len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes
    ### END SOLUTION


# %% [markdown]
# ## 5. Benchmark: how much KV memory holds real tokens
#
# A chat-like workload: prompt and output lengths drawn lognormal (a few
# hundred tokens, a long tail), `max_tokens=512`, `max_model_len=2048`. We grow
# every request to its final length with **your** allocator (block size 16)
# and compare the fraction of allocated slots that hold real tokens with the
# two contiguous layouts: a static `max_model_len` reservation, and the eager
# baseline's `prompt + max_tokens`. Then: how many requests fit in a budget of
# 65,536 token slots (about 1.5 GB of bf16 KV for SmolLM2-135M).

# %% tags=["benchmark"]
import os

import matplotlib.pyplot as plt

from minisys.bench.paged_kv import (chat_workload, contiguous_utilisation, decode_attention_times,
                                    fits_contiguous, fits_paged, paged_utilisation)

quick = os.environ.get("MINISYS_QUICK", "0") not in ("", "0")
requests = chat_workload(200 if quick else 1000, seed=0)
reserve = {"contiguous max_model_len": lambda r: 2048,
           "contiguous prompt+max_tokens": lambda r: r.prompt_len + 512}
util = {name: contiguous_utilisation(requests, f) for name, f in reserve.items()}
fits = {name: fits_contiguous(requests, 65536, f) for name, f in reserve.items()}
util["paged (your allocator), block 16"] = paged_utilisation(requests, 16, allocator_cls=BlockAllocator)
fits["paged (your allocator), block 16"] = fits_paged(requests, 65536, 16)
for name in util:
    print(f"{name:36s} {100 * util[name]:5.1f}% of KV slots hold tokens; {fits[name]:4d} requests fit")
assert util["paged (your allocator), block 16"] >= 0.95

# %% tags=["benchmark"]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
names = list(util)
labels = ["contig.\nmax_model_len", "contig.\nprompt+max_tokens", "paged\nblock 16"]
colors = ["tab:red", "tab:orange", "tab:green"]
axes[0].bar(labels, [100 * util[n] for n in names], color=colors)
axes[0].axhline(95, ls="--", c="k", lw=0.8)
axes[0].set_ylabel("% of allocated KV slots holding tokens")
axes[1].bar(labels, [fits[n] for n in names], color=colors)
axes[1].set_ylabel("requests fitting in 65,536 slots")
fig.suptitle("Lab 03: paged vs contiguous KV memory on a chat-like workload")
fig.tight_layout()
os.makedirs("lab_outputs", exist_ok=True)
fig.savefig("lab_outputs/lab03_paged_kv.png", dpi=120)
plt.show()                       # inline in Jupyter; the file stays in lab_outputs/

# %% [markdown]
# ## 6. Speed, and the real model on a paged cache
#
# Paging is not free: attention must follow the block table. Time one decode
# step (cache write + attention, SmolLM2's head shapes) for a batch of the
# workload's sequences: the contiguous cache with sdpa, the paged cache
# gathered back to packed K/V then sdpa, and minisys's paged attention that
# reads blocks directly. Then generate with SmolLM2 on a paged cache, twice:
# the second time the prompt's full blocks come from the prefix cache.

# %% tags=["benchmark"]
t = decode_attention_times(requests[:8 if quick else 32])
print(f"decode step, batch {t.batch}, mean context {t.mean_context:.0f}: "
      f"contiguous+sdpa {t.contiguous_sdpa_ms:.2f} ms, paged gather+sdpa {t.paged_gather_sdpa_ms:.2f} ms, "
      f"paged attention {t.paged_attention_ms:.2f} ms")

# %% tags=["benchmark"]
from minisys.attention.paged import PagedAttention
from minisys.engine.eager import greedy_generate
from minisys.engine.paged_runner import PagedRunner
from minisys.model import load

model, tokenizer = load(device="cpu", quiet=True)
ids = tokenizer.encode(tokenizer.apply_chat_template(
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What is the capital of France?"}]))
contiguous = greedy_generate(model, ids, 8)
model.set_attention_backend(PagedAttention())
runner = PagedRunner(model, num_blocks=32, block_size=16)
first = runner.greedy_generate(ids, 8, "first")
second = runner.greedy_generate(ids, 8, "second")
model.set_attention_backend("sdpa")
print(repr(tokenizer.decode(first)))
print(f"prefix-cache block hits: {runner.allocator.hits} of {runner.allocator.queries} looked up")
assert first == second == contiguous, "paged and contiguous caches should agree token for token"
