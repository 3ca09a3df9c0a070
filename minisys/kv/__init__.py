"""KV caches: the interface, the contiguous cache (eager baseline), the paged cache (lesson 03).

`BlockAllocator` (pure Python) decides which blocks a sequence owns;
`PagedKVCache` holds the tensors; `minisys.engine.paged_runner.PagedRunner`
drives a model on them.
"""
from .base import KVCache
from .block_allocator import AllocatorError, BlockAllocator, BlockTable, Refusal
from .contiguous import ContiguousKVCache
from .paged import PagedKVCache

__all__ = ["KVCache", "ContiguousKVCache", "PagedKVCache", "BlockAllocator", "BlockTable",
           "Refusal", "AllocatorError"]
