"""Peak memory of a piece of torch code, on any device, by watching every op.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no such
counter. `AllocationTracker` is a ``TorchDispatchMode``: every aten op that
runs inside it reports its outputs; an output whose storage is new (not one
of the op's inputs) is an allocation. Live bytes go down again when the last
tensor object using that storage is garbage collected, so we get

* ``peak_bytes``: the most bytes allocated inside the block alive at once
  (tensors that existed before the block are not counted);
* ``largest_numel`` / ``largest_shape``: the biggest single allocation,
  which is what "never materialises the T x T score matrix" is about.

It sees what goes through the dispatcher (all tensor ops, factories such as
``torch.empty`` included) but not scratch memory inside a kernel. It slows
every op down: time code without it.

    with AllocationTracker() as mem:
        out = backend.forward_packed(q, k, v, meta)
    print(mem.peak_bytes, mem.largest_shape)
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.num_allocations = 0
        self.largest_numel = 0
        self.largest_shape: tuple[int, ...] = ()
        self._storages: dict[int, list[int]] = {}   # data_ptr -> [nbytes, tensors alive]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t, inputs)
        return out

    def _record(self, t: torch.Tensor, input_ptrs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or nbytes == 0:
            return
        entry = self._storages.get(ptr)
        if entry is None:
            if ptr in input_ptrs:          # a view of / in-place on a tensor made outside
                return
            entry = self._storages[ptr] = [nbytes, 0]
            self.num_allocations += 1
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            if t.numel() > self.largest_numel:
                self.largest_numel, self.largest_shape = t.numel(), tuple(t.shape)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[ptr]
