"""Admission: what a request takes before any response starts, in one place and in this order —
its key's steering slot (``max_slots``, held until the response has ended), its key's tokens per
minute, then the server's steering slot and readout bytes (:class:`SteeringLimits`, 400/429 when
they cannot be had, waiting while a slot is busy). A refused request keeps nothing it took.

It runs after the request's steering compiled and its sampling parameters were built (a request
the server refuses with a 400 takes nothing), and before any response starts, so a 429 is a real
status."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from fastapi import Request

from server.auth import at_end, auth_of, principal_of
from server.http import until_client_gone
from server.runner import Job
from server.sampling import GenerationRequest
from steering.spec import SteeringSpec

if TYPE_CHECKING:
    from server.state import AppState


def _key_slot(request: Request, steering: SteeringSpec | None) -> None:
    """The key's ``max_slots``: one per distinct steering configuration in flight (429 past it),
    released when the response has ended."""
    who, auth = principal_of(request), auth_of(request)
    policy = who.policy
    if auth is None or policy is None or policy.max_slots is None or steering is None or steering.empty:
        return
    config = json.dumps(steering.model_dump(mode="json", exclude={"experiment"}), sort_keys=True)
    try:
        release = auth.slots.acquire(who.name, config, policy.max_slots)
    except Exception:
        auth.metrics.policy_denials.labels("max_slots").inc()
        raise
    at_end(request, release)


def _output_budget(state: AppState, prompt_tokens: int, max_tokens: int | None) -> int:
    """Tokens a request may generate: ``max_tokens``, or (None) up to the end of the context."""
    return max((state.max_model_len or 0) - prompt_tokens, 0) if max_tokens is None else max_tokens


def _key_tokens(request: Request, state: AppState, req: GenerationRequest, prompt_tokens: int) -> None:
    """The key's tokens per minute: the prompt plus every token the request may generate."""
    who, auth = principal_of(request), auth_of(request)
    rate = who.policy.rate if who.policy is not None else None
    if auth is None or rate is None or rate.tokens_per_minute is None:
        return
    max_out = _output_budget(state, prompt_tokens, req.max_output()[0])
    auth.take(who, "tokens", rate.tokens_per_minute, prompt_tokens + req.n * max_out)


async def admit_generation(request: Request, state: AppState, req: GenerationRequest,
                           steering: SteeringSpec | None, job: Job) -> bool:
    """Admit a generation: the key's slot and tokens, then the server's slot and readout bytes
    (``job.held``), watching for the client to leave while it waits. False: the client left."""
    _key_slot(request, steering)
    _key_tokens(request, state, req, len(job.prompt_ids))
    if state.limits is None:
        return True
    prompt_len = len(job.prompt_ids)
    admit = state.limits.admit(job.compiled, job.request_id,
                               prompt_len + _output_budget(state, prompt_len, job.params.max_tokens),
                               "steering.return_activations")
    if job.compiled is None:
        job.held = await admit
        return True
    work = asyncio.ensure_future(admit)
    job.held = await until_client_gone(request, work)
    if job.held is None and work.done() and not work.cancelled() and work.exception() is None:
        work.result().close()  # admitted just as the client left
    return job.held is not None


async def admit_readout(state: AppState, job: Job, param: str) -> None:
    """Admit an inspection (one prefill read back): the server's slot and readout bytes, or
    400/429 before anything runs (``param`` names the text the readout is sized by)."""
    if state.limits is not None:
        job.held = await state.limits.admit(job.compiled, job.request_id, len(job.prompt_ids), param)
