"""The OpenAI-compatible FastAPI app over vLLM's AsyncLLM, with per-request steering."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import generation as gen
from server.catalog import catalog_router
from server.experiments.manager import ExperimentManager
from server.experiments.routes import experiments_router
from server.engine import ServeConfig, build_engine_args, create_engine, load_packs
from server.errors import (
    AuthError,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    describe,
    install_error_handlers,
)
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, parse_chat, parse_completion
from steering.request import CompiledSteering, SteeringCompiler
from steering.slots import SlotGate
from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

try:
    __version__ = metadata.version("steer-server")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0+src"

KNOWN_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/steering", "/health",
                "/metrics", "/version", "/v1/packs", "/v1/features", "/v1/features/search",
                "/v1/features/inspect", "/v1/presets", "/v1/experiments"}


@dataclass
class AppState:
    """Configuration plus everything created when the engine starts."""

    config: ServeConfig
    metrics: Metrics = field(default_factory=Metrics)
    engine: AsyncLLM | None = None
    tokenizer: Any = None
    model_path: Path | None = None
    max_model_len: int | None = None
    compiler: SteeringCompiler | None = None
    packs: Any = None  # steering.packs.registry.PackRegistry when steering is on
    experiments: Any = None  # server.experiments.manager.ExperimentManager (presets, A/B tests)
    gate: SlotGate | None = None
    startup_error: BaseException | None = None
    on_fatal: Callable[[BaseException], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def served_names(self) -> list[str]:
        return self.config.served_names()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def require_engine(self) -> AsyncLLM:
        if self.engine is None:
            raise EngineUnavailable("the engine is still starting; retry shortly")
        if self.engine.errored:
            raise EngineUnavailable("the engine has stopped; the server must be restarted")
        return self.engine

    async def start(self) -> None:
        """Materialize the model, start the engine, then build tokenizer and steering tables."""
        from transformers import AutoTokenizer

        from steering.model_store import resolve_model

        cfg = self.config
        path = await asyncio.to_thread(resolve_model, cfg.model)
        steering_cfg = cfg.steering_config()
        if steering_cfg is not None:  # before the engine: a bad pack fails in seconds
            self.packs = await asyncio.to_thread(load_packs, cfg, path)
            logger.info("feature packs: %s", [p["name"] for p in self.packs.packs()])
        args = build_engine_args(cfg, path, self.served_names)
        engine = await asyncio.to_thread(create_engine, args)
        try:
            self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(path))
            self.model_path = path
            self.max_model_len = engine.model_config.max_model_len
            if steering_cfg is not None:
                hf = engine.model_config.hf_text_config
                self.compiler = SteeringCompiler(
                    steering_cfg, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                    feature_source=self.packs)
                self.gate = SlotGate(capacity=steering_cfg.max_slots)
            gate = self.gate
            self.metrics.bind(
                waiting=lambda: gate.waiting if gate is not None else 0,
                engine_unfinished=engine.get_num_unfinished_requests)
        except BaseException:
            engine.shutdown()
            raise
        self.engine = engine
        logger.info("engine ready: serving %s from %s (max_model_len=%d)",
                    self.served_names, path, self.max_model_len)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


# -- middleware, auth ---------------------------------------------------------------------------

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
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
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


def _auth_dependency(state: AppState) -> Callable[[Request], None]:
    def require_key(request: Request) -> None:
        key = state.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("Missing API key: send it as 'Authorization: Bearer <key>'", None,
                            "missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise AuthError("Incorrect API key provided", None, "invalid_api_key")
    return require_key


# -- streaming ------------------------------------------------------------------------------------

class DisconnectAwareStream(StreamingResponse):
    """SSE response that stops its body generator as soon as the client disconnects.

    Stopping the generator runs :func:`server.generation.run`'s ``finally``, which aborts the
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


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _until_client_gone(request: Request, work: asyncio.Future[Any]) -> Any:
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


# -- the app ------------------------------------------------------------------------------------

def create_app(state: AppState) -> FastAPI:
    """The FastAPI app; the engine starts in the background and /health is 503 until it is up."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await state.start()
                state.experiments.ready()  # validates the presets file against the packs
            except BaseException as exc:  # noqa: BLE001
                state.startup_error = exc
                logger.exception("engine failed to start")
                if state.on_fatal is not None:
                    state.on_fatal(exc)

        starting = asyncio.create_task(start())
        try:
            yield
        finally:
            await asyncio.gather(starting, return_exceptions=True)
            state.shutdown()
            state.experiments.close()

    app = FastAPI(title="steer", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestIdAndMetrics, metrics=state.metrics)
    app.state.steer = state
    if state.experiments is None:
        state.experiments = ExperimentManager(state)
    auth = [Depends(_auth_dependency(state))]

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.startup_error is not None:
            return JSONResponse({"status": "failed", "error": str(state.startup_error)}, 503)
        if state.engine is None:
            return JSONResponse({"status": "starting"}, 503)
        if state.engine.errored:
            return JSONResponse({"status": "engine_dead"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        import vllm

        return {"version": __version__, "vllm": vllm.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "steer",
             "root": str(state.model_path) if state.model_path else None,
             "max_model_len": state.max_model_len}
            for name in state.served_names] + state.experiments.model_entries(state.created)}

    @app.get("/v1/steering", dependencies=auth)
    async def steering_status() -> dict[str, Any]:
        """Steering capacity and occupancy: the API server's gate and the workers' slot tables."""
        cfg = state.config.steering_config()
        if cfg is None or state.gate is None:
            return {"enabled": False}
        stats = await state.require_engine().collective_rpc("steering_stats")
        comp = state.compiler
        return {"enabled": True, "slots": cfg.max_slots, "max_features": cfg.max_features,
                "hidden_size": comp.hidden_size if comp else None,
                "num_layers": comp.num_layers if comp else None,
                "layers": comp.layers_list if comp else None,
                "max_strength": cfg.max_strength, "resident": state.gate.resident,
                "waiting": state.gate.waiting, "worker": stats[0]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, state, chat=True)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await _handle(request, state, chat=False)

    app.include_router(catalog_router(state, auth))
    app.include_router(experiments_router(state, auth))

    return app


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise InvalidRequest("We could not parse the JSON body of your request.") from None


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
    body = await _json_body(request)
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
        return DisconnectAwareStream(
            state.experiments.recorded_stream(ab, _stream(state, req, job, compiled, model, chat,
                                                          ab.body_field()), job,
                                              len(prompt_ids)), media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"})
    choices = await _until_client_gone(request, asyncio.ensure_future(_collect(state, job, chat)))
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
                  experiment: dict[str, str] | None = None) -> AsyncIterator[str]:
    """SSE events: one chunk per choice delta, an optional usage chunk, then ``[DONE]``. The first
    chunk carries the request-level fields (``steering``, ``experiment``, prompt ids/logprobs)."""
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
                yield _sse(chunk)
        activations = await gen.steering_activations(state, job)
        if activations is not None:
            yield _sse({"id": job.request_id, "object": obj, "created": int(time.time()),
                        "model": model, "choices": [], "steering": {"activations": activations}})
        if include_usage:
            yield _sse({"id": job.request_id, "object": obj, "created": int(time.time()),
                        "model": model, "choices": [],
                        "usage": gen.usage(len(job.prompt_ids), completion_tokens)})
    except Exception as exc:  # noqa: BLE001  (headers are sent: report in-band)
        _, body = describe(exc)
        logger.warning("stream %s failed: %s", job.request_id, body["error"]["message"])
        yield _sse(body)
    yield _sse("[DONE]")
