"""The engine runner: one admitted request's life in the engine — its deltas streamed, metrics
recorded, the engine request aborted if the iteration ends early (client gone, error,
cancellation; :func:`run`'s ``finally``), and what the workers hold for it read back.

Monitored requests (``steering.monitors``, :mod:`steering.monitors`): the workers keep each
monitor's result; :func:`run` reads it with the ``steering_monitor_events`` RPC when the
generation finishes (and, while monitored streams run, every ``MONITOR_POLL_S`` for all of them
in one RPC, :class:`MonitorPoller`, so a client hears of a trigger as it happens), counts
triggers, and reports a generation a ``stop`` monitor ended with ``finish_reason:
"content_filter"``. Post-steering activations (``steering.return_activations``) are read with
the ``steering_readout`` RPC (:func:`steering_activations`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server import vllm_env  # noqa: F401
from server.errors import CapacityExceeded, SteeringUnavailable
from steering.worker.readouts import READOUT_DROPPED
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput

if TYPE_CHECKING:
    from server.state import AppState
    from server.steering_limits import Held
    from steering.request import CompiledSteering

logger = logging.getLogger(__name__)

MONITOR_POLL_S = 0.1
"""While monitored requests stream, the workers' monitor results of all of them are read (one
collective RPC) this often."""
CONTENT_FILTER = "content_filter"
"""The finish_reason of a generation a ``stop`` monitor ended (as OpenAI reports filtered output)."""


@dataclass
class Job:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    compiled: CompiledSteering | None
    arrival: float = field(default_factory=time.monotonic)
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # filled from the first output
    captured: list[Any] = field(default_factory=list)  # ("resid", layer, position, stream) records
    generated_tokens: int = 0  # over all choices, counted in run()
    finish_reason: str | None = None  # the last one reported
    held: Held | None = None  # slot lease and readout bytes, from admission (server/steering_limits.py)
    echo: str | None = None  # the prompt text a completion with echo returns first
    echo_logprobs: dict[str, list[Any]] | None = None  # the echoed prompt's logprobs (echo + logprobs)
    live_monitors: bool = False  # poll monitor results while generating (a stream), not only at the end
    monitors: list[dict[str, Any]] | None = None  # ``steering.monitors`` of the response
    monitor_events: list[dict[str, Any]] = field(default_factory=list)  # fired, not yet streamed
    monitors_final: bool = False  # the workers' last word is in ``monitors``


async def run(state: AppState, job: Job) -> AsyncIterator[RequestOutput]:
    """Stream the engine's deltas, record metrics, abort if cut short.

    The steering slot was taken at admission (``job.held``, before any response started); it is
    freed here as soon as the generation ends — finished, or its abort sent. A steered request
    that a worker could not seat (it ran unsteered) ends in :class:`SteeringUnavailable` after
    its last delta (see steering/worker/slots.py)."""
    try:
        engine = state.require_engine()
    except BaseException:
        if job.held is not None:
            job.held.end_generation()
        raise
    m = state.metrics
    steered = "true" if job.compiled is not None else "false"
    prompt = TokensPrompt(prompt_token_ids=job.prompt_ids)
    if job.compiled is not None and job.compiled.cache_salt is not None:
        prompt["cache_salt"] = job.compiled.cache_salt
    monitored = job.compiled is not None and bool(job.compiled.monitors)
    m.running.inc()
    m.prompt_tokens.inc(len(job.prompt_ids))
    finished = False
    first_token = True
    last_seen: dict[int, float] = {}
    stream = engine.generate(prompt, job.params, job.request_id)
    poller = monitor_poller(engine) if monitored and job.live_monitors else None
    if poller is not None:
        poller.watch(state, job)
    try:
        async for out in stream:
            now = time.monotonic()
            for o in out.outputs:
                k = len(o.token_ids)
                if o.finish_reason is not None:
                    job.finish_reason = o.finish_reason
                if not k:
                    continue
                job.generated_tokens += k
                m.generated_tokens.inc(k)
                if first_token:
                    m.ttft.labels(steered).observe(now - job.arrival)
                    first_token = False
                prev = last_seen.get(o.index)
                if prev is not None:
                    for _ in range(k):
                        m.itl.labels(steered).observe((now - prev) / k)
                last_seen[o.index] = now
            finished = out.finished
            if monitored and finished:
                await final_monitors(state, job)
                if any(x["fired"] and x["action"] == "stop" for x in job.monitors or ()):
                    for o in out.outputs:
                        if o.finish_reason is not None:
                            o.finish_reason = job.finish_reason = CONTENT_FILTER
            yield out
        m.e2e.labels(steered).observe(time.monotonic() - job.arrival)
        held, limits = job.held, state.limits
        if finished and held is not None and held.steered and limits is not None \
                and await limits.unseated(job.request_id):
            raise SteeringUnavailable(
                "the engine could not apply this request's steering (no steering slot was "
                "free in a worker), so its output is withheld; retry the request")
    finally:
        m.running.dec()
        if poller is not None:
            poller.unwatch(job)
        try:
            if not finished:
                await stream.aclose()
                try:
                    await engine.abort(job.request_id)
                except Exception:  # noqa: BLE001  (engine gone: nothing left to abort)
                    logger.debug("abort of %s failed", job.request_id, exc_info=True)
        finally:
            if job.held is not None:  # after the abort was sent: the worker frees it first
                job.held.end_generation()


async def final_monitors(state: AppState, job: Job) -> None:
    """The workers' final monitor results of ``job`` (they forget them): ``job.monitors``."""
    per_rank = await state.require_engine().collective_rpc(
        "steering_monitor_events", args=([job.request_id], True))
    results = (per_rank[0] or {}).get(job.request_id) if per_rank else None
    if results is None:  # the workers never monitored it: a report would claim what nobody watched
        raise SteeringUnavailable("the engine did not report this request's monitors, so its "
                                  "output is withheld (monitors need the engine's op to run on "
                                  "every step: on a GPU, start the server with --enforce-eager)")
    _fold_monitors(state, job, results)
    job.monitors_final = True


