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
* replicas: servers sharing one database (PostgreSQL, or one SQLite file) serve each other's
  presets and experiments. Every ``store_refresh_s`` seconds (``--store-refresh-s``; 0: never)
  :meth:`ExperimentManager.refresh` asks the store for the revision of the definitions — one
  tiny query — and re-reads presets and experiments only when it changed (creations, status
  changes and deletions made through any server). A refreshed definition that does not compile
  on this server is handled as at start-up: logged, kept. A failing store keeps the last good
  definitions (logged once per outage, counted as ``op="refresh"``).

Over 400 lines because it is the one facade the routes and the request pipeline call: the
in-memory definitions, their checks against this engine, and the store calls all guard the
same state under one lock; the parts with no state of their own live in the modules named above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from server.config import DEFAULTS
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
    Definitions,
    ExperimentStore,
    Exposure,
    UnavailableStore,
    default_data_dir,
    redact,
)
from server.experiments.writer import QueueFull, StoreWriter, WriteLimits, WriterClosed
from server.experiments.custom import CustomFeatures
from steering.spec import SteeringError, SteeringSpec

if TYPE_CHECKING:
    from server.runner import Job
    from server.state import AppState

logger = logging.getLogger(__name__)


class NoAnswer(TimeoutError):
    """The store thread did not answer a call within ``call_timeout_s``."""


