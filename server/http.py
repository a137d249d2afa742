"""HTTP plumbing shared by every route: request ids and counts (keys: server/auth.py), JSON bodies, and
server-sent-event streams that stop (and abort their engine request) when the client leaves."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.limits import parse_json
from server.metrics import Metrics

KNOWN_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/steering", "/health",
                "/metrics", "/version", "/v1/packs", "/v1/features", "/v1/features/search",
                "/v1/features/inspect", "/v1/presets", "/v1/experiments"}
"""Routes counted under their own label in ``steer_http_requests``; the rest count as "other"."""


REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
"""An ``x-request-id`` the client sends is echoed only in this form; any other gets a fresh id."""


class RequestIdAndMetrics:
    """Pure ASGI middleware: echo or create ``x-request-id``; count requests by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"")
        request_id = given.decode("ascii") if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()


async def json_body(request: Request) -> Any:
    """The request body parsed as JSON; 400 (never a dropped connection) when it is not JSON, not
    UTF-8 or nested too deep (:func:`server.limits.parse_json`)."""
    return parse_json(await request.body())


class DisconnectAwareStream(StreamingResponse):
    """SSE response that stops its body generator as soon as the client disconnects.

    Stopping the generator runs :func:`server.runner.run`'s ``finally``, which aborts the
    engine request: no orphan generation, even while the request waits for a steering slot.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        body = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(until_disconnect())
        try:
            await asyncio.wait({body, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (body, watch):
                task.cancel()
            results = await asyncio.gather(body, watch, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):
            raise error


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def until_client_gone(request: Request, work: asyncio.Future[Any]) -> Any:
    """Await ``work``; cancel it (aborting the engine request) if the client disconnects."""
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.5)
            if done:
                return work.result()
            if await request.is_disconnected():
                return None
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
