"""One request pipeline for ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/features/inspect``:

    route → resolve → policy → compile → sampling params → admit → run → respond

- **resolve** (:meth:`ExperimentManager.route`): a preset model or an experiment variant merged
  under the request's own steering into a new spec (:attr:`Routing.steering`); the request
  itself is never changed;
- **policy** (:func:`policy`): the key's policy on the request's own steering (403), its imposed
  monitors added, and its vector bound handed to the compile;
- **compile** (:func:`compile_steering`): once, to the program the workers run;
- **sampling params** (:mod:`server.sampling`), then **admit** (:mod:`server.admission`: the key's
  slot and tokens, the server's slot and readout bytes);
- **run** (:mod:`server.runner`) and **respond** (:mod:`server.responses`: one JSON body or an
  SSE stream; the experiment exposure recorded with its outcome).

The routes (:mod:`server.completions`, :mod:`server.catalog`) only parse and hand over.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server import responses, runner, tools
from server.admission import admit_generation, admit_readout
from server.auth import auth_of, principal_of
from server.errors import InvalidRequest, ModelNotFound
from server.experiments.routing import Routing
from server.http import json_body, until_client_gone
from server.policy import PolicyViolation, check, check_inspect, impose, key_bound, vector_norm_denied
from server.protocol import ChatCompletionRequest, CompletionRequest, parse_chat, parse_completion
from server.runner import Job
from server.sampling import GenerationRequest, check_context, sampling_params
from steering.request import CompiledSteering, KeyBound, KeyBoundExceeded
from steering.spec import SteeringSpec

if TYPE_CHECKING:
    from server.state import AppState


# -- the steps every route shares ------------------------------------------------------------

def policy(request: Request, state: AppState, own: SteeringSpec | None,
           steering: SteeringSpec | None, *, inspect: list[str] | None = None,
           ) -> tuple[SteeringSpec | None, KeyBound | None]:
    """The key's policy: 403 for what the request's ``own`` steering may not ask (``inspect``:
    the features an inspection reads, which needs ``return_activations``), then ``steering``
    with the policy's monitors added (generations only) and its vector bound for the compile."""
    who, auth = principal_of(request), auth_of(request)
    pol = who.policy
    if pol is None or auth is None:
        return steering, None
    try:
        if inspect is not None:
            check_inspect(pol, inspect, own, state.packs)
        else:
            check(pol, own, state.packs)
    except PolicyViolation as exc:
        raise auth.deny(exc) from None
    if inspect is None:
        steering = impose(pol, steering)  # the key's monitors ride on every generation
    return steering, key_bound(pol, own, steering)


def compile_steering(request: Request, state: AppState, steering: SteeringSpec | None,
                     bound: KeyBound | None) -> CompiledSteering | None:
    """The steering compiled, once (400 on any invalid field; 403 when only the key's vector
    bound refuses it)."""
    if steering is None:
        return None
    if state.compiler is None:
        raise InvalidRequest("steering is disabled on this server (started with --no-steering)",
                             "steering", "steering_disabled")
    try:
        return state.compiler.compile(steering, key_bound=bound)
    except KeyBoundExceeded as exc:
        auth = auth_of(request)
        denied = vector_norm_denied(exc)
        raise (auth.deny(denied) if auth is not None else denied) from None


def check_model(state: AppState, model: str | None) -> str:
    names = state.served_names
    if model is None:
        return names[0]
    if model not in names:
        raise ModelNotFound(f"The model '{model}' does not exist; this server serves {names}", "model")
    return model


# -- chat and text completions ----------------------------------------------------------------

def _tool_setup(state: AppState) -> tools.ToolSetup:
    if state.tools is None:  # engine-free tests build the state by hand
        state.tools = tools.ToolSetup(state.tokenizer, state.config.chat_template,
                                      state.config.tool_call_parser)
    return state.tools


def _chat_prompt(state: AppState, req: ChatCompletionRequest) -> list[int]:
    setup = _tool_setup(state)

    def render(messages: list[dict[str, Any]]) -> str:
        try:
            return setup.render(req, messages)
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001  (template rejected the conversation)
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", "messages") from None

    return state.token_guard().chat_ids(req.chat_messages(), render)


def _text_prompt(state: AppState, req: CompletionRequest) -> list[int]:
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return state.token_guard().prompt_ids(prompt)
    vocab = len(state.tokenizer)
    if any(not 0 <= t < vocab for t in prompt):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
    return list(prompt)


