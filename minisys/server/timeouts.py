"""How long a client may take, and how long a shutdown may take (``--timeout-*-s``, ``--shutdown-grace-s``).

A slow or stalled client must not hold a connection (and what the server
keeps for it) for ever:

- headers: a connection that has not sent a complete request head within
  ``timeout_header_s`` of opening (or of its previous response, when kept
  alive) is closed, with a ``408`` if part of a head came
  (`header_timeout_protocol`: uvicorn's h11 protocol with one timer;
  uvicorn has no such timeout of its own, and a drip of bytes keeps its
  keep-alive timer from firing);
- body: the whole body must arrive within ``timeout_body_s`` of the head,
  else ``408`` and the connection is closed (`middleware.BodyLimitMiddleware`,
  which reads every POST body before the app sees it).

Shutdown (SIGTERM or SIGINT): see `shutdown`; ``shutdown_grace_s`` bounds it.

Invariant: every value is a finite number > 0, checked once here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import flag


def _knob(default: float, help: str) -> float:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerTimeouts:
    """Each field is the flag ``--field-name`` (seconds, > 0)."""

    timeout_header_s: float = _knob(10.0, "seconds a connection may take to send a request's head (then 408, "
                                    "closed)")
    timeout_body_s: float = _knob(60.0, "seconds a request's body may take to arrive after its head (then 408, "
                                  "closed)")
    shutdown_grace_s: float = _knob(10.0, "on SIGTERM/SIGINT: seconds in-flight requests get to finish before "
                                    "they are aborted with an error event; the process exits within it")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{flag(f.name)} must be a number of seconds > 0, got {value!r}")


def add_timeout_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timeouts", "slow clients and graceful shutdown")
    for f in dataclasses.fields(ServerTimeouts):
        group.add_argument(flag(f.name), dest=f.name, type=float, default=f.default,
                           help=f"{f.metadata['help']} (default: {f.default:g})")


def timeouts_from_args(args: argparse.Namespace) -> ServerTimeouts:
    return ServerTimeouts(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerTimeouts)})


_HEADER_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_HEADER_TIMEOUT_BODY = (b'{"error": {"message": "the request head did not arrive in time (--timeout-header-s)", '
                        b'"type": "invalid_request_error", "param": null, "code": "timeout_header"}}')


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a header timer: armed when the connection opens and after each response;
    when it fires while the client still owes a complete request head (h11's ``their_state`` is IDLE and no
    request is being served), the client gets 408 and the connection is closed. Pass it as
    ``uvicorn.Config(http=...)``."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:      # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            serving = self.cycle is not None and not self.cycle.response_complete
            if serving or self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.trailing_data[0]:            # part of a head came: tell the client why
                self.transport.write(_HEADER_TIMEOUT_RESPONSE % (len(_HEADER_TIMEOUT_BODY), _HEADER_TIMEOUT_BODY))
            self.transport.close()                   # nothing came: an idle connection, closed quietly

    return HeaderTimeoutH11Protocol