def _fold_monitors(state: AppState, job: Job, results: list[dict[str, Any]]) -> None:
    """``results`` into ``job.monitors``; monitors that fired since the last read are queued in
    ``job.monitor_events`` (streamed) and counted (``steer_monitor_triggers``)."""
    assert job.compiled is not None
    seen = {i for i, m in enumerate(job.monitors or ()) if m["fired"]}
    job.monitors = job.compiled.monitor_report(results)
    for i, m in enumerate(job.monitors):
        if m["fired"] and i not in seen:
            job.monitor_events.append({"monitor": i, **m})
            state.metrics.monitor_triggered(m["feature"], m["action"])


class MonitorPoller:
    """Reads the monitor results of every monitored stream in flight with ONE collective RPC per
    ``MONITOR_POLL_S`` (however many streams), while there are any; one per engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.jobs: dict[str, tuple[AppState, Job]] = {}
        self.task: asyncio.Task[None] | None = None

    def watch(self, state: AppState, job: Job) -> None:
        self.jobs[job.request_id] = (state, job)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._loop())

    def unwatch(self, job: Job) -> None:
        self.jobs.pop(job.request_id, None)

    async def _loop(self) -> None:
        while self.jobs:
            await asyncio.sleep(MONITOR_POLL_S)
            keys = list(self.jobs)
            if not keys:
                return
            try:
                per_rank = await self.engine.collective_rpc("steering_monitor_events", args=(keys, False))
            except Exception:  # noqa: BLE001  (the final read of each request still reports)
                logger.debug("reading monitor results failed", exc_info=True)
                continue
            results = (per_rank[0] or {}) if per_rank else {}
            for key in keys:
                state, job = self.jobs.get(key, (None, None))
                if job is not None and not job.monitors_final and key in results:
                    _fold_monitors(state, job, results[key])


_POLLERS: weakref.WeakKeyDictionary[Any, MonitorPoller] = weakref.WeakKeyDictionary()


def monitor_poller(engine: Any) -> MonitorPoller:
    if engine not in _POLLERS:
        _POLLERS[engine] = MonitorPoller(engine)
    return _POLLERS[engine]


async def steering_activations(state: AppState, job: Job) -> list[dict[str, Any]] | None:
    """Post-steering activations per steered token, fetched from the workers after the request.

    One entry per (token position, layer): ``features`` maps each steered feature (or
    ``vectors[i]``) at that layer to act(h) after the op. Clamp/scale/ablate entries are read by
    the op itself; add-mode and lowrank features from the captured stream at their readout
    layer."""
    compiled = job.compiled
    if compiled is None or not compiled.return_activations:
        return None
    per_rank = await state.require_engine().collective_rpc("steering_readout", args=(job.request_id,))
    if job.held is not None:
        job.held.popped = True  # the workers no longer hold it
    if any(isinstance(r, str) and r == READOUT_DROPPED for r in per_rank):
        raise CapacityExceeded(
            "the server dropped this request's activations under memory pressure (readouts in "
            "flight exceeded the workers' cap); retry the request", "steering.return_activations",
            headers={"Retry-After": "1"})
    records = per_rank[0] or []  # every tensor-parallel rank computes the same values
    job.captured = [r for r in records if r[0] == "resid"]
    rows: dict[tuple[int, int], dict[str, float]] = {}
    for kind, layer, pos, values in records:
        feats = rows.setdefault((pos, layer), {})
        if kind == "act":
            feats.update((name, v) for name, v in zip(compiled.entry_labels.get(layer, []), values)
                         if name is not None)  # None: a lowrank row, read as a probe below
        else:
            for name, feat in compiled.probes:
                if feat.layer == layer:
                    feats[name] = float(feat.activation(values))
    return [{"position": pos, "layer": layer, "features": feats}
            for (pos, layer), feats in sorted(rows.items()) if feats]
