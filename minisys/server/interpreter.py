"""The Python interpreter, set for a server's latency: the cyclic GC and the GIL's switch interval.

A big request body (100k chat messages) becomes hundreds of thousands of
Python objects while it is parsed, validated and rendered. Allocating them
triggers full (generation 2) collections, and each one walks every tracked
object in the process while holding the GIL: 150-200 ms per pass, several
passes per body, during which the engine thread cannot run a single torch op
and every stream stalls (measured: one such chat paused all streams ~1 s).

Two standard remedies, both here:

* `freeze_startup_objects` (``gc.freeze()`` once the model is loaded): the
  objects alive at start-up (modules, the model, the tokenizer) move to a
  permanent generation that no later collection walks.
* `collections_paused`: no collection *starts* while a request is being
  parsed or rendered in a worker thread. Those objects are mostly freed by
  reference counting when the request is done, so the next collection finds
  little to do. The pause is process-wide (the GC has one switch), so it is
  counted: collections resume when the last concurrent parse ends, or once
  pauses have overlapped for `MAX_PAUSE_S` without a break (steady traffic
  must not switch the GC off for good); a GC someone else disabled stays
  disabled.

Bodies are bounded by ``--max-body-bytes``, so a pause is bounded too.

The GIL (`short_switch_interval`): while a worker thread runs Python (the
chat template over a long conversation), the engine thread, which gives the
GIL up around each of the hundreds of torch ops of a step, waits up to the
switch interval (5 ms by default) to get it back each time: a convoy that
turns a 30 ms decode step into seconds. A 0.5 ms interval shortens each wait
tenfold; with no contention it costs nothing.

Measured with tests/test_server_robust.py's huge-body test (the longest pause of the
other streams while a 100k-message chat is refused): ~1.2 s before, ~0.7 s
with the GC remedies, ~0.2-0.4 s with the shorter interval as well.
"""
from __future__ import annotations

import gc
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_depth = 0
_resume = False          # whether the GC was on when the first pause began
_since = 0.0             # when the current run of overlapping pauses began
MAX_PAUSE_S = 2.0


SWITCH_INTERVAL_S = 0.0005


def short_switch_interval() -> None:
    """Threads waiting for the GIL get it after at most 0.5 ms of another thread's Python (default 5 ms)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def freeze_startup_objects() -> None:
    """Collect once, then exclude every object alive now from all future collections."""
    gc.collect()
    gc.freeze()


@contextmanager
def collections_paused() -> Iterator[None]:
    """No cyclic collection starts inside this block (in any thread); nested and concurrent uses counted."""
    global _depth, _resume, _since
    with _lock:
        if _depth == 0:
            _resume, _since = gc.isenabled(), time.monotonic()
            gc.disable()
        elif _resume and time.monotonic() - _since > MAX_PAUSE_S:
            gc.enable()                       # paused long enough: collections run until the pauses end
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
