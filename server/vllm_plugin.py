"""Steering through stock vLLM's OpenAI server: an ASGI middleware for ``--middleware``.

The operator runs vLLM's own server with our worker class and this middleware::

    python -m vllm.entrypoints.openai.api_server --model MODEL --dtype float32 \\
        --worker-cls steering.vllm_shim.SteeringCPUWorker \\
        --additional-config '{"steering": {"packs": ["bundled"], "max_slots": 16}}' \\
        --middleware server.vllm_plugin.SteeringMiddleware

and clients send ``extra_body={"vllm_xargs": {"steering": json.dumps(steering_object)}}`` — the
same object as ``steer serve``'s ``steering`` field, as a JSON string (vLLM's ``vllm_xargs`` only
carries strings and numbers). vLLM passes ``vllm_xargs`` to the workers as
``SamplingParams.extra_args``; the worker shim compiles the string with the configured packs
(:class:`steering.worker.vllm_shim.SpecCompiler`) into the same program ``steer serve`` would send.

What this middleware adds on ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/responses`` when ``vllm_xargs.steering`` is present (everything else passes untouched):

* **Validation** before the engine sees the request: the string is parsed and compiled by the
  same :class:`steering.request.SteeringCompiler` as ``steer serve`` (the additional config's
  steering section, the model's hidden size and layers, the same packs, and — measured once, on
  the first steered request — the layers' median residual norms that bound raw vectors). Any
  problem is a 400 in vLLM's error shape, ``{"error": {"message", "type": "BadRequestError",
  "param": "vllm_xargs.steering.<path>", "code": 400}}``; nothing reaches the engine.
  ``experiment`` (and presets) and ``return_activations`` are ``steer serve`` features: 400.
* **Prefix-cache isolation**: the body's ``cache_salt`` becomes the configuration's salt
  (``steer-<hash>``; with a client salt, a hash of both), so KV blocks are never shared between
  different steering, or between steered and unsteered requests.
* **Slots**: a steered request holds a :class:`steering.worker.slots.SlotGate` lease for its
  configuration from before it is forwarded until its response has been sent (or its client
  left). With ``max_slots`` distinct configurations in flight, a request for another one waits,
  first come first served, at most ``queue_timeout`` seconds and with at most ``max_waiters``
  waiting; beyond either it gets a 429 with ``Retry-After`` before anything was generated.
* **Seating audit** (chat and completions): should a worker still not seat the request (it then
  runs unsteered), a non-streamed response becomes a 503 and a stream gets an error event before
  ``data: [DONE]``, as with ``steer serve``.
* Steering on any other POST route (``/v1/messages``, ``/inference/v1/generate``,
  ``/invocations``, ...) is a 400: it would bypass the checks above.

Options: ``--additional-config '{"steering": {...}, "steering_api": {...}}'`` with the keys of
:class:`PluginOptions`. The worker side (``steering`` section) is :class:`SteeringConfig` plus its
``packs``. Requests the vLLM API key guard would refuse pass through untouched (vLLM answers 401).
The plugin is an adapter of ``steer serve``'s steering setup
(:class:`server.steering_setup.SteeringSetup`: limits and their defaults, compiler, slot gate,
norm measurement), built from those two sections.

Over 400 lines because it is one ASGI adapter: reading and replaying bodies, vLLM's API-key
guard, the steered and other routes, the slot lease and the seating audit all act on the same
request flow; the steering itself (compiling, packs, norms, limits) is the shared setup's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from typing import Any

from server.steering_setup import SteeringSetup
from steering.config import SteeringConfig
from steering.request import CompiledSteering
from steering.worker.slots import SlotsBusy
from steering.spec import SteeringError
from steering.wire import EXTRA_ARGS_KEY

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STEERING_SECTION = "steering"
"""``additional_config`` section read by the workers and here (SteeringConfig fields + packs)."""
OPTIONS_SECTION = "steering_api"
"""``additional_config`` section read only here (:class:`PluginOptions`)."""
XARGS = "vllm_xargs"
PARAM_PREFIX = f"{XARGS}.{EXTRA_ARGS_KEY}"
STEERED_ROUTES = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl",
                  "/v1/responses": None}
"""Routes that take ``vllm_xargs.steering``, with vLLM's request-id prefix (for the audit)."""


