"""Graceful shutdown: on SIGTERM or SIGINT, stop accepting, drain, exit 0 within ``--shutdown-grace-s``.

The sequence (``G`` = the grace period):

1. the signal sets uvicorn's ``should_exit``; `GracefulServer.shutdown` starts
   the app's drain (`app.Server.drain`): new requests get 503, /health 503;
2. uvicorn closes the listening socket (new connections are refused) and
   asks every open connection to close once its response is over;
3. requests in flight keep being served for up to ``G - margin`` seconds
   (``margin = min(2 s, G / 2)``: time to flush the last events, even on a
   loaded machine where the event loop is slow to write them); those
   still open then are aborted: a stream gets an SSE error event
   (``code: server_shutting_down``) and ``data: [DONE]``, a non-streamed
   request a 503; the engine frees their KV blocks;
4. uvicorn waits for the connections to close (at most ``G``), then the
   app's lifespan stops the engine loop and the engine thread;
5. the process exits 0 (uvicorn would re-raise the signal after a graceful
   shutdown and so die *by* it; a server that shut down as asked has not
   failed). A second SIGINT forces the exit at once, as in uvicorn.

Invariant: no client sees a stream end without a finish_reason or an error
event, unless it stops reading for longer than the margin.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Awaitable, Callable, Iterator, Optional

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def abort_after(grace_s: float) -> float:
    """Seconds after the signal when in-flight requests are aborted: the grace period less a margin."""
    return grace_s - min(2.0, grace_s / 2)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining the app (``drain(abort_after_s)``) before its own shutdown; exits 0 after
    a signal. ``config.timeout_graceful_shutdown`` must be the grace period."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self.signals_received: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to `handle_exit` while serving, then restore the old handlers; unlike
        uvicorn, do not re-raise the signal afterwards (that would make the exit status -15, not 0)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        self.signals_received.append(sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: Optional[list] = None) -> None:
        grace = float(self.config.timeout_graceful_shutdown or 0)
        drain = asyncio.create_task(self._drain(abort_after(grace)), name="minisys-drain")
        try:
            await super().shutdown(sockets)
        finally:
            if not drain.done():
                drain.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await drain
