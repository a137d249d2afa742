"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``.

Every exception a route can raise is mapped to an HTTP status in ONE table, :data:`ERROR_TABLE`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import vllm_env  # noqa: F401  (before vllm)
from steering.spec import SteeringError, steering_error
from steering.validation import STEERING_FIELD, clip, first_error, param_path
from vllm.exceptions import (
    GracefulHTTPError,
    MaxQueuedTokensError,
    QueueOverflowError,
    RetryableRequestError,
    VLLMClientError,
    VLLMValidationError,
)
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """Base of our own request errors; ``param`` names the offending request field; ``headers``
    are sent with the error response (e.g. ``Retry-After`` on a 429)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class InvalidRequest(APIError):
    """A parameter is invalid or names a feature we do not support."""


class ModelNotFound(APIError):
    """The request names a model this server does not serve."""


class NotFound(APIError):
    """The request names a pack or feature that is not loaded."""


class Conflict(APIError):
    """The request would create something that already exists (a preset or experiment name)."""


class StoreUnavailable(APIError):
    """The experiment store (SQLite) failed; completions are still served."""


class ContextTooLong(APIError):
    """The prompt (plus requested output) does not fit the model's context."""


class AuthError(APIError):
    """Missing or wrong API key."""


class PermissionDenied(APIError):
    """The key is valid but its role or policy does not allow this (``param`` names the field)."""


class RateLimited(APIError):
    """The key's requests or tokens per minute are spent; carries ``Retry-After``."""


class UnsupportedMediaType(APIError):
    """A state-changing request without ``Content-Type: application/json`` (no key configured)."""


class EngineUnavailable(APIError):
    """The engine is still starting, or it died."""


class RequestTimeout(APIError):
    """A connection's request line and headers did not arrive in time (server/connections.py)."""


class TooManyConnections(APIError):
    """A new connection past ``--max-connections`` (server/connections.py)."""


class PayloadTooLarge(APIError):
    """The request body is larger than ``--max-request-bytes``."""


class CapacityExceeded(APIError):
    """No steering slot could be had in time (queue full or timed out); carries ``Retry-After``."""


class SteeringUnavailable(APIError):
    """A worker could not apply this request's steering (it ran unsteered): the response is
    failed rather than returned as if steered (see steering/worker/slots.py)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None = None


# Most specific first: the first row whose exception type matches wins.
ERROR_TABLE: list[tuple[type[BaseException], ErrorKind]] = [
    (ModelNotFound, ErrorKind(404, "invalid_request_error", "model_not_found")),
    (NotFound, ErrorKind(404, "invalid_request_error", "not_found")),
    (Conflict, ErrorKind(409, "invalid_request_error", "conflict")),
    (StoreUnavailable, ErrorKind(503, "service_unavailable", "store_unavailable")),
    (ContextTooLong, ErrorKind(400, "invalid_request_error", "context_length_exceeded")),
    (InvalidRequest, ErrorKind(400, "invalid_request_error")),
    (AuthError, ErrorKind(401, "authentication_error", "invalid_api_key")),
    (PermissionDenied, ErrorKind(403, "permission_error", "permission_denied")),
    (RateLimited, ErrorKind(429, "rate_limit_exceeded", "rate_limit_exceeded")),
    (UnsupportedMediaType, ErrorKind(415, "invalid_request_error", "unsupported_media_type")),
    (EngineUnavailable, ErrorKind(503, "service_unavailable", "engine_unavailable")),
    (PayloadTooLarge, ErrorKind(413, "invalid_request_error", "request_too_large")),
    (RequestTimeout, ErrorKind(408, "invalid_request_error", "request_timeout")),
    (TooManyConnections, ErrorKind(503, "service_unavailable", "too_many_connections")),
    (CapacityExceeded, ErrorKind(429, "rate_limit_exceeded", "steering_capacity_exceeded")),
    (SteeringUnavailable, ErrorKind(503, "service_unavailable", "steering_unavailable")),
    (SteeringError, ErrorKind(400, "invalid_request_error", "invalid_steering")),
    (RequestValidationError, ErrorKind(400, "invalid_request_error")),
    (ValidationError, ErrorKind(400, "invalid_request_error")),
    (VLLMValidationError, ErrorKind(400, "invalid_request_error")),
    (VLLMClientError, ErrorKind(400, "invalid_request_error")),
    (QueueOverflowError, ErrorKind(503, "service_unavailable", "engine_queue_full")),
    (MaxQueuedTokensError, ErrorKind(503, "service_unavailable", "engine_prefill_backlog")),
    (RetryableRequestError, ErrorKind(503, "service_unavailable", "retryable_error")),
    (EngineDeadError, ErrorKind(503, "service_unavailable", "engine_dead")),
    (EngineGenerateError, ErrorKind(500, "internal_error", "generation_failed")),
    (Exception, ErrorKind(500, "internal_error")),
]


def kind_of(exc: BaseException) -> ErrorKind:
    """The table row for ``exc``."""
    for exc_type, kind in ERROR_TABLE:
        if isinstance(exc, exc_type):
            return kind
    return ErrorKind(500, "internal_error")


def loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """Pydantic location → OpenAI param path: ('body', 'messages', 0, 'role') → messages.[0].role,
    below a ``steering`` object the spec's (``steering.vectors[0].values``); None for the body
    itself (:func:`steering.validation.param_path` with ``openai=True``)."""
    return param_path(loc, openai=True) or None


def validation_error(exc: RequestValidationError | ValidationError) -> APIError | SteeringError:
    """The first pydantic error as our own error naming the field; an error inside a
    ``steering`` object is a SteeringError with the steering spec's param path."""
    first = first_error(exc, prefer_bounds=True)
    loc = tuple(first.get("loc", ()))
    if STEERING_FIELD in loc:
        at = loc.index(STEERING_FIELD) + 1
        return steering_error({**first, "loc": loc[at:]}, loc_to_param(loc[:at]) or STEERING_FIELD)
    param = loc_to_param(loc)
    kind = first.get("type")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param,
                              "unsupported_parameter")
    if kind == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request.")
    msg = first.get("msg", "invalid request")
    return InvalidRequest(f"{param}: {msg}" if param else str(msg), param)


