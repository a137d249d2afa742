"""The OpenAI generation routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Each hands its request to the one pipeline (:func:`server.pipeline.generate`: route → resolve →
policy → compile → sampling params → admit → run → respond)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import pipeline
from server.openapi import JSON_OR_EVENT_STREAM, request_body
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import AppState


def completions_router(state: AppState, dependencies: list) -> APIRouter:
    r = APIRouter(dependencies=dependencies)

    @r.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest),
            responses=JSON_OR_EVENT_STREAM)
    async def chat_completions(request: Request) -> Response:
        return await pipeline.generate(request, state, chat=True)

    @r.post("/v1/completions", openapi_extra=request_body(CompletionRequest),
            responses=JSON_OR_EVENT_STREAM)
    async def completions(request: Request) -> Response:
        return await pipeline.generate(request, state, chat=False)

    return r