class ExperimentManager:
    """Owns presets, experiments, the store and the experiment metrics of one server."""

    def __init__(self, state: AppState, store: ExperimentStore | None = None,
                 limits: WriteLimits | None = None) -> None:
        self.state = state
        self.limits = limits or WriteLimits()
        cfg = state.config
        self._reopen: tuple[str | None, Path] | None = None
        """Where the store lives, kept when it could not be opened at start: the refresh loop
        retries the open (a database that comes up after the server is used once it does)."""
        data_dir = Path(getattr(cfg, "data_dir", None) or default_data_dir())
        if store is None:
            url = getattr(cfg, "experiments_db", None) or os.environ.get(DB_ENV) or None
            try:
                store = open_store(url, data_dir)
            except Exception as exc:  # noqa: BLE001  (serve anyway; count and log)
                logger.error("experiment store %s unavailable: %s", redact(url) if url else data_dir, exc)
                store = UnavailableStore(exc)
                self._reopen = (url, data_dir)
        self.store = store
        self.writer = StoreWriter(self.limits.max_pending)
        self.metrics = ExperimentMetrics(state.metrics.registry, lambda name: name in self.experiments)
        self._presets = Presets(*presets_file(cfg))
        self.custom = CustomFeatures(data_dir)
        """The workshop's custom features (rows of the store, served as the pack ``custom``)."""
        self.experiments: dict[str, Experiment] = {}
        """Name → experiment. A refresh replaces the dict (never changes it in place)."""
        self.refresh_s = float(getattr(cfg, "store_refresh_s", DEFAULTS.store_refresh_s) or 0.0)
        self._revision: int | None = None
        """The store's revision of the definitions held here (None: unknown, the next refresh
        reads them)."""
        self._local_edits = 0
        """Incremented by every change this server makes to its definitions: a refresh that read
        the store before such a change does not apply what it read."""
        self._refresh_failing = False
        self._refresh_task: asyncio.Task[None] | None = None
        self._skipped: set[str] = set()
        """Stored experiments that failed validation, logged once."""
        try:
            revision = store.revision()  # first: a change made while we read is seen next time
            self.custom.rows = store.list_features()
            self._presets.load(store.list_presets())
            self.experiments = self._validated(store.list_experiments())
            self._revision = revision
        except Exception as exc:  # noqa: BLE001
            self._store_failed("load", exc)

    @property
    def presets(self) -> dict[str, Preset]:
        """Name → preset (file and API)."""
        return self._presets.items

    def ready(self) -> None:
        """Once the compiler exists: validate the presets file (a bad preset in a --presets file
        stops the server; in the bundled file it is skipped) and the stored definitions (logged).
        Called on the event loop (the app's start-up), it also starts the refresh from the store
        (:meth:`start_refresh`)."""
        self.custom.install(self.state.packs)  # first: presets may steer custom features
        if self.state.compiler is not None:
            self._presets.check(self._compile)
            self._warn_uncompilable(self._presets.stored(), self.experiments.values())
        self.start_refresh()

    def _warn_uncompilable(self, presets: Any, experiments: Any) -> None:
        """Log the stored presets and the experiment variants that do not compile on this engine:
        they stay (a request that uses one gets the compiler's 400), as at start-up."""
        if self.state.compiler is None:
            return
        for preset in presets:
            try:
                self._compile(preset.steering, "steering")
            except (SteeringError, InvalidRequest) as exc:
                logger.warning("stored preset %r no longer compiles: %s", preset.name, exc)
        for exp in experiments:
            for i, v in enumerate(exp.variants):
                try:
                    self._compile(v.steering, f"variants.[{i}].steering")
                except (SteeringError, InvalidRequest) as exc:
                    logger.warning("experiment %r variant %r no longer compiles: %s", exp.name, v.name, exc)

    def _validated(self, rows: list[dict[str, Any]]) -> dict[str, Experiment]:
        """Name → experiment of the stored ``rows``; an invalid row is skipped (logged once)."""
        out: dict[str, Experiment] = {}
        for row in rows:
            try:
                exp = Experiment.model_validate(row)
            except ValidationError as exc:
                key = f"{row.get('name')}/{row.get('id')}"
                if key not in self._skipped:
                    self._skipped.add(key)
                    logger.warning("skipping stored experiment %r: %s", row.get("name"), exc)
                continue
            out[exp.name] = exp
        return out

    # -- replicas: refreshing the definitions from the store -------------------------------
    def start_refresh(self) -> None:
        """Start the periodic :meth:`refresh` on the running event loop (once; not when
        ``store_refresh_s`` is 0, the store is a stand-in that cannot be reopened, or no loop
        runs here)."""
        if self._refresh_task is not None or self.refresh_s <= 0 or self.writer.closing \
                or (isinstance(self.store, UnavailableStore) and self._reopen is None):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._refresh_task = loop.create_task(self._refresh_loop(), name="steer-store-refresh")

    async def _refresh_loop(self) -> None:
        while not self.writer.closing:
            await asyncio.sleep(self.refresh_s)
            try:
                if isinstance(self.store, UnavailableStore):
                    if not await self.reopen():
                        continue
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  (a bug here must not stop the refreshes)
                logger.exception("refreshing presets and experiments failed")

    async def reopen(self) -> bool:
        """Retry opening a store that could not be opened at start (on the store thread); True
        once it is open — the next refresh then reads every definition."""
        if self._reopen is None:
            return False
        url, data_dir = self._reopen
        try:
            store = await self._on_store(open_store, url, data_dir)
        except WriterClosed:
            return False
        except Exception as exc:  # noqa: BLE001  (still down: count it, try again next time)
            self.metrics.store_failed("open")
            logger.debug("experiment store still unavailable: %s", exc)
            return False
        self.store, self._reopen, self._revision = store, None, None
        logger.info("experiment store %s is available again",
                    redact(url) if url else data_dir)
        return True

    async def refresh(self) -> bool:
        """Re-read presets and experiments from the store if another server (or anyone) changed
        them since this one last read them: True when it applied a change. One small query when
        nothing changed. A failing store keeps the current definitions: the failure is counted
        (``op="refresh"``) and logged once until a refresh succeeds again."""
        edits = self._local_edits
        try:
            defs: Definitions = await self._on_store(self.store.definitions, self._revision)
        except WriterClosed:
            return False
        except Exception as exc:  # noqa: BLE001
            self.metrics.store_failed("refresh")
            if not self._refresh_failing:
                self._refresh_failing = True
                logger.error("experiment store refresh failed (serving the definitions last read; "
                             "logged once until it recovers): %s", exc)
            return False
        if self._refresh_failing:
            self._refresh_failing = False
            logger.info("experiment store refresh recovered")
        if not defs.changed:
            return False
        if edits != self._local_edits:
            return False  # this server changed a definition meanwhile: read again next time
        self._apply(defs)
        return True

    def _apply(self, defs: Definitions) -> None:
        """Serve the definitions ``defs`` read (replacing the dicts, never changing them in place:
        a request being routed keeps the view it started with)."""
        assert defs.presets is not None and defs.experiments is not None
        if defs.features is not None:
            self.custom.install(self.state.packs, defs.features)
        fresh_presets = self._presets.replace_stored(defs.presets)
        old, new = self.experiments, self._validated(defs.experiments)
        # New or changed ("created" aside: this server's own creation holds its own clock's).
        fresh = [e for name, e in new.items()
                 if name not in old or old[name].model_copy(update={"created": e.created}) != e]
        for name, exp in old.items():
            if name not in new or (new[name].id or name) != (exp.id or name):
                self.metrics.forget(name, (v.name for v in exp.variants))
        self.experiments = new
        self._revision = defs.revision
        if fresh_presets or fresh or len(new) != len(old):
            logger.info("presets and experiments refreshed from the store (revision %d): %d stored "
                        "presets, %d experiments", defs.revision, len(self._presets.stored()), len(new))
        self._warn_uncompilable(fresh_presets, fresh)

    def _edited(self) -> None:
        """This server changed its definitions: a refresh in flight must not apply what it read."""
        self._local_edits += 1

    # -- store access --------------------------------------------------------------------
    def _store_failed(self, op: str, exc: BaseException) -> None:
        self.metrics.store_failed(op)
        logger.error("experiment store %s failed: %s", op, exc)

    async def _on_store(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the store thread, waited for at most ``call_timeout_s``: its result,
        or QueueFull / WriterClosed / NoAnswer (the call is cancelled if it has not started)
        / the store's own exception."""
        fut = self.writer.submit(fn, *args)
        timeout = self.limits.call_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()
            raise NoAnswer(f"no answer within {timeout:g} s") from None

    async def call(self, op: str, fn: Any, *args: Any) -> Any:
        """Run a store method on the store thread and wait at most ``call_timeout_s`` for it;
        StoreUnavailable (503) if the queue is full, it fails or it does not answer in time (a
        call that timed out before it started never runs). The database's own error is logged,
        never sent."""
        try:
            return await self._on_store(fn, *args)
        except (QueueFull, WriterClosed) as exc:
            self._store_failed(op, exc)
            raise StoreUnavailable("the experiment store is busy; retry shortly") from None
        except NoAnswer as exc:
            self._store_failed(op, exc)
            timeout = self.limits.call_timeout_s
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
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                task.get_loop().call_soon_threadsafe(task.cancel)
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
        if not await self.call("admin", self.store.add_preset, preset.name, preset.model_dump(mode="json")):
            raise Conflict(f"a preset named {new.name!r} exists (made by another server)", "name")
        self._edited()
        self.presets[preset.name] = preset
        return preset

    def get_preset(self, name: str) -> Preset:
        return self._presets.get(name)

    async def delete_preset(self, name: str) -> None:
        self._presets.check_removable(name)
        await self.call("admin", self.store.delete_preset, name)
        self._edited()
        self.presets.pop(name, None)  # a refresh may have dropped it meanwhile

    # -- custom features (server/workshop/) ---------------------------------------------
    async def add_feature(self, row: dict[str, Any]) -> None:
        """Store a workshop feature (insert-only: 409 when the name is taken) and serve it."""
        if not await self.call("workshop", self.store.add_feature, row):
            raise Conflict(f"a custom feature named {row['name']!r} exists", "name")
        self._edited()
        rows = [r for r in self.custom.rows or [] if r["name"] != row["name"]]
        self.custom.install(self.state.packs, rows + [row])

    async def delete_feature(self, name: str) -> None:
        await self.call("workshop", self.store.delete_feature, name)
        self._edited()
        self.custom.install(self.state.packs, [r for r in self.custom.rows or [] if r["name"] != name])

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
        self._edited()
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
        self._edited()
        exp = self.experiments.get(name)  # the current one, should a refresh have run meanwhile
        if exp is None:  # ...and found it deleted (by another server): nothing was updated
            raise NotFound(f"no experiment named {name!r}", "name")
        exp = self.experiments[name] = exp.model_copy(update={"status": patch.status})
        return exp

    async def delete_experiment(self, name: str) -> None:
        self.get_experiment(name)
        await self.call("admin", self.store.delete_experiment, name)
        self._edited()
        exp = self.experiments.pop(name, None)  # a refresh may have dropped it meanwhile
        if exp is not None:
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
        """Resolve presets / experiments of ``req`` (:func:`.routing.route`); ``admin``:
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