@dataclass
class PluginOptions:
    """API-server options of the plugin (``additional_config["steering_api"]``; null is None).
    Each is a :class:`SteeringSetup` field, with its default and meaning."""

    queue_timeout: float | None = SteeringSetup.queue_timeout
    """:attr:`SteeringSetup.queue_timeout` (``steer serve --steering-queue-timeout``)."""
    max_waiters: int | None = SteeringSetup.max_waiters
    """:attr:`SteeringSetup.max_waiters` (``steer serve --max-steering-waiters``)."""
    max_vector_norm: float = SteeringSetup.max_vector_norm
    """:attr:`SteeringSetup.max_vector_norm` (``steer serve --max-steering-vector-norm``)."""
    measure_norms: bool = SteeringSetup.measure_norms
    """:attr:`SteeringSetup.measure_norms`, here on the first steered request with vectors."""
    max_body_bytes: int = SteeringSetup.max_request_bytes
    """:attr:`SteeringSetup.max_request_bytes`: the largest body on any POST route (each is
    searched for steering)."""
    audit: bool = True
    """Ask the workers after each steered chat/completion whether they seated it."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PluginOptions:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"additional_config.{OPTIONS_SECTION}: unknown keys {unknown} "
                             f"(known: {sorted(known)})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def setup(self, cfg: SteeringConfig) -> SteeringSetup:
        """The steering setup of a server whose workers run ``cfg`` (their packs included)."""
        return SteeringSetup(config=cfg, max_vector_norm=self.max_vector_norm,
                             queue_timeout=self.queue_timeout, max_waiters=self.max_waiters,
                             max_request_bytes=self.max_body_bytes,
                             measure_norms=self.measure_norms)


class PluginError(Exception):
    """An error answered by the middleware itself (vLLM's error shape)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    @classmethod
    def from_steering(cls, exc: SteeringError) -> PluginError:
        return cls(400, exc.message, f"{XARGS}.{exc.param}")


_ERROR_TYPES = {400: "BadRequestError", 413: "RequestEntityTooLargeError",
                429: "RateLimitError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


def error_payload(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body (``ErrorResponse``): ``code`` is the HTTP status."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, HTTPStatus(status).phrase),
                      "param": param, "code": status}}


async def send_error(send: Send, err: PluginError) -> None:
    body = json.dumps(error_payload(err.status, err.message, err.param)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def combined_salt(compiled: CompiledSteering, client_salt: Any) -> str:
    """The prefix-cache salt of a steered request: the configuration's own, or with a client
    salt a hash of both (still unique per configuration, and per client salt)."""
    if not isinstance(client_salt, str) or not client_salt:
        return compiled.cache_salt
    h = hashlib.sha256(f"{compiled.cache_salt}|{client_salt}".encode()).hexdigest()[:40]
    return f"steer-{h}"


def find_steering(obj: Any, depth: int = 0) -> bool:
    """Whether a JSON body carries steering anywhere a vLLM route passes to the workers: a
    ``vllm_xargs`` or ``extra_args`` object with a ``steering`` key, at any depth."""
    if depth > 64:
        return True  # refuse what we cannot look through
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in (XARGS, "extra_args") and isinstance(value, dict) and EXTRA_ARGS_KEY in value:
                return True
            if isinstance(value, (dict, list)) and find_steering(value, depth + 1):
                return True
    elif isinstance(obj, list):
        return any(find_steering(v, depth + 1) for v in obj if isinstance(v, (dict, list)))
    return False


# -- per-server state ------------------------------------------------------------------------
class SteeringPlugin:
    """The steering setup, compiler, gate and options of one vLLM server (built on first use)."""

    def __init__(self, cfg: SteeringConfig, compiler: Any, options: PluginOptions | None = None,
                 engine_client: Any = None, model_config: Any = None) -> None:
        self.cfg = cfg
        self.options = options or PluginOptions()
        self.setup = self.options.setup(cfg)
        self.compiler = compiler
        self.compiler.max_vector_norm = self.setup.max_vector_norm
        self.engine_client = engine_client
        self.model_config = model_config
        self.gate = self.setup.slot_gate()
        self._norms_tried = not self.setup.measure_norms
        self._norms_lock = asyncio.Lock()

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, engine_client: Any = None) -> SteeringPlugin:
        """From the server's VllmConfig; RuntimeError when the server was started without our
        worker's ``additional_config`` steering section. The compiler loads the workers' packs
        exactly as the workers do (:meth:`SteeringSetup.build_compiler`)."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        if STEERING_SECTION not in extra:
            raise RuntimeError(
                "the steering middleware needs --worker-cls steering.vllm_shim.Steering*Worker and "
                f"--additional-config '{{\"{STEERING_SECTION}\": {{...}}}}'")
        cfg = SteeringConfig.from_dict(extra[STEERING_SECTION]).for_batch(
            vllm_config.scheduler_config.max_num_seqs)  # the workers resolve it the same way
        options = PluginOptions.from_dict(extra.get(OPTIONS_SECTION))
        mc = vllm_config.model_config
        hf = mc.hf_text_config
        model_dir = str(mc.model)
        compiler = options.setup(cfg).build_compiler(
            hf.hidden_size, hf.num_hidden_layers,
            model_dir=model_dir if os.path.isdir(model_dir) else None)
        return cls(cfg, compiler, options, engine_client, mc)

    async def compile(self, text: Any) -> CompiledSteering | None:
        """Parse and compile ``vllm_xargs.steering``; SteeringError when it is invalid."""
        from steering.worker.vllm_shim import parse_spec_string

        spec = parse_spec_string(text)
        if spec.get("vectors"):
            await self._measure_norms()
        return self.compiler.compile(spec)

    async def _measure_norms(self) -> None:
        """The raw-vector bound of ``steer serve`` (:meth:`SteeringSetup.apply_layer_norms`),
        measured once through the engine client, with the served tokenizer."""
        if self._norms_tried:
            return
        async with self._norms_lock:
            if self._norms_tried:
                return
            self._norms_tried = True
            mc = self.model_config
            await self.setup.apply_layer_norms(
                self.compiler, self.engine_client if mc is not None else None,
                str(mc.tokenizer) if mc is not None else None)

    async def unseated(self, key: str) -> bool:
        """Whether a worker ran the request whose engine id contains ``key`` unsteered."""
        if self.engine_client is None or not self.options.audit:
            return False
        try:
            per_rank = await self.engine_client.collective_rpc("steering_take_unseated",
                                                               args=([key],))
        except Exception:  # noqa: BLE001  (the response stands; the worker logged the refusal)
            logger.exception("steering: asking the workers about %s failed", key)
            return False
        return any(key in (r or ()) for r in per_rank)


# -- body helpers ----------------------------------------------------------------------------
async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; PluginError 413 beyond ``limit``; None when the client left."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PluginError(413, f"the request body is larger than {limit} bytes (the "
                              f"steering plugin's max_body_bytes)")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then the client's own messages (disconnects)."""
    sent = False

    async def recv() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return recv


def with_body_headers(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", [])
               if k.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


# -- the middleware --------------------------------------------------------------------------
class SteeringMiddleware:
    """Pure ASGI middleware for ``vllm serve --middleware server.vllm_plugin.SteeringMiddleware``
    (see the module docstring). ``plugin`` is for tests; by default it is built from the app's
    ``state.vllm_config`` on the first request that needs it."""

    def __init__(self, app: Any, plugin: SteeringPlugin | None = None) -> None:
        self.app = app
        self.plugin = plugin
        self._plugin_lock = asyncio.Lock()
        self._auth: Any = False  # vLLM's AuthenticationMiddleware check; None = no API keys
        self._options: PluginOptions | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not self._authorized(scope):
            return await self.app(scope, receive, send)  # vLLM answers 401
        try:
            if path in STEERED_ROUTES:
                return await self._steered_route(scope, receive, send, STEERED_ROUTES[path])
            return await self._other_route(scope, receive, send)
        except PluginError as err:
            return await send_error(send, err)

    # -- auth ----------------------------------------------------------------------------
    def _authorized(self, scope: Scope) -> bool:
        """False only when vLLM's API-key guard would refuse the request (we then leave it to
        vLLM's 401 and do no work: no body read, no slot)."""
        if self._auth is False:
            self._auth = None
            app = scope.get("app")
            args = getattr(getattr(app, "state", None), "args", None)
            from vllm import envs

            tokens = [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]
            if tokens:
                from vllm.entrypoints.serve.middleware.authenticate import (
                    GUARDED_PREFIX,
                    AuthenticationMiddleware,
                )

                self._auth = (AuthenticationMiddleware(None, tokens), GUARDED_PREFIX)
        if self._auth is None:
            return True
        guard, prefixes = self._auth
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not path.startswith(prefixes):
            return True
        from starlette.datastructures import Headers

        return guard.verify_token(Headers(scope=scope))

    # -- state ---------------------------------------------------------------------------
    async def _get_plugin(self, scope: Scope) -> SteeringPlugin:
        if self.plugin is not None:
            return self.plugin
        async with self._plugin_lock:
            if self.plugin is None:
                state = scope["app"].state
                vllm_config = getattr(state, "vllm_config", None)
                if vllm_config is None:
                    raise PluginError(503, "the server is still starting; retry shortly")
                try:
                    self.plugin = await asyncio.to_thread(
                        SteeringPlugin.from_vllm_config, vllm_config,
                        getattr(state, "engine_client", None))
                except Exception as exc:  # noqa: BLE001
                    logger.exception("steering: the middleware cannot start")
                    raise PluginError(500, f"steering is not available on this server: {exc}",
                                      PARAM_PREFIX) from None
        return self.plugin

    # -- routes --------------------------------------------------------------------------
    async def _body(self, scope: Scope, receive: Receive, limit: int) -> bytes | None:
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise PluginError(413, f"the request body is larger than {limit} bytes (the "
                              "steering plugin's max_body_bytes)")
        return await read_body(receive, limit)

    def _limit(self, scope: Scope) -> int:
        """``max_body_bytes`` from the server's additional config (read once, no packs)."""
        if self.plugin is not None:
            return self.plugin.options.max_body_bytes
        if self._options is None:
            vllm_config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            extra = getattr(vllm_config, "additional_config", None) or {}
            try:
                self._options = PluginOptions.from_dict(extra.get(OPTIONS_SECTION))
            except (TypeError, ValueError) as exc:
                raise PluginError(500, f"steering is not available on this server: {exc}",
                                  PARAM_PREFIX) from None
        return self._options.max_body_bytes

    async def _other_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any other POST: steering there would bypass validation, salt and slots → 400."""
        ctype = (_header(scope, b"content-type") or "").lower()
        if ctype and "json" not in ctype:  # (FastAPI parses a body without a type as JSON)
            if "multipart" in ctype or "form" in ctype:
                body = await self._body(scope, receive, self._limit(scope))
                if body is None:
                    return
                if b"steering" in body:
                    raise PluginError(400, "steering is accepted on /v1/chat/completions, "
                                      "/v1/completions and /v1/responses only", PARAM_PREFIX)
                return await self.app(scope, replay(body, receive), send)
            return await self.app(scope, receive, send)
        body = await self._body(scope, receive, self._limit(scope))
        if body is None:
            return
        if b"steering" in body:
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError):
                obj = None
            if find_steering(obj):
                raise PluginError(400, "steering is accepted on /v1/chat/completions, "
                                  "/v1/completions and /v1/responses only", PARAM_PREFIX)
        return await self.app(scope, replay(body, receive), send)

    async def _steered_route(self, scope: Scope, receive: Receive, send: Send,
                             id_prefix: str | None) -> None:
        body = await self._body(scope, receive, self._limit(scope))
        if body is None:
            return
        untouched = replay(body, receive)
        if b"steering" not in body:
            return await self.app(scope, untouched, send)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return await self.app(scope, untouched, send)  # vLLM answers its own 400
        xargs = obj.get(XARGS) if isinstance(obj, dict) else None
        if not isinstance(xargs, dict) or EXTRA_ARGS_KEY not in xargs:
            if find_steering(obj):
                raise PluginError(400, "steering goes in vllm_xargs.steering", PARAM_PREFIX)
            return await self.app(scope, untouched, send)
        plugin = await self._get_plugin(scope)
        if obj.get("background"):
            raise PluginError(400, "steering is not available for background responses",
                              "background")
        try:
            compiled = await plugin.compile(xargs[EXTRA_ARGS_KEY])
        except SteeringError as exc:
            raise PluginError.from_steering(exc) from None
        if compiled is None:  # asks for nothing: the workers run it unsteered too
            return await self.app(scope, untouched, send)

        obj["cache_salt"] = combined_salt(compiled, obj.get("cache_salt"))
        key = None
        if id_prefix is not None:
            rid = _header(scope, b"x-request-id")
            if rid is None:
                rid = obj.get("request_id")
                if not isinstance(rid, str) or not rid:
                    rid = obj["request_id"] = f"steer-{uuid.uuid4().hex}"
            key = f"{id_prefix}-{rid}"
        new_body = json.dumps(obj).encode()
        new_scope = with_body_headers(scope, len(new_body))

        lease = None
        if compiled.program.layers:
            try:
                lease = await _acquire_unless_gone(plugin.gate.acquire(compiled.table_hash), receive)
            except SlotsBusy as busy:
                raise PluginError(429, f"{busy.message}; retry later", None,
                                  {"Retry-After": str(busy.retry_after)}) from None
            if lease is None:
                return  # the client left while it waited for a slot: nothing to answer
        try:
            out = send if key is None or lease is None else _Audit(plugin, key, send).send
            await self.app(new_scope, replay(new_body, receive), out)
        finally:
            if lease is not None:
                lease.release()


async def _acquire_unless_gone(acquire: Awaitable[Any], receive: Receive) -> Any:
    """The slot lease ``acquire`` gives, or None when the client disconnects first (the wait is
    cancelled, so it leaves no waiter behind). The body has been read: the only message
    ``receive`` still gives is the disconnect."""
    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    waiting = asyncio.ensure_future(acquire)
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({waiting, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(waiting, watch, return_exceptions=True)
    if waiting.cancelled():
        return None
    lease = waiting.result()  # SlotsBusy goes to the caller
    if watch.done() and not watch.cancelled():  # both at once: the client is gone all the same
        lease.release()
        return None
    return lease


class _Audit:
    """Wraps ``send`` of a steered chat/completion: before the response completes, ask the
    workers whether they seated the request; if not, a JSON response becomes a 503 and a stream
    gets an error event before ``data: [DONE]`` (unsteered text is never passed off as steered)."""

    MESSAGE = ("this request's steering could not be applied (no steering slot was free in the "
               "worker); retry")

    def __init__(self, plugin: SteeringPlugin, key: str, send: Send) -> None:
        self.plugin = plugin
        self.key = key
        self.inner = send
        self.start: Message | None = None
        self.mode = "pass"  # pass | buffer | stream
        self.chunks: list[bytes] = []

    async def send(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in msg.get("headers", []))
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            if msg.get("status") != 200:
                self.mode = "pass"
            elif ctype.startswith("application/json"):
                self.mode, self.start = "buffer", msg
                return
            elif ctype.startswith("text/event-stream"):
                self.mode = "stream"
            return await self.inner(msg)
        if msg["type"] != "http.response.body":
            return await self.inner(msg)
        if self.mode == "buffer":
            self.chunks.append(msg.get("body", b""))
            if msg.get("more_body", False):
                return
            if await self.plugin.unseated(self.key):
                return await send_error(self.inner, PluginError(503, self.MESSAGE, PARAM_PREFIX))
            assert self.start is not None
            await self.inner(self.start)
            return await self.inner({"type": "http.response.body", "body": b"".join(self.chunks),
                                     "more_body": False})
        if self.mode == "stream":
            body = msg.get("body", b"")
            if b"data: [DONE]" in body and await self.plugin.unseated(self.key):
                event = json.dumps(error_payload(503, self.MESSAGE, PARAM_PREFIX))
                before, done, after = body.partition(b"data: [DONE]")
                msg = {**msg, "body": before + f"data: {event}\n\n".encode() + done + after}
        return await self.inner(msg)
