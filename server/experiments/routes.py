"""Admin API of presets and experiments.

    GET    /v1/presets                           presets (file and API), with their model names
    POST   /v1/presets                           {"name", "steering", "description"?}
    GET    /v1/presets/{name}
    DELETE /v1/presets/{name}                    presets created through the API
    GET    /v1/experiments                       experiments
    POST   /v1/experiments                       {"name", "unit"?, "variants": [...], "status"?}
    GET    /v1/experiments/{name}
    PATCH  /v1/experiments/{name}                {"status": "running" | "paused" | "stopped"}
    DELETE /v1/experiments/{name}                the experiment and its recorded data
    POST   /v1/experiments/{name}/feedback       {"response_id", "score"? , "label"?: good|bad}
    GET    /v1/experiments/{name}/results

Bodies are read with :func:`server.http.json_body` and validated by the models of
:mod:`.models` (their JSON schema documents each body in the OpenAPI spec); a ValidationError
becomes a 400 naming the field. A route that names an experiment answers 404 for an unknown one
before it looks at the body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from server.experiments.models import (
    Experiment,
    ExperimentPatch,
    Feedback,
    NewExperiment,
    NewPreset,
    Preset,
)
from server.http import json_body
from server.openapi import request_body

if TYPE_CHECKING:
    from server.state import AppState


def experiments_router(state: AppState, dependencies: list, admin: list | None = None) -> APIRouter:
    """``dependencies`` guard every route (any key); ``admin`` also guards the routes that change
    presets or experiments and read results (server/auth.py: a ``user`` key reads and sends
    feedback)."""
    r = APIRouter(dependencies=dependencies)
    admin = admin or []

    def mgr():
        return state.experiments

    def preset_view(p: Preset) -> dict[str, Any]:
        return {"object": "preset", **p.model_dump(mode="json"),
                "models": [f"{base}:{p.name}" for base in state.served_names]}

    def experiment_view(e: Experiment) -> dict[str, Any]:
        return {"object": "experiment", **e.model_dump(mode="json"),
                "models": [f"{base}:exp/{e.name}" for base in state.served_names]}

    @r.get("/v1/presets")
    async def list_presets() -> dict[str, Any]:
        return {"object": "list", "data": [preset_view(p) for _, p in sorted(mgr().presets.items())]}

    @r.post("/v1/presets", dependencies=admin, openapi_extra=request_body(NewPreset))
    async def create_preset(request: Request) -> dict[str, Any]:
        new = NewPreset.model_validate(await json_body(request))
        return preset_view(await mgr().create_preset(new))

    @r.get("/v1/presets/{name}")
    async def get_preset(name: str) -> dict[str, Any]:
        return preset_view(mgr().get_preset(name))

    @r.delete("/v1/presets/{name}", dependencies=admin)
    async def delete_preset(name: str) -> dict[str, Any]:
        await mgr().delete_preset(name)
        return {"id": name, "object": "preset", "deleted": True}

    @r.get("/v1/experiments")
    async def list_experiments() -> dict[str, Any]:
        return {"object": "list", "data": [experiment_view(e) for e in mgr().experiments.values()]}

    @r.post("/v1/experiments", dependencies=admin, openapi_extra=request_body(NewExperiment))
    async def create_experiment(request: Request) -> dict[str, Any]:
        new = NewExperiment.model_validate(await json_body(request))
        return experiment_view(await mgr().create_experiment(new))

    @r.get("/v1/experiments/{name}")
    async def get_experiment(name: str) -> dict[str, Any]:
        return experiment_view(mgr().get_experiment(name))

    @r.patch("/v1/experiments/{name}", dependencies=admin, openapi_extra=request_body(ExperimentPatch))
    async def patch_experiment(name: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        mgr().get_experiment(name)
        return experiment_view(await mgr().patch_experiment(name, ExperimentPatch.model_validate(body)))

    @r.delete("/v1/experiments/{name}", dependencies=admin)
    async def delete_experiment(name: str) -> dict[str, Any]:
        await mgr().delete_experiment(name)
        return {"id": name, "object": "experiment", "deleted": True}

    @r.post("/v1/experiments/{name}/feedback", openapi_extra=request_body(Feedback))
    async def feedback(name: str, request: Request) -> dict[str, Any]:
        body = await json_body(request)
        mgr().get_experiment(name)
        return await mgr().feedback(name, Feedback.model_validate(body))

    @r.get("/v1/experiments/{name}/results", dependencies=admin)
    async def results(name: str) -> dict[str, Any]:
        return await mgr().results(name)

    return r
