"""What ``/openapi.json`` says about routes that read their own bodies, and the error answers.

The generation, inspect and admin routes parse their bodies with :func:`server.http.json_body`
and a pydantic model (so that a bad body is an OpenAI-style 400 naming the field, not FastAPI's
422). FastAPI cannot see such a body: :func:`request_body` documents it with the model's JSON
schema (``$defs`` inlined, so the document stands alone). :data:`ERROR_RESPONSES` documents the
error shape every route may answer with; :data:`JSON_OR_EVENT_STREAM` the two 200 bodies of a
route that streams when asked.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(x, defs) for x in node]
    return node


class ErrorDetail(BaseModel):
    """The ``error`` object of every 4xx/5xx answer (OpenAI's shape)."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined: it stands alone in any document."""
    schema = model.model_json_schema()
    return _inline_refs(schema, schema.pop("$defs", {}))


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _json_schema(ErrorResponse)}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": _error("A bad request; `param` names the offending field (400 invalid, 401 no or "
                  "unknown key, 403 forbidden by role or policy, 404 unknown name, 409 exists, "
                  "413 body too large, 415 not JSON, 429 rate or capacity, with `Retry-After`)"),
    503: _error("The engine is starting or dead, or the experiment store is unavailable"),
}
"""Error answers of every route (FastAPI's ``responses=``)."""

JSON_OR_EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"description": "One JSON body, or with `stream: true` server-sent events "
                         "(`data: {chunk}` lines, then `data: [DONE]`)",
          "content": {"application/json": {}, "text/event-stream": {}}},
}
"""The 200 answers of a generation route."""

HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"description": "Not serving: the engine is starting, failed to start, or died",
          "content": {"application/json": {"schema": {
              "type": "object", "required": ["status"],
              "properties": {"status": {"enum": ["starting", "failed", "engine_dead"]},
                             "error": {"type": "string"}}}}}},
}
"""``GET /health``'s 503, which is a status, not an error body."""


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads ``model`` with :func:`server.http.json_body`."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _json_schema(model)}}}}
