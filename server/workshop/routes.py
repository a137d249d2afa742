"""The feature workshop's API (an admin key, or a key whose policy says ``workshop: true``).

    POST   /v1/features                    {"name", "description", "examples"?, "method"?,
                                            "layers"?, "calibrate"?} → 202 {"id", "status"}
    GET    /v1/features/jobs               the jobs of every server sharing the store (a key sees
                                           its own)
    GET    /v1/features/jobs/{id}          status, stage, progress, error; when done the feature
    GET    /v1/features/jobs/{id}/events   the same as server-sent events until the job ends
    DELETE /v1/features/jobs/{id}          cancel (409 once it has finished); a job another
                                           replica runs is cancelled there at its next heartbeat
    DELETE /v1/features/custom/{name}      remove a custom feature (409 while a preset or a running
                                           experiment uses it)

A job is visible to the key that started it and to admin keys (others: 404). This router is
included before the catalog's, whose ``GET /v1/features/{name}`` would otherwise take
``jobs/{id}`` for a feature name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.auth import principal_of
from server.errors import NotFound
from server.http import json_body
from server.openapi import request_body
from server.workshop.models import Job, NewFeature

if TYPE_CHECKING:
    from server.state import AppState
    from server.workshop.jobs import Workshop

EVENT_POLL_S = 0.5


def workshop_router(state: AppState, workshop: Workshop, dependencies: list) -> APIRouter:
    r = APIRouter(dependencies=dependencies)

    async def visible(request: Request, job_id: str) -> Job:
        who = principal_of(request)
        workshop.require(who)
        job = await workshop.get(job_id)
        if not who.admin and job.owner != who.name:
            raise NotFound(f"no workshop job {job_id!r}", "id", "not_found")
        return job

    @r.post("/v1/features", status_code=202, openapi_extra=request_body(NewFeature))
    async def create(request: Request) -> JSONResponse:
        who = principal_of(request)
        workshop.require(who)
        new = NewFeature.model_validate(await json_body(request))
        job = await workshop.submit(new, who)
        return JSONResponse(job.view(), status_code=202,
                            headers={"Location": f"/v1/features/jobs/{job.id}"})

    @r.get("/v1/features/jobs")
    async def list_jobs(request: Request) -> dict[str, Any]:
        who = principal_of(request)
        workshop.require(who)
        return {"object": "list", "data": [j.view() for j in await workshop.listing()
                                           if who.admin or j.owner == who.name]}

    @r.get("/v1/features/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return (await visible(request, job_id)).view()

    @r.get("/v1/features/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        job = await visible(request, job_id)

        async def events() -> AsyncIterator[bytes]:
            nonlocal job
            last = None
            while True:
                view = job.view()
                if view != last:
                    yield f"data: {json.dumps(view)}\n\n".encode()
                    last = view
                if not job.active:
                    yield b"data: [DONE]\n\n"
                    return
                await asyncio.sleep(EVENT_POLL_S)
                if job.id not in workshop.jobs:  # another replica's: its record, read again
                    job = await workshop.get(job.id)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @r.delete("/v1/features/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        await visible(request, job_id)
        return (await workshop.cancel(job_id)).view()

    @r.delete("/v1/features/custom/{name}")
    async def delete_feature(name: str, request: Request) -> dict[str, Any]:
        workshop.require(principal_of(request))
        await workshop.delete_feature(name)
        return {"id": f"custom/{name}", "object": "feature", "deleted": True}

    return r
