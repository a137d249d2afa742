"""The OpenAI-compatible FastAPI app over vLLM's AsyncLLM, with per-request steering.

This module wires the app: lifecycle (the engine starts in the background), middleware, auth, the
small status routes, and the routers of :mod:`server.completions` (generation),
:mod:`server.catalog` (packs, features, inspect), :mod:`server.workshop.routes` (custom features)
and :mod:`server.experiments.routes` (presets, experiments).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.catalog import catalog_router
from server.completions import completions_router
from server.errors import install_error_handlers
from server.experiments.manager import ExperimentManager
from server.experiments.routes import experiments_router
from server.auth import AtResponseEnd, Auth
from server.http import RequestIdAndMetrics
from server.openapi import ERROR_RESPONSES, HEALTH_RESPONSES
from server.limits import BodySizeLimit
from server.state import AppState
from server.ui import mount_ui
from server.workshop.jobs import Workshop
from server.workshop.routes import workshop_router

logger = logging.getLogger(__name__)

try:
    __version__ = metadata.version("steer-server")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0+src"

__all__ = ["AppState", "create_app"]


def create_app(state: AppState) -> FastAPI:
    """The FastAPI app; the engine starts in the background and /health is 503 until it is up."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                await state.start()
                state.experiments.ready()  # validates the presets file against the packs
                keys.check_monitors(state.compiler)  # and the auth policies' monitors
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
            workshop.close()
            state.shutdown()
            state.experiments.close()

    app = FastAPI(title="steer", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=state.config.max_request_bytes)  # inside the next
    app.add_middleware(RequestIdAndMetrics, metrics=state.metrics)
    app.state.steer = state
    if state.experiments is None:
        state.experiments = ExperimentManager(state)
    keys = Auth.from_config(state.config, state.metrics)  # a bad --auth file fails here
    app.state.auth = keys
    app.add_middleware(AtResponseEnd)  # releases a key's max_slots hold when a response ends
    auth, admin = keys.user, keys.admin

    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health() -> JSONResponse:
        if state.startup_error is not None:
            # The kind only: the message (paths, URLs) is in the server's log, not for any caller.
            return JSONResponse({"status": "failed", "error": type(state.startup_error).__name__}, 503)
        if state.engine is None:
            return JSONResponse({"status": "starting"}, 503)
        if state.engine.errored:
            return JSONResponse({"status": "engine_dead"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        import vllm

        return {"version": __version__, "vllm": vllm.__version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "steer",
             "root": str(state.model_path) if state.model_path else None,
             "max_model_len": state.max_model_len}
            for name in state.served_names] + state.experiments.model_entries(state.created)}

    @app.get("/v1/steering", dependencies=admin)
    async def steering_status() -> dict[str, Any]:
        """Steering capacity and occupancy: the API server's gate and the workers' slot tables."""
        cfg = state.config.steering_config()
        if cfg is None or state.gate is None:
            return {"enabled": False}
        stats = await state.require_engine().collective_rpc("steering_stats")
        comp = state.compiler
        return {"enabled": True, "slots": state.gate.capacity, "max_features": cfg.max_features,
                "bank_features": cfg.bank_features,
                "hidden_size": comp.hidden_size if comp else None,
                "num_layers": comp.num_layers if comp else None,
                "layers": comp.layers_list if comp else None,
                "max_strength": cfg.max_strength, "resident": state.gate.resident,
                "waiting": state.gate.waiting, "worker": stats[0]}

    app.include_router(completions_router(state, auth))
    workshop = Workshop(state)
    app.state.workshop = workshop
    app.include_router(workshop_router(state, workshop, auth))  # before the catalog's {name:path}
    app.include_router(catalog_router(state, auth))
    app.include_router(experiments_router(state, auth, admin))
    mount_ui(app)  # the browser playground at /ui/ (static, no key: its API calls carry one)

    return app
