"""KV caches: the interface, the contiguous cache (eager baseline); the paged cache comes in lesson 03."""
from .base import KVCache
from .contiguous import ContiguousKVCache

__all__ = ["KVCache", "ContiguousKVCache"]
