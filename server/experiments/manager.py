"""The experiments facade of one server: presets and experiments in memory, persisted through
the store, and the calls the app and routes make.

* requests: :meth:`ExperimentManager.route` (see :mod:`.routing`) and :meth:`~ExperimentManager.finish`
  (the exposure, see :mod:`.recording`);
* the admin API (:mod:`.routes`): create / change / delete presets and experiments, feedback,
  results — checking what the models (:mod:`.models`) cannot: whether a variant's preset exists
  and whether steering compiles on this engine;
* the store, which is only ever called off the event loop, on one thread with a bounded queue
  (:mod:`.writer`): admin calls (:meth:`call`) wait at most ``call_timeout_s`` and fail fast with
  503 ``store_unavailable``; exposures (:meth:`record`) are fire and forget, retried a bounded
  number of times, and counted in ``steer_experiment_exposures_lost_total{reason}`` when they
  cannot be stored. When the store fails, requests are still served and the failure is counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from server.errors import Conflict, EngineUnavailable, InvalidRequest, NotFound, StoreUnavailable
from server.experiments import recording, routing
from server.experiments.backend import open_store
from server.experiments.models import (
    Experiment,
    ExperimentPatch,
    Feedback,
    NewExperiment,
    NewPreset,
    Preset,
    Variant,
)
from server.experiments.presets import Presets, presets_file
from server.experiments.recording import ExperimentMetrics
from server.experiments.routing import Routing
from server.experiments.store import (
    DB_ENV,
    ExperimentStore,
    Exposure,
    UnavailableStore,
    default_data_dir,
    redact,
)
from server.experiments.writer import QueueFull, StoreWriter, WriteLimits, WriterClosed
from steering.spec import SteeringError, SteeringSpec

if TYPE_CHECKING:
    from server.generation import Job
    from server.state import AppState

logger = logging.getLogger(__name__)


class ExperimentManager:
    """Owns presets, experiments, the store and the experiment metrics of one server."""

    def __init__(self, state: AppState, store: ExperimentStore | None = None,
                 limits: WriteLimits | None = None) -> None:
        self.state = state
        self.limits = limits or WriteLimits()
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
        self.writer = StoreWriter(self.limits.max_pending)
        self.metrics = ExperimentMetrics(state.metrics.registry, lambda name: name in self.experiments)
        self._presets = Presets(*presets_file(cfg))
        self.experiments: dict[str, Experiment] = {}
        try:
            self._presets.load(store.list_presets())
            for row in store.list_experiments():
                try:
                    exp = Experiment.model_validate(row)
                except ValidationError as exc:
                    logger.warning("skipping stored experiment %r: %s", row.get("name"), exc)
                    continue
                self.experiments[exp.name] = exp
        except Exception as exc:  # noqa: BLE001
            self._store_failed("load", exc)

    @property
    def presets(self) -> dict[str, Preset]:
        """Name → preset (file and API)."""
        return self._presets.items

    def ready(self) -> None:
        """Once the compiler exists: validate the presets file (a bad preset in a --presets file
        stops the server; in the bundled file it is skipped) and the stored definitions (logged)."""
        if self.state.compiler is None:
            return
        self._presets.check(self._compile)
        for exp in self.experiments.values():
            for i, v in enumerate(exp.variants):
                try:
                    self._compile(v.steering, f"variants.[{i}].steering")
                except (SteeringError, InvalidRequest) as exc:
                    logger.warning("experiment %r variant %r no longer compiles: %s", exp.name, v.name, exc)

    # -- store access --------------------------------------------------------------------
    def _store_failed(self, op: str, exc: BaseException) -> None:
        self.metrics.store_failed(op)
        logger.error("experiment store %s failed: %s", op, exc)

    async def call(self, op: str, fn: Any, *args: Any) -> Any:
        """Run a store method on the store thread and wait at most ``call_timeout_s`` for it;
        StoreUnavailable (503) if the queue is full, it fails or it does not answer in time (a
        call that timed out before it started never runs). The database's own error is logged,
        never sent."""
        try:
            fut = self.writer.submit(fn, *args)
        except (QueueFull, WriterClosed) as exc:
            self._store_failed(op, exc)
            raise StoreUnavailable("the experiment store is busy; retry shortly") from None
        timeout = self.limits.call_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()
            self._store_failed(op, TimeoutError(f"no answer within {timeout:g} s"))
            raise StoreUnavailable(f"the experiment store did not answer within {timeout:g} s; "
                                   "retry shortly (the change may or may not have been applied)") \
                from None
        except Exception as exc:  # noqa: BLE001
            self._store_failed(op, exc)
            raise StoreUnavailable("the experiment store is unavailable; retry shortly") from None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every store call queued so far has run (tests, shutdown)."""
        self.writer.drain(timeout)

    def record(self, e: Exposure) -> None:
        """Hand exposure ``e`` to the store thread (fire and forget): never blocks; when the
        queue is full it is counted as lost at once."""
        try:
            self.writer.submit(self._write_exposure, e)
        except QueueFull:
            self.metrics.exposure_lost("queue_full")
            logger.warning("experiment exposure %s lost: the store queue is full", e.response_id)
        except WriterClosed:
            self.metrics.exposure_lost("shutdown")

    def _write_exposure(self, e: Exposure) -> None:
        """On the store thread: write ``e``, retrying with backoff; count it when it is lost."""
        attempts = 1 if isinstance(self.store, UnavailableStore) else max(1, self.limits.exposure_attempts)
        for attempt in range(attempts):
            try:
                written = self.store.record_exposure(e)
            except Exception as exc:  # noqa: BLE001
                if attempt + 1 < attempts and not self.writer.closing:
                    time.sleep(self.limits.retry_backoff_s * 2 ** attempt)
                    continue
                self._store_failed("exposure", exc)
                self.metrics.exposure_lost("store_error")
                return
            if written is False:
                self.metrics.exposure_lost("experiment_deleted")
            return

    def close(self) -> None:
        left = self.writer.close(self.limits.close_timeout_s)
        if left:
            self.metrics.exposure_lost("shutdown", left)
        try:
            self.store.close()
        except Exception:  # noqa: BLE001
            logger.debug("store close failed", exc_info=True)

    # -- checks that need the engine -----------------------------------------------------
    def _compile(self, steering: SteeringSpec | None, param: str) -> Any:
        """Compile ``steering`` to validate it; errors carry ``param`` as the prefix."""
        if steering is None:
            return None
        compiler = self.state.compiler
        if compiler is None:
            if not self.state.config.steering:
                raise InvalidRequest("steering is disabled on this server (started with --no-steering)",
                                     param, "steering_disabled")
            raise EngineUnavailable("the engine is still starting; retry shortly")
        try:
            return compiler.compile(steering)
        except SteeringError as exc:
            sub = exc.param[len("steering"):] if exc.param.startswith("steering") else f".{exc.param}"
            raise SteeringError(exc.message, f"{param}{sub}", exc.code) from None

    def _resolve_variant(self, i: int, v: Variant) -> Variant:
        """``v`` with its preset's steering snapshot; its inline steering compiled."""
        where = f"variants.[{i}]"
        if v.preset is not None:
            preset = self.presets.get(v.preset)
            if preset is None:
                raise InvalidRequest(f"unknown preset {v.preset!r}", f"{where}.preset", "unknown_preset")
            return v.model_copy(update={"steering": preset.steering.model_copy(deep=True)})
        self._compile(v.steering, f"{where}.steering")
        return v

    # -- presets -------------------------------------------------------------------------
    async def create_preset(self, new: NewPreset) -> Preset:
        self._compile(new.steering, "steering")
        if new.name in self.presets:
            raise Conflict(f"a preset named {new.name!r} exists", "name")
        preset = Preset(name=new.name, steering=new.steering, description=new.description, source="api")
        await self.call("admin", self.store.put_preset, preset.name, preset.model_dump(mode="json"))
        self.presets[preset.name] = preset
        return preset

    def get_preset(self, name: str) -> Preset:
        return self._presets.get(name)

    async def delete_preset(self, name: str) -> None:
        self._presets.check_removable(name)
        await self.call("admin", self.store.delete_preset, name)
        del self.presets[name]

    # -- experiments ---------------------------------------------------------------------
    async def create_experiment(self, new: NewExperiment) -> Experiment:
        variants = [self._resolve_variant(i, v) for i, v in enumerate(new.variants)]
        if new.name in self.experiments:
            raise Conflict(f"an experiment named {new.name!r} exists", "name")
        exp = Experiment(name=new.name, unit=new.unit, description=new.description,
                         variants=variants, status=new.status, id=uuid.uuid4().hex)
        await self.call("admin", self.store.put_experiment, exp.name,
                        exp.model_dump(mode="json", exclude={"created", "id"}), exp.status, exp.id)
        exp = exp.model_copy(update={"created": time.time()})
        self.experiments[exp.name] = exp
        return exp

    def get_experiment(self, name: str) -> Experiment:
        exp = self.experiments.get(name)
        if exp is None:
            raise NotFound(f"no experiment named {name!r}", "name")
        return exp

    async def patch_experiment(self, name: str, patch: ExperimentPatch) -> Experiment:
        exp = self.get_experiment(name)
        await self.call("admin", self.store.set_status, name, patch.status)
        exp = self.experiments[name] = exp.model_copy(update={"status": patch.status})
        return exp

    async def delete_experiment(self, name: str) -> None:
        self.get_experiment(name)
        await self.call("admin", self.store.delete_experiment, name)
        exp = self.experiments.pop(name)
        self.metrics.forget(name, (v.name for v in exp.variants))

    async def feedback(self, name: str, fb: Feedback) -> dict[str, Any]:
        exp = self.get_experiment(name)
        result = await self.call("feedback", self.store.record_feedback, exp.id or exp.name,
                                 fb.response_id, fb.score, fb.label)
        if result is None:
            raise NotFound(f"experiment {name!r} recorded no response {fb.response_id!r}", "response_id")
        status, variant = result
        if status == "created":
            self.metrics.feedback_received(name, variant)
        return {"object": "experiment.feedback", "experiment": name, "response_id": fb.response_id,
                "variant": variant, "score": fb.score, "label": fb.label, "status": status}

    async def results(self, name: str) -> dict[str, Any]:
        from server.experiments.stats import results

        exp = self.get_experiment(name)
        obs = await self.call("results", self.store.observations, exp.id or exp.name)
        return results(exp.model_dump(mode="json"), obs)

    # -- requests ------------------------------------------------------------------------
    def model_entries(self, created: int) -> list[dict[str, Any]]:
        """``/v1/models`` entries of the presets: ``<base>:<preset>`` with ``parent`` = base."""
        return [{"id": f"{base}:{name}", "object": "model", "created": created, "owned_by": "steer",
                 "parent": base, "root": base, "preset": name}
                for base in self.state.served_names for name in sorted(self.presets)]

    def route(self, req: Any, headers: Any, *, admin: bool = False) -> Routing:
        """Resolve presets / experiments of ``req`` in place (:func:`.routing.route`); ``admin``:
        the caller's key is an admin's (it may override an experiment variant's steering)."""
        return routing.route(req, headers, served_names=self.state.served_names,
                             presets=self.presets, experiments=self.experiments,
                             packs=self.state.packs, admin=admin)

    def finish(self, routed: Routing, job: Job, prompt_tokens: int,
               body: dict[str, Any] | None = None, *, outcome: str = "ok") -> None:
        """Add the ``experiment`` body field and record the exposure (off the event loop) with
        its ``outcome``: ``ok`` (completed), ``failed`` (an error ended it) or ``aborted`` (the
        client went away); an admin's override is recorded as ``excluded``. Only the first call
        for a response records. An exposure whose experiment was deleted (or replaced by a new
        one of the same name) since it was routed is counted as lost, never written."""
        if routed.experiment is None:
            return
        if body is not None:
            body["experiment"] = routed.body_field()
        if not routed.record or routed.finished:
            return
        routed.finished = True
        current = self.experiments.get(routed.experiment)
        if current is None or (current.id or current.name) != routed.experiment_id:
            self.metrics.exposure_lost("experiment_deleted")
            return
        e = recording.exposure(routed, job, prompt_tokens, "excluded" if routed.excluded else outcome)
        self.metrics.exposed(e)
        self.record(e)
