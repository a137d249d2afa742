"""Presets and experiments in memory (persisted through the store), and request routing.

Layering of a request's steering, later layers overriding earlier ones:
    preset (from ``model: "<base>:<preset>"``) → experiment variant → the request's own ``steering``.
Per layer: ``features`` are merged per feature name (the later value wins), ``vectors`` are
concatenated (earlier first), ``apply_to`` and ``return_activations`` are replaced.

An experiment is entered with ``"steering": {"experiment": NAME}`` or ``model: "<base>:exp/NAME"``.
A running experiment assigns the unit (the OpenAI ``user`` field, else the ``x-steer-user`` header,
else a random id per request) to a variant by :func:`server.experiments.assign.assign` and records
an exposure when the response completes. A paused or stopped experiment serves its control
variant and records nothing.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from prometheus_client import Counter

from server.errors import (
    Conflict,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    StoreUnavailable,
)
from server.experiments import assign as assign_mod
from server.experiments.store import (
    DB_ENV,
    ExperimentStore,
    Exposure,
    UnavailableStore,
    default_data_dir,
    open_store,
    redact,
)
from steering.request import SteeringError

if TYPE_CHECKING:
    from server.app import AppState
    from server.generation import Job

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STATUSES = ("running", "paused", "stopped")
UNITS = ("user", "request")
MAX_VARIANTS = 16
MAX_LABELLED_EXPERIMENTS = 32  # Prometheus label cap; the rest count as "_other"
BUNDLED_PRESETS = Path(__file__).resolve().parents[2] / "feature_packs" / "presets.yaml"
USER_HEADER = "x-steer-user"


def merge_steering(*layers: dict[str, Any] | None) -> dict[str, Any] | None:
    """Merge steering objects, later over earlier (features per name, vectors concatenated)."""
    out: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            if key == "features" and isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            elif key == "vectors" and isinstance(value, list) and isinstance(out.get(key), list):
                out[key] = [*out[key], *value]
            else:
                out[key] = copy.deepcopy(value)
    return out or None


def _check_name(name: Any, param: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequest(f"{what} name must match {NAME_RE.pattern}", param)
    return name


@dataclass
class Routing:
    """How one request was routed: the model name to echo and its experiment assignment."""

    model: str | None = None
    experiment: str | None = None
    variant: str | None = None
    unit_hash: str | None = None
    unit_kind: str | None = None
    record: bool = False

    def headers(self) -> dict[str, str]:
        if self.experiment is None:
            return {}
        return {"x-steer-experiment": self.experiment, "x-steer-variant": self.variant or ""}

    def body_field(self) -> dict[str, str] | None:
        if self.experiment is None:
            return None
        return {"name": self.experiment, "variant": self.variant or ""}


class ExperimentManager:
    """Owns presets, experiments, the store and the experiment metrics of one server."""

    def __init__(self, state: AppState, store: ExperimentStore | None = None) -> None:
        self.state = state
        cfg = state.config
        if store is None:
            url = getattr(cfg, "experiments_db", None) or os.environ.get(DB_ENV) or None
            data_dir = Path(getattr(cfg, "data_dir", None) or default_data_dir())
            try:
                store = open_store(url, data_dir)
            except Exception as exc:  # noqa: BLE001  (serve anyway; count and log)
                logger.error("experiment store %s unavailable: %s", redact(url) if url else data_dir, exc)
                store = UnavailableStore(exc)
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-ab-store")
        r = state.metrics.registry
        self.m_requests = Counter("steer_experiment_requests", "Recorded experiment exposures.",
                                  ["experiment", "variant"], registry=r)
        self.m_tokens = Counter("steer_experiment_generated_tokens",
                                "Generated tokens of recorded experiment exposures.",
                                ["experiment", "variant"], registry=r)
        self.m_feedback = Counter("steer_experiment_feedback", "Feedback received per variant.",
                                  ["experiment", "variant"], registry=r)
        self.m_store_errors = Counter("steer_experiment_store_errors",
                                      "Failed experiment-store operations (requests were still served).",
                                      ["op"], registry=r)
        self.presets: dict[str, dict[str, Any]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self._labelled: set[str] = set()
        self._file_presets: set[str] = set()
        self._presets_path, self._presets_strict = self._presets_file()
        if self._presets_path is not None:
            for spec in self._read_presets_file(self._presets_path):
                self.presets[spec["name"]] = spec
                self._file_presets.add(spec["name"])
        try:
            for spec in store.list_presets():
                if spec["name"] in self._file_presets:
                    logger.warning("preset %r from the presets file shadows the stored one", spec["name"])
                    continue
                self.presets[spec["name"]] = {**spec, "source": "api"}
            for spec in store.list_experiments():
                self.experiments[spec["name"]] = spec
        except Exception as exc:  # noqa: BLE001
            self._store_failed("load", exc)

    # -- configuration -------------------------------------------------------------------
    def _presets_file(self) -> tuple[Path | None, bool]:
        cfg = self.state.config
        path = getattr(cfg, "presets", None)
        if path:
            return Path(path), True
        if getattr(cfg, "bundled_packs", False) and cfg.steering and BUNDLED_PRESETS.is_file():
            return BUNDLED_PRESETS, False
        return None, False

    @staticmethod
    def _read_presets_file(path: Path) -> list[dict[str, Any]]:
        """``presets: {name: {steering: {...}, description: ...}}`` (or a bare name → steering map)."""
        data = yaml.safe_load(path.read_text()) or {}
        items = data.get("presets", data) if isinstance(data, dict) else None
        if not isinstance(items, dict):
            raise ValueError(f"{path}: expected a mapping 'presets: {{name: {{steering: ...}}}}'")
        out = []
        for name, body in items.items():
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ValueError(f"{path}: bad preset name {name!r}")
            if not isinstance(body, dict) or not isinstance(body.get("steering"), dict):
                raise ValueError(f"{path}: preset {name!r} needs a 'steering' mapping")
            out.append({"name": name, "steering": body["steering"],
                        "description": str(body.get("description", "")), "source": "file"})
        return out

    def ready(self) -> None:
        """Once the compiler exists: validate the presets file (a bad preset in a --presets file
        stops the server; in the bundled file it is skipped) and the stored definitions (logged)."""
        if self.state.compiler is None:
            return
        for name in sorted(self._file_presets):
            try:
                self._compile(self.presets[name]["steering"], "steering")
            except (SteeringError, InvalidRequest) as exc:
                if self._presets_strict:
                    raise ValueError(f"preset {name!r} in {self._presets_path}: {exc} "
                                     f"({exc.param})") from None
                logger.warning("skipping bundled preset %r: %s", name, exc)
                del self.presets[name]
                self._file_presets.discard(name)
        for name, spec in self.experiments.items():
            for i, v in enumerate(spec["variants"]):
                try:
                    self._compile(v.get("steering"), f"variants.[{i}].steering")
                except (SteeringError, InvalidRequest) as exc:
                    logger.warning("experiment %r variant %r no longer compiles: %s", name, v["name"], exc)

    # -- store access --------------------------------------------------------------------
    def _store_failed(self, op: str, exc: BaseException) -> None:
        self.m_store_errors.labels(op).inc()
        logger.error("experiment store %s failed: %s", op, exc)

    async def call(self, op: str, fn: Any, *args: Any) -> Any:
        """Run a store method off the event loop; StoreUnavailable (503) if it fails."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except Exception as exc:  # noqa: BLE001
            self._store_failed(op, exc)
            raise StoreUnavailable(f"the experiment store failed: {exc}") from None

    def submit(self, op: str, fn: Any, *args: Any) -> None:
        """Fire and forget (in order, on the store thread); failures are counted and logged."""
        def done(fut: Any) -> None:
            exc = fut.exception()
            if exc is not None:
                self._store_failed(op, exc)
        try:
            self._pool.submit(fn, *args).add_done_callback(done)
        except RuntimeError as exc:  # executor shut down
            self._store_failed(op, exc)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        try:
            self.store.close()
        except Exception:  # noqa: BLE001
            logger.debug("store close failed", exc_info=True)

    # -- validation ----------------------------------------------------------------------
    def _compile(self, steering: Any, param: str) -> Any:
        """Compile ``steering`` to validate it; errors carry ``param`` as the prefix."""
        if steering is None:
            return None
        compiler = self.state.compiler
        if compiler is None:
            if not self.state.config.steering:
                raise InvalidRequest("steering is disabled on this server (started with --no-steering)",
                                     param, "steering_disabled")
            raise EngineUnavailable("the engine is still starting; retry shortly")
        if not isinstance(steering, dict):
            raise InvalidRequest("steering must be an object", param)
        try:
            return compiler.compile(steering)
        except SteeringError as exc:
            sub = exc.param[len("steering"):] if exc.param.startswith("steering") else f".{exc.param}"
            raise SteeringError(exc.message, f"{param}{sub}", exc.code) from None

    def validate_preset(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        for key in body:
            if key not in ("name", "steering", "description"):
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", key,
                                     "unsupported_parameter")
        name = _check_name(body.get("name"), "name", "preset")
        if "steering" not in body:
            raise InvalidRequest("steering is required", "steering")
        if self._compile(body["steering"], "steering") is None:
            raise InvalidRequest("a preset must steer something (features or vectors)", "steering")
        desc = body.get("description", "")
        if not isinstance(desc, str):
            raise InvalidRequest("description must be a string", "description")
        return {"name": name, "steering": body["steering"], "description": desc, "source": "api"}

    def validate_experiment(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        for key in body:
            if key not in ("name", "unit", "variants", "status", "description"):
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", key,
                                     "unsupported_parameter")
        name = _check_name(body.get("name"), "name", "experiment")
        unit = body.get("unit", "user")
        if unit not in UNITS:
            raise InvalidRequest(f"unit must be one of {list(UNITS)}", "unit")
        status = body.get("status", "running")
        if status not in STATUSES:
            raise InvalidRequest(f"status must be one of {list(STATUSES)}", "status")
        desc = body.get("description", "")
        if not isinstance(desc, str):
            raise InvalidRequest("description must be a string", "description")
        variants = body.get("variants")
        if not isinstance(variants, list) or not variants:
            raise InvalidRequest("variants must be a non-empty list", "variants")
        if len(variants) > MAX_VARIANTS:
            raise InvalidRequest(f"at most {MAX_VARIANTS} variants", "variants")
        out, seen = [], set()
        for i, v in enumerate(variants):
            where = f"variants.[{i}]"
            if not isinstance(v, dict):
                raise InvalidRequest("each variant must be an object", where)
            for key in v:
                if key not in ("name", "preset", "steering", "weight", "control"):
                    raise InvalidRequest(f"unknown variant field {key!r}", f"{where}.{key}")
            vname = _check_name(v.get("name"), f"{where}.name", "variant")
            if vname in seen:
                raise InvalidRequest(f"duplicate variant name {vname!r}", f"{where}.name")
            seen.add(vname)
            weight = v.get("weight", 1.0)
            if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                    or not math.isfinite(weight) or weight <= 0):
                raise InvalidRequest("weight must be a finite number > 0", f"{where}.weight")
            control = v.get("control", False)
            if not isinstance(control, bool):
                raise InvalidRequest("control must be a boolean", f"{where}.control")
            item: dict[str, Any] = {"name": vname, "weight": float(weight), "control": control}
            if "preset" in v and "steering" in v:
                raise InvalidRequest("give a preset or a steering, not both", f"{where}.preset")
            if "preset" in v:
                preset = self.presets.get(v["preset"]) if isinstance(v["preset"], str) else None
                if preset is None:
                    raise InvalidRequest(f"unknown preset {v['preset']!r}", f"{where}.preset",
                                         "unknown_preset")
                item["preset"] = v["preset"]
                item["steering"] = copy.deepcopy(preset["steering"])  # a snapshot
            elif v.get("steering") is not None:
                self._compile(v["steering"], f"{where}.steering")
                item["steering"] = v["steering"]
            else:
                item["steering"] = None
            out.append(item)
        controls = [i for i, v in enumerate(out) if v["control"]]
        if len(controls) != 1:
            raise InvalidRequest(f"exactly one variant must be the control (found {len(controls)})",
                                 "variants")
        return {"name": name, "unit": unit, "description": desc, "variants": out, "status": status}

    # -- admin operations ----------------------------------------------------------------
    async def create_preset(self, body: Any) -> dict[str, Any]:
        spec = self.validate_preset(body)
        if spec["name"] in self.presets:
            raise Conflict(f"a preset named {spec['name']!r} exists", "name")
        await self.call("admin", self.store.put_preset, spec["name"], spec)
        self.presets[spec["name"]] = spec
        return self.preset_view(spec)

    async def delete_preset(self, name: str) -> None:
        if name not in self.presets:
            raise NotFound(f"no preset named {name!r}", "name")
        if name in self._file_presets:
            raise InvalidRequest(f"preset {name!r} comes from the presets file; edit the file",
                                 "name", "preset_from_file")
        await self.call("admin", self.store.delete_preset, name)
        del self.presets[name]

    def preset_view(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {"object": "preset", **spec,
                "models": [f"{base}:{spec['name']}" for base in self.state.served_names]}

    async def create_experiment(self, body: Any) -> dict[str, Any]:
        spec = self.validate_experiment(body)
        if spec["name"] in self.experiments:
            raise Conflict(f"an experiment named {spec['name']!r} exists", "name")
        await self.call("admin", self.store.put_experiment, spec["name"], spec, spec["status"])
        spec["created"] = time.time()
        self.experiments[spec["name"]] = spec
        return self.experiment_view(spec)

    def get_experiment(self, name: str) -> dict[str, Any]:
        spec = self.experiments.get(name)
        if spec is None:
            raise NotFound(f"no experiment named {name!r}", "name")
        return spec

    async def patch_experiment(self, name: str, body: Any) -> dict[str, Any]:
        spec = self.get_experiment(name)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        for key in body:
            if key != "status":
                raise InvalidRequest(f"only status can change (got {key!r}); create a new experiment "
                                     "to change variants or weights", key, "unsupported_parameter")
        status = body.get("status")
        if status not in STATUSES:
            raise InvalidRequest(f"status must be one of {list(STATUSES)}", "status")
        await self.call("admin", self.store.set_status, name, status)
        spec["status"] = status
        return self.experiment_view(spec)

    async def delete_experiment(self, name: str) -> None:
        self.get_experiment(name)
        await self.call("admin", self.store.delete_experiment, name)
        spec = self.experiments.pop(name)
        if name in self._labelled:
            self._labelled.discard(name)
            for m in (self.m_requests, self.m_tokens, self.m_feedback):
                for v in spec["variants"]:
                    try:
                        m.remove(name, v["name"])
                    except KeyError:
                        pass

    def experiment_view(self, spec: dict[str, Any]) -> dict[str, Any]:
        return {"object": "experiment", **spec,
                "models": [f"{base}:exp/{spec['name']}" for base in self.state.served_names]}

    async def feedback(self, name: str, body: Any) -> dict[str, Any]:
        self.get_experiment(name)
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        for key in body:
            if key not in ("response_id", "score", "label"):
                raise InvalidRequest(f"Unrecognized request argument supplied: {key}", key,
                                     "unsupported_parameter")
        rid = body.get("response_id")
        if not isinstance(rid, str) or not rid:
            raise InvalidRequest("response_id is required", "response_id")
        score, label = body.get("score"), body.get("label")
        if score is None and label is None:
            raise InvalidRequest("give a numeric score or a label (good/bad)", "score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            raise InvalidRequest("score must be a finite number", "score")
        if label is not None and label not in ("good", "bad"):
            raise InvalidRequest("label must be 'good' or 'bad'", "label")
        result = await self.call("feedback", self.store.record_feedback, name, rid,
                                 None if score is None else float(score), label)
        if result is None:
            raise NotFound(f"experiment {name!r} recorded no response {rid!r}", "response_id")
        status, variant = result
        if status == "created":
            self.m_feedback.labels(*self._labels(name, variant)).inc()
        return {"object": "experiment.feedback", "experiment": name, "response_id": rid,
                "variant": variant, "score": score, "label": label, "status": status}

    async def results(self, name: str) -> dict[str, Any]:
        from server.experiments.stats import results

        spec = self.get_experiment(name)
        obs = await self.call("results", self.store.observations, name)
        return results(spec, obs)

    # -- requests ------------------------------------------------------------------------
    def model_entries(self, created: int) -> list[dict[str, Any]]:
        """``/v1/models`` entries of the presets: ``<base>:<preset>`` with ``parent`` = base."""
        return [{"id": f"{base}:{name}", "object": "model", "created": created, "owned_by": "steer",
                 "parent": base, "root": base, "preset": name}
                for base in self.state.served_names for name in sorted(self.presets)]

    def _labels(self, experiment: str, variant: str) -> tuple[str, str]:
        if experiment in self._labelled:
            return experiment, variant
        if experiment in self.experiments and len(self._labelled) < MAX_LABELLED_EXPERIMENTS:
            self._labelled.add(experiment)
            return experiment, variant
        return "_other", "_other"

    def route(self, req: Any, headers: Any) -> Routing:
        """Resolve presets / experiments of ``req`` in place: ``req.model`` becomes the base model
        and ``req.steering`` the merged steering (the ``experiment`` key removed)."""
        routing = Routing()
        preset_layer = None
        exp_name = None
        model = req.model
        if isinstance(model, str) and ":" in model:
            for base in self.state.served_names:
                if model.startswith(base + ":"):
                    suffix = model[len(base) + 1:]
                    if suffix.startswith("exp/"):
                        exp_name = suffix[4:]
                        if exp_name not in self.experiments:
                            raise ModelNotFound(f"The model '{model}' does not exist: no experiment "
                                                f"named {exp_name!r}", "model")
                    else:
                        preset = self.presets.get(suffix)
                        if preset is None:
                            raise ModelNotFound(f"The model '{model}' does not exist: no preset "
                                                f"named {suffix!r}", "model")
                        preset_layer = preset["steering"]
                    routing.model = model
                    req.model = base
                    break
        steering = req.steering
        if isinstance(steering, dict) and "experiment" in steering:
            steering = {k: v for k, v in steering.items() if k != "experiment"}
            named = req.steering["experiment"]
            if not isinstance(named, str):
                raise InvalidRequest("experiment must be a string", "steering.experiment")
            if exp_name is not None and named != exp_name:
                raise InvalidRequest(f"the model names experiment {exp_name!r} but steering names "
                                     f"{named!r}", "steering.experiment")
            if named not in self.experiments:
                raise NotFound(f"no experiment named {named!r}", "steering.experiment")
            exp_name = named
        variant_layer = None
        if exp_name is not None:
            spec = self.experiments[exp_name]
            variants = spec["variants"]
            if spec["status"] == "running":
                user = getattr(req, "user", None)
                header = headers.get(USER_HEADER) if headers is not None else None
                if spec["unit"] == "user" and user:
                    unit, kind = f"user:{user}", "user"
                elif spec["unit"] == "user" and header:
                    unit, kind = f"user:{header}", "header"
                else:
                    unit, kind = f"random:{uuid.uuid4().hex}", "random"
                idx = assign_mod.assign(exp_name, unit, [v["weight"] for v in variants])
                routing.unit_hash, routing.unit_kind, routing.record = \
                    assign_mod.unit_hash(unit), kind, True
            else:
                idx = next(i for i, v in enumerate(variants) if v["control"])
            routing.experiment, routing.variant = exp_name, variants[idx]["name"]
            variant_layer = variants[idx].get("steering")
        if preset_layer is not None or variant_layer is not None:
            req.steering = merge_steering(*(self._canonical(x) for x in (preset_layer, variant_layer, steering)))
        elif steering is not req.steering:
            req.steering = steering or None
        return routing

    def _canonical(self, layer: Any) -> Any:
        """``layer`` with feature names resolved to ``pack/feature`` where they resolve, so that
        ``pirate`` in a request overrides ``smollm2-tone/pirate`` in a preset."""
        packs = self.state.packs
        if packs is None or not isinstance(layer, dict) or not isinstance(layer.get("features"), dict):
            return layer
        feats = {}
        for name, spec in layer["features"].items():
            try:
                name = packs.resolve(str(name)).name
            except Exception:  # noqa: BLE001  (unknown/ambiguous: the compiler reports it)
                pass
            feats[name] = spec
        return {**layer, "features": feats}

    def finish(self, routing: Routing, job: Job, prompt_tokens: int,
               body: dict[str, Any] | None = None) -> None:
        """Add the ``experiment`` body field and record the exposure (off the event loop)."""
        if routing.experiment is None:
            return
        if body is not None:
            body["experiment"] = routing.body_field()
        if not routing.record:
            return
        now_wall, now = time.time(), time.monotonic()
        latency = now - job.arrival
        tokens = int(getattr(job, "generated_tokens", 0))
        labels = self._labels(routing.experiment, routing.variant or "")
        self.m_requests.labels(*labels).inc()
        self.m_tokens.labels(*labels).inc(tokens)
        exposure = Exposure(
            response_id=job.request_id, experiment=routing.experiment, variant=routing.variant or "",
            unit_hash=routing.unit_hash or "", unit_kind=routing.unit_kind or "random",
            started=now_wall - latency, finished=now_wall, prompt_tokens=prompt_tokens,
            generated_tokens=tokens, latency_s=latency,
            finish_reason=getattr(job, "finish_reason", None))
        self.submit("exposure", self.store.record_exposure, exposure)

    def recorded_stream(self, routing: Routing, stream: Any, job: Job, prompt_tokens: int) -> Any:
        """``stream`` (SSE strings), recording the exposure just before ``[DONE]``."""
        if not routing.record:
            return stream

        async def wrapped() -> Any:
            try:
                async for chunk in stream:
                    if chunk == "data: [DONE]\n\n":
                        self.finish(routing, job, prompt_tokens)
                    yield chunk
            finally:
                await stream.aclose()  # runs generation.run's finally: aborts the engine request
        return wrapped()