MAX_MESSAGE_CHARS = 2048
"""An error message is cut to this many characters and a param to MAX_PARAM_CHARS (values are
already cut where they are echoed, :func:`steering.validation.echo`; this bounds what is left)."""
MAX_PARAM_CHARS = 256


def _cut(text: str | None, limit: int) -> str | None:
    """At most ``limit`` characters, "…" included."""
    return None if text is None else text if len(text) <= limit else clip(text, limit - 1)


INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."
"""The message of every 5xx that is not one of our own errors: exception text stays in the log."""


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for ``exc``; an unexpected exception's text is never
    sent (its traceback is logged by :func:`error_response`)."""
    if isinstance(exc, (RequestValidationError, ValidationError)):
        exc = validation_error(exc)
    kind = kind_of(exc)
    code = kind.code
    param: str | None = None
    if isinstance(exc, (APIError, SteeringError)):
        message, param = exc.message, exc.param
        code = exc.code or code
    elif isinstance(exc, VLLMValidationError):
        message, param = str(exc.args[0]) if exc.args else str(exc), exc.parameter
    elif isinstance(exc, (GracefulHTTPError, RetryableRequestError)):
        message = str(exc.args[0]) if exc.args else str(exc)  # vLLM's own words for clients
    elif kind.status >= 500:
        message = INTERNAL_ERROR_MESSAGE  # never echo an exception's text (it is logged instead)
    else:
        message = str(exc)
    body = {"error": {"message": _cut(message, MAX_MESSAGE_CHARS), "type": kind.type,
                      "param": _cut(param, MAX_PARAM_CHARS), "code": code}}
    return kind.status, body


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    """JSON error response for ``exc``; 5xx are logged with their traceback."""
    status, body = describe(exc)
    if status >= 500 and not isinstance(exc, (EngineUnavailable, EngineDeadError)):
        logger.error("request failed", exc_info=exc)
    own = getattr(exc, "headers", None) if isinstance(exc, APIError) else None
    if isinstance(exc, (QueueOverflowError, MaxQueuedTokensError, RetryableRequestError)):
        own = {"Retry-After": "1"}  # vLLM's admission control: retry here shortly, or elsewhere
    merged = {**(own or {}), **(headers or {})} or None
    return JSONResponse(body, status_code=status, headers=merged)


def _http_exception(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through :func:`error_response`."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # 404/405 routes

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for exc_type, _kind in ERROR_TABLE:
        app.add_exception_handler(exc_type, handle)
