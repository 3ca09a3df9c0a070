"""One streamed HTTP response that cleans up after itself, for the server and the cluster's router.

Both stream Server-Sent Events and must release something when the stream is over: the server its
engine request and admission ticket, the router its upstream response from a replica. Starlette's
background tasks do not run when the client is gone before the first byte or sending fails, so the
clean-up runs in a ``finally`` around the whole response. A module of its own because the router
(``minisys.cluster``) cannot import the server package (which imports the cluster's KV transfer).
"""
from __future__ import annotations

import inspect
from typing import Awaitable, Callable

from starlette.responses import StreamingResponse


class ClosingStreamingResponse(StreamingResponse):
    """A `StreamingResponse` that calls ``on_close()`` once it is over, however it ends: finished, the
    client gone (even before the generator started), or an error while sending. ``on_close`` may be
    a plain function or a coroutine function (then awaited)."""

    def __init__(self, content, on_close: Callable[[], None | Awaitable[None]], **kw) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            done = self._on_close()
            if inspect.isawaitable(done):
                await done
