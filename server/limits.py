"""Limits on what a request body may be, enforced before anything parses it.

- :class:`BodySizeLimit` (pure ASGI middleware): a body over ``--max-request-bytes`` is a 413
  ``request_too_large``, whether its ``Content-Length`` says so up front (nothing is read) or a
  chunked body grows past the limit (reading stops there).
- :func:`parse_json`: a body that is not UTF-8 is a 400; a JSON body nested deeper than
  :data:`MAX_JSON_DEPTH` is a 400 ``json_too_deep`` (never a RecursionError, never a 500). The depth
  check runs at C speed: a body with few brackets (a steering vector of thousands of floats has
  one) passes a count; only a bracket-heavy body is measured by :func:`json_depth`, whose loops
  run inside ``bytes`` methods and numpy.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import InvalidRequest, PayloadTooLarge, error_response

MAX_JSON_DEPTH = 64
"""Deepest nesting of JSON arrays and objects a request body may have (deeper → 400
``json_too_deep``). OpenAI bodies nest under 10 deep and steering specs a few more; 64 leaves room
for any real client while staying far below Python's recursion limit, which ``json.loads`` and
pydantic would otherwise hit (a RecursionError)."""

_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """Nesting depth of the arrays and objects of JSON ``body``, in C loops only.

    Escapes are dropped (``\\\\`` first, then ``\\"``), so the quotes left delimit strings, and
    splitting on them leaves what lies outside strings at even indices. Its brackets become +1 / -1;
    the deepest running sum is the depth. Malformed bodies may be mis-measured; the JSON parser
    rejects them."""
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    steps = outside.translate(None, _NOT_BRACKET).translate(_BRACKETS)
    if not steps:
        return 0
    return int(np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int32).max())


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} "
                          "levels deep.", None, "json_too_deep")


def parse_json(body: bytes) -> Any:
    """``body`` parsed as JSON: 400 when it is not UTF-8, not JSON, or nested too deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The body of your request is not valid UTF-8.", None,
                             "invalid_encoding") from None
    # Depth can only exceed the limit with more than ``limit`` opening brackets (a count in C).
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    try:
        return json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        raise InvalidRequest("We could not parse the JSON body of your request.") from None


class BodySizeLimit:
    """Pure ASGI middleware: 413 ``request_too_large`` for a body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self, size: int | None) -> PayloadTooLarge:
        got = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return PayloadTooLarge(f"The request body is too large: {got}; this server accepts at most "
                               f"{self.max_bytes} bytes.", None, headers={"connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                if declared is not None and declared > self.max_bytes:
                    await error_response(self._error(declared))(scope, receive, send)
                    return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(None)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except PayloadTooLarge as exc:  # raised outside a route (a route's handler answers it)
            if started:
                raise
            await error_response(exc)(scope, receive, send)