def _echo_text(state: AppState, req: GenerationRequest, prompt_ids: list[int]) -> str | None:
    """The prompt as ``echo`` returns it (None without echo)."""
    if not isinstance(req, CompletionRequest) or not req.echo:
        return None
    prompt = req.single_prompt()
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt_ids)


async def generate(request: Request, state: AppState, chat: bool) -> Response:
    """A chat or text completion, through every step of the pipeline."""
    body = await json_body(request)
    req: GenerationRequest = parse_chat(body) if chat else parse_completion(body)
    routing = state.experiments.route(req, request.headers,  # presets, experiments → steering
                                      admin=principal_of(request).admin)
    model = routing.model or check_model(state, req.model)
    state.require_engine()
    if isinstance(req, ChatCompletionRequest):
        prompt_ids, prompt_param, prefix = _chat_prompt(state, req), "messages", "chatcmpl"
    else:
        prompt_ids, prompt_param, prefix = _text_prompt(state, req), "prompt", "cmpl"
    steering, bound = policy(request, state, routing.own, routing.steering)
    compiled = compile_steering(request, state, steering, bound)
    assert state.max_model_len is not None
    check_context(len(prompt_ids), state.max_model_len, req, prompt_param,
                  state.config.max_response_budget)
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    chat_req = req if isinstance(req, ChatCompletionRequest) else None
    readers = _tool_setup(state).readers(chat_req) if chat_req is not None else (lambda: None)
    tool_schema = tools.constraint_schema(chat_req) if chat_req is not None else None
    params = sampling_params(req, compiled, request_id, vocab_size=len(state.tokenizer),
                             engine=state.engine, tool_schema=tool_schema)
    job = Job(request_id=request_id, prompt_ids=prompt_ids, params=params, compiled=compiled,
              echo=_echo_text(state, req, prompt_ids), live_monitors=req.stream)
    if not await admit_generation(request, state, req, steering, job):
        return Response(status_code=499)  # the client left while waiting for a steering slot
    return await _respond(request, state, req, routing, job, model, chat, readers)


async def _respond(request: Request, state: AppState, req: GenerationRequest, routing: Routing,
                   job: Job, model: str, chat: bool, readers: Any) -> Response:
    """Run and answer: an SSE stream (which frees what the request holds however it ends) or one
    JSON body; the experiment exposure is recorded with the outcome either way."""
    compiled, prompt_tokens = job.compiled, len(job.prompt_ids)
    streaming = False
    try:
        headers = {"x-steering-hash": compiled.hash} if compiled is not None else {}
        headers.update(routing.headers())
        if req.stream:
            def completed(outcome: str) -> None:  # ok once the whole stream went out; failed; aborted
                state.experiments.finish(routing, job, prompt_tokens, outcome=outcome)

            response = responses.HeldStream(
                job.held,
                responses.stream(state, req, job, compiled, model, chat, routing.body_field(),
                                 on_complete=completed, readers=readers),
                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
            streaming = True  # from here the stream frees what the request holds
            return response
        try:
            choices = await until_client_gone(
                request, asyncio.ensure_future(responses.collect(state, job, chat)))
        except Exception:
            state.experiments.finish(routing, job, prompt_tokens, outcome="failed")
            raise
        if choices is None:
            state.experiments.finish(routing, job, prompt_tokens, outcome="aborted")
            return Response(status_code=499)  # the client closed the request: nobody to answer
        body = (responses.chat_body(req, job, compiled, model, choices, readers) if chat
                else responses.completion_body(req, job, compiled, model, choices))
        activations = await runner.steering_activations(state, job)
        if activations is not None:
            body["steering"]["activations"] = activations
        if compiled is not None and compiled.monitors:
            body["steering"]["monitors"] = job.monitors or compiled.monitor_report(None)
        state.experiments.finish(routing, job, prompt_tokens, body)
        return JSONResponse(body, headers=headers)
    finally:
        if not streaming and job.held is not None:
            job.held.close()


# -- inspection -----------------------------------------------------------------------------

async def read_back(state: AppState, job: Job, param: str) -> None:
    """Admit, run and read back an inspection's prefill (``job.captured``), freeing its slot
    and readout however it ends."""
    await admit_readout(state, job, param)
    try:
        async for _ in runner.run(state, job):
            pass
        await runner.steering_activations(state, job)
    finally:
        if job.held is not None:
            job.held.close()
