"""The OpenAI generation routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

A body is validated (:mod:`server.protocol`), routed through presets and experiments
(``state.experiments.route``), rendered to prompt token ids, its steering compiled, and run by
:func:`server.generation.run`; the answer is one JSON body or a server-sent-event stream. Tool
calls are read from each choice's output by :mod:`server.tools`; ``echo`` prepends the prompt.
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
from server import tools
from server.auth import admit_generation, principal_of
from server.errors import InvalidRequest, ModelNotFound, describe
from server.http import DisconnectAwareStream, json_body, sse, until_client_gone
from server.openapi import JSON_OR_EVENT_STREAM, request_body
from server.protocol import ChatCompletionRequest, CompletionRequest, parse_chat, parse_completion
from server.state import AppState
from server.steering_limits import Held
from steering.request import CompiledSteering

logger = logging.getLogger(__name__)


def completions_router(state: AppState, dependencies: list) -> APIRouter:
    r = APIRouter(dependencies=dependencies)

    @r.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest),
            responses=JSON_OR_EVENT_STREAM)
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, state, chat=True)

    @r.post("/v1/completions", openapi_extra=request_body(CompletionRequest),
            responses=JSON_OR_EVENT_STREAM)
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


def _tool_setup(state: AppState) -> tools.ToolSetup:
    if state.tools is None:  # engine-free tests build the state by hand
        state.tools = tools.ToolSetup(state.tokenizer, state.config.chat_template,
                                      state.config.tool_call_parser)
    return state.tools


def _chat_prompt(state: AppState, req: ChatCompletionRequest) -> list[int]:
    setup = _tool_setup(state)
    try:
        text = setup.render(req)
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001  (template rejected the conversation)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", "messages") from None
    return list(state.tokenizer.encode(text, add_special_tokens=False))


def _readers(state: AppState, req: gen.GenerationRequest) -> Callable[[], tools.ToolCallReader | None]:
    """A factory of one tool-call reader per choice (None: plain content)."""
    if not isinstance(req, ChatCompletionRequest):
        return lambda: None
    return _tool_setup(state).readers(req)


def _echo_text(state: AppState, req: gen.GenerationRequest, prompt_ids: list[int]) -> str | None:
    """The prompt as ``echo`` returns it (None without echo)."""
    if not isinstance(req, CompletionRequest) or not req.echo:
        return None
    prompt = req.single_prompt()
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt_ids)


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
    ab = state.experiments.route(req, request.headers,  # presets, experiments → model, steering
                                 admin=principal_of(request).admin)
    model = ab.model or _check_model(state, req.model)
    state.require_engine()
    if chat:
        assert isinstance(req, ChatCompletionRequest)
        prompt_ids, prompt_param, prefix = _chat_prompt(state, req), "messages", "chatcmpl"
    else:
        assert isinstance(req, CompletionRequest)
        prompt_ids, prompt_param, prefix = _text_prompt(state, req), "prompt", "cmpl"
    admit_generation(request, state, req, ab, len(prompt_ids))  # key policy, max_slots, tokens/min
    compiled: CompiledSteering | None = None
    if req.steering is not None:
        if state.compiler is None:
            raise InvalidRequest("steering is disabled on this server (started with --no-steering)",
                                 "steering", "steering_disabled")
        compiled = state.compiler.compile(req.steering)
    assert state.max_model_len is not None
    gen.check_context(len(prompt_ids), state.max_model_len, req, prompt_param,
                      state.config.max_response_budget)
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    readers = _readers(state, req)
    params = gen.sampling_params(
        req, compiled, request_id, vocab_size=len(state.tokenizer), engine=state.engine,
        tool_schema=tools.constraint_schema(req) if isinstance(req, ChatCompletionRequest) else None)
    job = gen.Job(request_id=request_id, prompt_ids=prompt_ids, params=params, compiled=compiled,
                  echo=_echo_text(state, req, prompt_ids), live_monitors=req.stream)
    # The slot (and readout bytes) are taken before any response starts: a 429 is a real status.
    admitted = await _admit(request, state, compiled, job)
    if not admitted:
        return Response(status_code=499)  # the client left while waiting for a steering slot
    streaming = False
    try:
        headers = {"x-steering-hash": compiled.hash} if compiled is not None else {}
        headers.update(ab.headers())
        if req.stream:
            def completed(outcome: str) -> None:  # ok once the whole stream went out; failed; aborted
                state.experiments.finish(ab, job, len(prompt_ids), outcome=outcome)

            response = _HeldStream(
                job.held,
                _stream(state, req, job, compiled, model, chat, ab.body_field(), on_complete=completed,
                        readers=readers),
                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
            streaming = True  # from here the stream frees what the request holds
            return response
        try:
            choices = await until_client_gone(request, asyncio.ensure_future(_collect(state, job, chat)))
        except Exception:
            state.experiments.finish(ab, job, len(prompt_ids), outcome="failed")
            raise
        if choices is None:
            state.experiments.finish(ab, job, len(prompt_ids), outcome="aborted")
            return Response(status_code=499)  # the client closed the request: nobody to answer
        body = (_chat_body(req, job, compiled, model, choices, readers) if chat
                else _completion_body(req, job, compiled, model, choices))
        activations = await gen.steering_activations(state, job)
        if activations is not None:
            body["steering"]["activations"] = activations
        if compiled is not None and compiled.monitors:
            body["steering"]["monitors"] = job.monitors or compiled.monitor_report(None)
        state.experiments.finish(ab, job, len(prompt_ids), body)
        return JSONResponse(body, headers=headers)
    finally:
        if not streaming and job.held is not None:
            job.held.close()


async def _admit(request: Request, state: AppState, compiled: CompiledSteering | None,
                 job: gen.Job) -> bool:
    """Take the request's steering slot and readout bytes (``job.held``; 400/429 when they cannot
    be had), watching for the client to leave while it waits; False when it left."""
    if state.limits is None:
        return True
    prompt_len = len(job.prompt_ids)
    max_tokens = job.params.max_tokens
    if max_tokens is None:  # up to the end of the context
        max_tokens = max((state.max_model_len or 0) - prompt_len, 0)
    admit = state.limits.admit(compiled, job.request_id, prompt_len + max_tokens,
                               "steering.return_activations")
    if compiled is None:
        job.held = await admit
        return True
    work = asyncio.ensure_future(admit)
    job.held = await until_client_gone(request, work)
    if job.held is None and work.done() and not work.cancelled() and work.exception() is None:
        work.result().close()  # admitted just as the client left
    return job.held is not None


class _HeldStream(DisconnectAwareStream):
    """An SSE response that frees what its request holds (slot, readout) however it ends —
    finished, failed, client gone, or never started."""

    def __init__(self, held: Held | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held = held

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.held is not None:
                self.held.close()


async def _collect(state: AppState, job: gen.Job, chat: bool) -> dict[int, gen.Choice]:
    choices = {i: gen.Choice() for i in range(job.params.n)}
    k = job.params.logprobs
    async for out in gen.run(state, job):
        if out.prompt_logprobs:  # only the first delta carries them
            job.prompt_logprobs = gen.prompt_logprobs(state, out)
            if job.echo is not None and k is not None:
                job.echo_logprobs = gen.echo_logprobs(state, job.prompt_ids, out, k)
        for o in out.outputs:
            c = choices[o.index]
            if k is not None and o.token_ids:
                offset = sum(len(t) for t in c.text) + len(job.echo or "")
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
               compiled: CompiledSteering | None, model: str, choices: dict[int, gen.Choice],
               readers: Callable[[], tools.ToolCallReader | None]) -> dict[str, Any]:
    body = _common(req, job, compiled, model, "chat.completion")
    body["choices"] = []
    for index, c in sorted(choices.items()):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(c.text)}
        finish_reason = c.finish_reason
        reader = readers()
        if reader is not None:
            message["content"], calls = reader.finish(message["content"])
            if calls:
                message["tool_calls"] = calls
            finish_reason = reader.finish_reason(finish_reason)
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": ({"content": [item for part in c.logprobs for item in part]}
                         if job.params.logprobs is not None else None),
            "finish_reason": finish_reason,
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
            parts = ([job.echo_logprobs] if job.echo_logprobs else []) + c.logprobs
            logprobs = {key: [v for part in parts for v in part[key]]
                        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        choice: dict[str, Any] = {"index": index, "text": (job.echo or "") + "".join(c.text),
                                  "logprobs": logprobs,
                                  "finish_reason": c.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = c.token_ids
        body["choices"].append(choice)
    body["usage"] = gen.usage(len(job.prompt_ids), sum(len(c.token_ids) for c in choices.values()))
    return body


async def _stream(state: AppState, req: gen.GenerationRequest, job: gen.Job,
                  compiled: CompiledSteering | None, model: str, chat: bool,
                  experiment: dict[str, str] | None = None,
                  on_complete: Callable[[str], None] | None = None,
                  readers: Callable[[], tools.ToolCallReader | None] = lambda: None,
                  ) -> AsyncIterator[str]:
    """SSE events: one chunk per choice delta, an optional usage chunk, then ``[DONE]``. The first
    chunk carries the request-level fields (``steering``, ``experiment``, prompt ids/logprobs).
    ``on_complete(outcome)`` runs once the stream ends: ``ok`` when the generation finished
    without error (before ``[DONE]``), ``failed`` when an error ended it, ``aborted`` when the
    client went away."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = req.include_usage()
    k = job.params.logprobs
    started: set[int] = set()
    offsets: dict[int, int] = {}
    choice_readers: dict[int, tools.ToolCallReader | None] = {}
    completion_tokens = 0
    first = True
    def bare(**fields: Any) -> str:  # an event that carries no choice delta
        return sse({"id": job.request_id, "object": obj, "created": int(time.time()), "model": model,
                    "choices": [], **fields})

    try:
        async for out in gen.run(state, job):
            if out.prompt_logprobs:  # only the first delta carries them
                job.prompt_logprobs = gen.prompt_logprobs(state, out)
                if job.echo is not None and k is not None:
                    job.echo_logprobs = gen.echo_logprobs(state, job.prompt_ids, out, k)
            while job.monitor_events:  # a monitor fired: said as soon as it is known
                yield bare(steering={"monitor_event": job.monitor_events.pop(0)})
            for o in out.outputs:
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                completion_tokens += len(o.token_ids)
                finish_reason = o.finish_reason
                if chat:
                    if o.index not in choice_readers:
                        choice_readers[o.index] = readers()
                    reader = choice_readers[o.index]
                    delta: dict[str, Any] = {"content": o.text}
                    if reader is not None:
                        delta = reader.feed(o.text, list(o.token_ids))
                        finish_reason = reader.finish_reason(o.finish_reason)
                        if not delta and finish_reason is None and o.index in started:
                            continue  # nothing to say yet (a tool call still being read)
                    if o.index not in started:
                        delta = {"role": "assistant", **delta}
                chunk = _common(req, job, compiled, model, obj) if first else \
                    {"id": job.request_id, "object": obj, "created": int(time.time()), "model": model}
                if first and experiment is not None:
                    chunk["experiment"] = experiment
                first = False
                choice: dict[str, Any] = {"index": o.index}
                if chat:
                    choice["delta"] = delta
                    choice["logprobs"] = ({"content": gen.chat_logprobs(state, o, k)}
                                          if k is not None else None)
                    offsets[o.index] = offsets.get(o.index, 0) + len(o.text)
                else:
                    echo = job.echo if job.echo is not None and o.index not in started else ""
                    offset = offsets.get(o.index, 0) + len(echo)
                    choice["text"] = echo + o.text
                    choice["logprobs"] = None
                    if k is not None:
                        lp = gen.completion_logprobs(state, o, k, offset)
                        if echo and job.echo_logprobs:
                            lp = {key: job.echo_logprobs[key] + lp[key] for key in lp}
                        choice["logprobs"] = lp
                    offsets[o.index] = offset + len(o.text)
                started.add(o.index)
                choice["finish_reason"] = finish_reason
                if req.return_token_ids:
                    choice["token_ids"] = list(o.token_ids)
                chunk["choices"] = [choice]
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
        activations = await gen.steering_activations(state, job)
        if activations is not None:
            yield bare(steering={"activations": activations})
        if compiled is not None and compiled.monitors:
            yield bare(steering={"monitors": job.monitors or compiled.monitor_report(None)})
        if include_usage:
            yield sse({"id": job.request_id, "object": obj, "created": int(time.time()),
                        "model": model, "choices": [],
                        "usage": gen.usage(len(job.prompt_ids), completion_tokens)})
        if on_complete is not None:
            on_complete("ok")
    except Exception as exc:  # noqa: BLE001  (headers are sent: report in-band)
        if on_complete is not None:
            on_complete("failed")
        _, body = describe(exc)
        logger.warning("stream %s failed: %s", job.request_id, body["error"]["message"],
                       exc_info=exc)  # the client gets a generic message for a 500; the log, all
        yield sse(body)
    except BaseException:  # cancelled or closed: the client went away mid-stream
        if on_complete is not None:
            on_complete("aborted")
        raise
    yield sse("[DONE]")
