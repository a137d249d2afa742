"""Admin API of presets and experiments.

    GET    /v1/presets                           presets (file and API), with their model names
    POST   /v1/presets                           {"name", "steering", "description"?}
    DELETE /v1/presets/{name}                    presets created through the API
    GET    /v1/experiments                       experiments
    POST   /v1/experiments                       {"name", "unit"?, "variants": [...], "status"?}
    GET    /v1/experiments/{name}
    PATCH  /v1/experiments/{name}                {"status": "running" | "paused" | "stopped"}
    DELETE /v1/experiments/{name}                the experiment and its recorded data
    POST   /v1/experiments/{name}/feedback       {"response_id", "score"? , "label"?: good|bad}
    GET    /v1/experiments/{name}/results
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from server.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from server.app import AppState


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise InvalidRequest("We could not parse the JSON body of your request.") from None


def experiments_router(state: AppState, dependencies: list) -> APIRouter:
    r = APIRouter(dependencies=dependencies)

    def mgr():
        return state.experiments

    @r.get("/v1/presets")
    async def list_presets() -> dict[str, Any]:
        m = mgr()
        return {"object": "list", "data": [m.preset_view(p) for _, p in sorted(m.presets.items())]}

    @r.post("/v1/presets")
    async def create_preset(request: Request) -> dict[str, Any]:
        return await mgr().create_preset(await _body(request))

    @r.get("/v1/presets/{name}")
    async def get_preset(name: str) -> dict[str, Any]:
        p = mgr().presets.get(name)
        if p is None:
            raise NotFound(f"no preset named {name!r}", "name")
        return mgr().preset_view(p)

    @r.delete("/v1/presets/{name}")
    async def delete_preset(name: str) -> dict[str, Any]:
        await mgr().delete_preset(name)
        return {"id": name, "object": "preset", "deleted": True}

    @r.get("/v1/experiments")
    async def list_experiments() -> dict[str, Any]:
        m = mgr()
        return {"object": "list", "data": [m.experiment_view(e) for e in m.experiments.values()]}

    @r.post("/v1/experiments")
    async def create_experiment(request: Request) -> dict[str, Any]:
        return await mgr().create_experiment(await _body(request))

    @r.get("/v1/experiments/{name}")
    async def get_experiment(name: str) -> dict[str, Any]:
        return mgr().experiment_view(mgr().get_experiment(name))

    @r.patch("/v1/experiments/{name}")
    async def patch_experiment(name: str, request: Request) -> dict[str, Any]:
        return await mgr().patch_experiment(name, await _body(request))

    @r.delete("/v1/experiments/{name}")
    async def delete_experiment(name: str) -> dict[str, Any]:
        await mgr().delete_experiment(name)
        return {"id": name, "object": "experiment", "deleted": True}

    @r.post("/v1/experiments/{name}/feedback")
    async def feedback(name: str, request: Request) -> dict[str, Any]:
        return await mgr().feedback(name, await _body(request))

    @r.get("/v1/experiments/{name}/results")
    async def results(name: str) -> dict[str, Any]:
        return await mgr().results(name)

    return r
