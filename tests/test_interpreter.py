"""The server's interpreter settings (`minisys.server.interpreter`): the GC pause is counted across
threads and never turns on a GC someone else turned off. Oracle: `gc.isenabled`."""
from __future__ import annotations

import gc
import threading

from minisys.server.interpreter import collections_paused


def test_pauses_nest_and_overlap_across_threads_and_the_gc_resumes_after_the_last():
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other():
        with collections_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with collections_paused():
        with collections_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled()             # the other thread is still parsing
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_a_gc_disabled_by_someone_else_stays_disabled():
    gc.disable()
    try:
        with collections_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_do_not_keep_the_gc_off_past_the_bound(monkeypatch):
    import minisys.server.interpreter as interp
    monkeypatch.setattr(interp, "MAX_PAUSE_S", 0.0)
    with collections_paused():
        assert not gc.isenabled()
        with collections_paused():            # overlapping, past the bound: collections run again
            assert gc.isenabled()
    assert gc.isenabled()
