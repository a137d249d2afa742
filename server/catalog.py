"""Feature catalog and inspection routes over the loaded feature packs.

    GET  /v1/packs                      loaded packs (provenance, model fingerprint, SAEs)
    GET  /v1/features                   named features; ?pack= &tag= &layer= &limit= &offset=
    GET  /v1/features/search?q=bridge   ranked over names, descriptions, tags and SAE labels
    GET  /v1/features/{name}            one feature or SAE latent (`pack/feature`, `L12:123`)
    POST /v1/features/inspect           per token: top-k SAE latents and named-feature activations

Inspect runs the prompt through the real engine (one prefill, no sampling beyond one token) with
a readout of the residual stream at the needed layers — optionally under a request's steering, to
show what a steering did — and encodes it with the packs' SAEs on the API server.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import Field
from vllm import SamplingParams

from server import pipeline
from server.errors import InvalidRequest, NotFound
from server.http import json_body
from server.openapi import request_body
from server.protocol import MAX_ID_CHARS, ChatMessage, _Strict
from server.runner import Job
from steering.features import AmbiguousFeature, UnknownFeature
from steering.program import SteeringProgram
from steering.request import CompiledSteering, KeyBound
from steering.spec import FeatureName, SteeringSpec

if TYPE_CHECKING:
    from server.state import AppState


class InspectRequest(_Strict):
    """POST /v1/features/inspect."""

    model: str | None = Field(None, max_length=MAX_ID_CHARS)
    messages: list[ChatMessage] | None = None
    text: str | None = None
    features: list[FeatureName] = Field(default_factory=list, max_length=64)
    layers: list[int] | None = None  # SAE layers to read (default: every loaded SAE)
    top_k: int = Field(10, ge=0, le=100)
    steering: SteeringSpec | None = None


def _registry(state: AppState):
    if state.packs is None:
        raise NotFound("no feature packs are loaded on this server", None)
    return state.packs


def catalog_router(state: AppState, dependencies: list) -> APIRouter:
    r = APIRouter(dependencies=dependencies)

    @r.get("/v1/packs")
    async def packs() -> dict[str, Any]:
        return {"object": "list", "data": state.packs.packs() if state.packs else []}

    @r.get("/v1/features")
    async def features(pack: str | None = None, tag: str | None = None, layer: int | None = None,
                       limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        if state.packs is None:
            items: list[dict[str, Any]] = []
        else:
            try:
                items = state.packs.features(pack=pack, tag=tag, layer=layer)
            except KeyError:
                raise NotFound(f"no pack {pack!r} is loaded", "pack") from None
        page = items[offset: offset + limit]
        return {"object": "list", "data": page, "total": len(items), "offset": offset,
                "limit": limit, "has_more": offset + len(page) < len(items)}

    @r.get("/v1/features/search")
    async def search(q: str = Query(..., min_length=1, max_length=200),
                     limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        hits = state.packs.search(q, limit=limit) if state.packs else []
        return {"object": "list", "query": q, "data": hits}

    @r.get("/v1/features/{name:path}")
    async def feature(name: str) -> dict[str, Any]:
        try:
            return _registry(state).get(name)
        except AmbiguousFeature as e:
            raise InvalidRequest(str(e.args[0]), "name", "ambiguous_feature") from None
        except (UnknownFeature, KeyError) as e:
            raise NotFound(str(e.args[0]) if e.args else f"unknown feature {name!r}", "name") from None

    @r.post("/v1/features/inspect", openapi_extra=request_body(InspectRequest))
    async def inspect(request: Request) -> dict[str, Any]:
        req = InspectRequest.model_validate(await json_body(request))
        # a readout: the key's policy must allow activations (and the features and steering)
        _, bound = pipeline.policy(request, state, req.steering, req.steering, inspect=req.features)
        return await _inspect(request, state, req, bound)

    return r


def _prompt_ids(state: AppState, req: InspectRequest) -> list[int]:
    if (req.messages is None) == (req.text is None):
        raise InvalidRequest("give exactly one of messages or text", "messages")
    guard = state.token_guard()
    if req.text is not None:
        return guard.prompt_ids(req.text)
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    return guard.chat_ids(msgs, lambda m: state.tokenizer.apply_chat_template(
        m, add_generation_prompt=False, tokenize=False))


async def _inspect(request: Request, state: AppState, req: InspectRequest,
                   bound: KeyBound | None) -> dict[str, Any]:
    state.require_engine()
    if state.compiler is None:
        raise InvalidRequest("steering is disabled on this server (started with --no-steering)",
                             "steering", "steering_disabled")
    model = state.served_names[0] if req.model is None else req.model
    if model not in state.served_names:
        raise NotFound(f"The model '{model}' does not exist", "model")
    prompt_ids = _prompt_ids(state, req)
    if len(prompt_ids) >= (state.max_model_len or 0):
        raise InvalidRequest("the text does not fit the model's context", "text")

    feats = []
    for i, name in enumerate(req.features):
        try:
            feats.append((name, _registry(state).resolve(name)))
        except (UnknownFeature, AmbiguousFeature) as e:
            raise InvalidRequest(str(e.args[0]), f"features[{i}]", "unknown_feature") from None
    saes = [s for s in (state.packs.saes() if state.packs else [])
            if req.layers is None or s["layer"] in req.layers]
    if req.layers is not None and {s["layer"] for s in saes} != set(req.layers):
        missing = sorted(set(req.layers) - {s["layer"] for s in saes})
        raise InvalidRequest(f"no SAE is loaded at layer(s) {missing}", "layers")
    if not feats and not saes:
        raise InvalidRequest("nothing to inspect: name features or load a pack with an SAE", "features")
    layers = sorted({f.layer for _, f in feats} | {s["layer"] for s in saes})
    not_steerable = [L for L in layers if L not in state.compiler.layers]
    if not_steerable:
        raise InvalidRequest(f"layers {not_steerable} are not readable on this server (--steer-layers)",
                             "layers")

    steer = pipeline.compile_steering(request, state, req.steering, bound)
    request_id = f"inspect-{uuid.uuid4().hex}"
    compiled = CompiledSteering(
        program=steer.program if steer else SteeringProgram(hidden_size=state.compiler.hidden_size),
        apply_to=steer.apply_to if steer else "all", return_activations=True,
        applied=steer.applied if steer else [], capture=tuple(layers),
        entry_labels=steer.entry_labels if steer else {},
        salt=request_id)  # a unique salt: every prompt position is computed, none cached
    params = SamplingParams(max_tokens=1, temperature=0.0,
                            extra_args=compiled.extra_args(readout_key=request_id))
    job = Job(request_id=request_id, prompt_ids=prompt_ids, params=params, compiled=compiled)
    await pipeline.read_back(state, job, "text" if req.text is not None else "messages")
    streams: dict[int, dict[int, list[float]]] = {}
    for _, layer, pos, values in job.captured:
        streams.setdefault(layer, {})[pos] = values
    n = len(prompt_ids)
    for layer in layers:
        if sorted(streams.get(layer, {})) != list(range(n)):
            raise RuntimeError(f"inspect: the engine returned an incomplete readout at layer {layer}")
    h = {layer: np.asarray([streams[layer][p] for p in range(n)]) for layer in layers}  # [T, d]

    tokens = [{"position": p, "token_id": t, "token": state.tokenizer.decode([t]),
               "features": {}, "sae": {}} for p, t in enumerate(prompt_ids)]
    for name, f in feats:
        acts = f.activation(h[f.layer])
        for p in range(n):
            tokens[p]["features"][name] = float(acts[p])
    for s in saes:
        top = state.packs.top_latents(s["layer"], h[s["layer"]].astype(np.float32), k=req.top_k,
                                      pack=s["pack"])
        for p in range(n):
            tokens[p]["sae"][f"{s['pack']}/{s['id']}"] = top[p]
    out: dict[str, Any] = {
        "object": "feature_inspection", "model": model, "layers": layers,
        "saes": [{"pack": s["pack"], "id": s["id"], "layer": s["layer"]} for s in saes],
        "tokens": tokens,
    }
    if steer is not None:
        out["steering"] = steer.summary()
    return out
