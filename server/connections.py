"""What a slow or idle client may hold: uvicorn's HTTP protocol with a header timeout, a body
timeout and a cap on open connections (uvicorn has only the keep-alive timeout).

Without them, 300 sockets that each send half a request line and stall were all still open 70 s
later, and a few thousand exhaust the server's file descriptors. Per connection:

- **header timeout**: the request line and headers must arrive within ``header_timeout_s`` of
  the connection opening (or, on a kept-alive connection, of the request's first byte); else
  ``408`` and the connection is closed;
- **body timeout**: the whole body within ``body_timeout_s`` of the headers; else the connection
  is closed (the route sees the client leave, as when it disconnects);
- **connection cap**: past ``max_connections`` open connections a new one is answered ``503``
  with ``Retry-After`` and closed at once;
- between requests uvicorn's own keep-alive timeout (``--keep-alive-timeout``) applies.

Semantics: a connection closed by a timer never held an engine request (the headers or body it
owed had not arrived); requests in flight on other connections are not touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import resource
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import APIError, RequestTimeout, TooManyConnections, describe

logger = logging.getLogger(__name__)


@dataclass
class ConnectionLimits:
    """Per-connection bounds of the HTTP server (flags of ``steer serve``)."""

    header_timeout_s: float = 10.0
    """The request line and headers must arrive within this many seconds (408 after)."""
    body_timeout_s: float = 60.0
    """The body must arrive within this many seconds of the headers (8 MiB at ~140 KB/s)."""
    max_connections: int = 2048
    """Open connections at most; a new one past it is answered 503 and closed. Keep it below
    the process's file-descriptor limit (``ulimit -n``) minus what the engine holds."""
    keep_alive_s: float = 5.0
    """An idle kept-alive connection is closed after this many seconds (uvicorn's)."""


def _response(exc: APIError) -> bytes:
    """``exc`` as the raw HTTP response a connection gets before (or instead of) any route: its
    status, body and headers from the error table (:func:`server.errors.describe`)."""
    status, body = describe(exc)
    raw = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(raw)}", "connection: close",
            *(f"{k.lower()}: {v}" for k, v in (exc.headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + raw


TIMED_OUT = _response(RequestTimeout("the request's headers did not arrive in time"))
OVER_CAPACITY = _response(TooManyConnections("too many open connections; retry shortly",
                                             headers={"Retry-After": "1"}))


def guarded_protocol(limits: ConnectionLimits, on_close: Any = None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol under ``limits``; ``on_close(reason)`` is called for each
    connection a limit closes (``header_timeout``, ``body_timeout``, ``max_connections``)."""

    def closed(reason: str) -> None:
        if on_close is not None:
            on_close(reason)

    class GuardedHttpProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(OVER_CAPACITY)
                transport.close()
                closed("max_connections")
                return
            self._arm(limits.header_timeout_s, self._header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._timer is None:  # a kept-alive connection's next request
                self._arm(limits.header_timeout_s, self._header_timeout)

        def on_headers_complete(self) -> None:
            self._arm(limits.body_timeout_s, self._body_timeout)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _arm(self, seconds: float, then: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, then)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _header_timeout(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.write(TIMED_OUT)
                self.transport.close()
                closed("header_timeout")

        def _body_timeout(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()
                closed("body_timeout")

    return GuardedHttpProtocol


FD_RESERVE = 256
"""File descriptors kept for the rest of the process (engine pipes, the store, logs, packs)."""


def fitted(limits: ConnectionLimits) -> ConnectionLimits:
    """``limits`` with ``max_connections`` lowered to fit the process's open-file limit (minus
    :data:`FD_RESERVE`), with a warning: past it ``accept`` fails with EMFILE instead of the
    cap's clean 503."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return limits
    room = soft - FD_RESERVE
    if soft == resource.RLIM_INFINITY or limits.max_connections <= room:
        return limits
    room = max(room, 16)
    logger.warning("--max-connections %d does not fit the open-file limit (ulimit -n %d): using %d",
                   limits.max_connections, soft, room)
    return dataclasses.replace(limits, max_connections=room)


def uvicorn_options(limits: ConnectionLimits, on_close: Any = None) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords that apply ``limits`` (fitted to the open-file limit)."""
    limits = fitted(limits)
    return {"http": guarded_protocol(limits, on_close), "timeout_keep_alive": limits.keep_alive_s}
