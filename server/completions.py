"""The OpenAI generation routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

A body is validated (:mod:`server.protocol`), routed through presets and experiments
(``state.experiments.route``), rendered to prompt token ids, its steering compiled, and run by
:func:`server.generation.run`; the answer is one JSON body or a server-sent-event stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server import generation as gen
from server.errors import InvalidRequest, ModelNotFound, describe
from server.http import DisconnectAwareStream, json_body, sse, until_client_gone
from server.protocol import ChatCompletionRequest, CompletionRequest, parse_chat, parse_completion
from server.state import AppState
from steering.request import CompiledSteering

logger = logging.getLogger(__name__)


def completions_router(state: AppState, dependencies: list) -> APIRouter:
    r = APIRouter(dependencies=dependencies)

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, state, chat=True)

    @r.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(request, state, chat=False)

    return r


def _check_model(state: AppState, model: str | None) -> str:
    names = state.served_names
    if model is None:
        return names[0]
    if model not in names:
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves {names}", "model")
    return model


def _chat_prompt(state: AppState, req: ChatCompletionRequest) -> list[int]:
    try:
        text = state.tokenizer.apply_chat_template(
            req.chat_messages(), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001  (template rejected the conversation)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", "messages") from None
    return list(state.tokenizer.encode(text, add_special_tokens=False))


def _text_prompt(state: AppState, req: CompletionRequest) -> list[int]:
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return list(state.tokenizer.encode(prompt))
    vocab = len(state.tokenizer)
    if any(not 0 <= t < vocab for t in prompt):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
    return list(prompt)


async def _handle(request: Request, state: AppState, chat: bool) -> Response:
    """Validate, prepare and run one chat or text completion request."""
    body = await json_body(request)
    req: gen.GenerationRequest = parse_chat(body) if chat else parse_completion(body)
    ab = state.experiments.route(req, request.headers)  # presets, experiments → model, steering
    model = ab.model or _check_model(state, req.model)
    state.require_engine()
    if chat:
        assert isinstance(req, ChatCompletionRequest)
        prompt_ids, prompt_param, prefix = _chat_prompt(state, req), "messages", "chatcmpl"
    else:
        assert isinstance(req, CompletionRequest)
        prompt_ids, prompt_param, prefix = _text_prompt(state, req), "prompt", "cmpl"
    compiled: CompiledSteering | None = None
    if req.steering is not None:
        if state.compiler is None:
            raise InvalidRequest("steering is disabled on this server (started with --no-steering)",
                                 "steering", "steering_disabled")
        compiled = state.compiler.compile(req.steering)
    assert state.max_model_len is not None
    gen.check_context(len(prompt_ids), state.max_model_len, req, prompt_param)
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    job = gen.Job(request_id=request_id, prompt_ids=prompt_ids,
                  params=gen.sampling_params(req, compiled, request_id), compiled=compiled)

    headers = {"x-steering-hash": compiled.hash} if compiled is not None else {}
    headers.update(ab.headers())
    if req.stream:
        def completed() -> None:  # recorded only once the whole stream went out
            state.experiments.finish(ab, job, len(prompt_ids))

        return DisconnectAwareStream(
            _stream(state, req, job, compiled, model, chat, ab.body_field(), on_complete=completed),
            media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
    choices = await until_client_gone(request, asyncio.ensure_future(_collect(state, job, chat)))
    if choices is None:
        return Response(status_code=499)  # the client closed the request: nobody to answer
    build = _chat_body if chat else _completion_body
    body = build(req, job, compiled, model, choices)
    activations = await gen.steering_activations(state, job)
    if activations is not None:
        body["steering"]["activations"] = activations
    state.experiments.finish(ab, job, len(prompt_ids), body)
    return JSONResponse(body, headers=headers)


async def _collect(state: AppState, job: gen.Job, chat: bool) -> dict[int, gen.Choice]:
    choices = {i: gen.Choice() for i in range(job.params.n)}
    k = job.params.logprobs
    async for out in gen.run(state, job):
        if out.prompt_logprobs:  # only the first delta carries them
            job.prompt_logprobs = gen.prompt_logprobs(state, out)
        for o in out.outputs:
            c = choices[o.index]
            if k is not None and o.token_ids:
                offset = sum(len(t) for t in c.text)
                c.logprobs.append(gen.chat_logprobs(state, o, k) if chat
                                  else gen.completion_logprobs(state, o, k, offset))
            c.text.append(o.text)
            c.token_ids.extend(o.token_ids)
            if o.finish_reason is not None:
                c.finish_reason = o.finish_reason
    return choices


def _common(req: gen.GenerationRequest, job: gen.Job, compiled: CompiledSteering | None,
            model: str, obj: str) -> dict[str, Any]:
    body: dict[str, Any] = {"id": job.request_id, "object": obj, "created": int(time.time()),
                            "model": model, "system_fingerprint": None}
    if req.return_token_ids:
        body["prompt_token_ids"] = job.prompt_ids
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = job.prompt_logprobs
    if compiled is not None:
        body["steering"] = compiled.summary()
    return body


def _chat_body(req: gen.GenerationRequest, job: gen.Job,
               compiled: CompiledSteering | None, model: str, choices: dict[int, gen.Choice]) -> dict[str, Any]:
    body = _common(req, job, compiled, model, "chat.completion")
    body["choices"] = []
    for index, c in sorted(choices.items()):
        choice: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": "".join(c.text)},
            "logprobs": ({"content": [item for part in c.logprobs for item in part]}
                         if job.params.logprobs is not None else None),
            "finish_reason": c.finish_reason,
        }
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        body["choices"].append(choice)
    body["usage"] = gen.usage(len(job.prompt_ids), sum(len(c.token_ids) for c in choices.values()))
    return body


def _completion_body(req: gen.GenerationRequest, job: gen.Job,
                     compiled: CompiledSteering | None, model: str,
                     choices: dict[int, gen.Choice]) -> dict[str, Any]:
    body = _common(req, job, compiled, model, "text_completion")
    body["choices"] = []
    for index, c in sorted(choices.items()):
        logprobs = None
        if job.params.logprobs is not None:
            logprobs = {key: [v for part in c.logprobs for v in part[key]]
                        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        choice: dict[str, Any] = {"index": index, "text": "".join(c.text), "logprobs": logprobs,
                                  "finish_reason": c.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        body["choices"].append(choice)
    body["usage"] = gen.usage(len(job.prompt_ids), sum(len(c.token_ids) for c in choices.values()))
    return body


async def _stream(state: AppState, req: gen.GenerationRequest, job: gen.Job,
                  compiled: CompiledSteering | None, model: str, chat: bool,
                  experiment: dict[str, str] | None = None,
                  on_complete: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """SSE events: one chunk per choice delta, an optional usage chunk, then ``[DONE]``. The first
    chunk carries the request-level fields (``steering``, ``experiment``, prompt ids/logprobs).
    ``on_complete`` runs once the generation finished without error, before ``[DONE]``."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = req.include_usage()
    k = job.params.logprobs
    started: set[int] = set()
    offsets: dict[int, int] = {}
    completion_tokens = 0
    first = True
    try:
        async for out in gen.run(state, job):
            if out.prompt_logprobs:  # only the first delta carries them
                job.prompt_logprobs = gen.prompt_logprobs(state, out)
            for o in out.outputs:
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                completion_tokens += len(o.token_ids)
                chunk = _common(req, job, compiled, model, obj) if first else \
                    {"id": job.request_id, "object": obj, "created": int(time.time()), "model": model}
                if first and experiment is not None:
                    chunk["experiment"] = experiment
                first = False
                choice: dict[str, Any] = {"index": o.index}
                if chat:
                    delta: dict[str, Any] = {"content": o.text}
                    if o.index not in started:
                        delta = {"role": "assistant", **delta}
                    choice["delta"] = delta
                    choice["logprobs"] = ({"content": gen.chat_logprobs(state, o, k)}
                                          if k is not None else None)
                else:
                    choice["text"] = o.text
                    choice["logprobs"] = (gen.completion_logprobs(state, o, k, offsets.get(o.index, 0))
                                          if k is not None else None)
                offsets[o.index] = offsets.get(o.index, 0) + len(o.text)
                started.add(o.index)
                choice["finish_reason"] = o.finish_reason
                if req.return_token_ids:
                    choice["token_ids"] = list(o.token_ids)
                chunk["choices"] = [choice]
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
        activations = await gen.steering_activations(state, job)
        if activations is not None:
            yield sse({"id": job.request_id, "object": obj, "created": int(time.time()),
                        "model": model, "choices": [], "steering": {"activations": activations}})
        if include_usage:
            yield sse({"id": job.request_id, "object": obj, "created": int(time.time()),
                        "model": model, "choices": [],
                        "usage": gen.usage(len(job.prompt_ids), completion_tokens)})
        if on_complete is not None:
            on_complete()
    except Exception as exc:  # noqa: BLE001  (headers are sent: report in-band)
        _, body = describe(exc)
        logger.warning("stream %s failed: %s", job.request_id, body["error"]["message"])
        yield sse(body)
    yield sse("[DONE]")
