"""Engine-free: two servers (the real app over a fake engine) sharing one store — one SQLite file,
then one throwaway PostgreSQL database (the ``backend`` fixture) — serve each other's presets and
experiments within the refresh interval: created, paused and deleted through one, seen by the
other. A refresh that finds nothing new reads nothing more; a failing store keeps the last good
definitions; a definition that does not compile here is kept and logged, as at start-up; a
refresh that read the store before this server's own change never undoes it."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import fakes
from fakes import AUTH, KEY, MODEL, load_parts
from server.app import AppState, create_app
from server.config import ServeConfig
from server.experiments import assign
from server.experiments.manager import ExperimentManager
from server.experiments.models import NewPreset

REFRESH_S = 0.2
SEEN_WITHIN_S = REFRESH_S + 3.0
"""How long a change may take to show on the other replica (the interval plus a slow CI's slack)."""


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


@dataclass
class Replica:
    state: AppState
    client: httpx.AsyncClient

    @property
    def mgr(self) -> ExperimentManager:
        return self.state.experiments

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path, headers=AUTH)

    async def chat(self, **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "temperature": 0, **extra}
        return await self.client.post("/v1/chat/completions", json=body, headers=AUTH)

    async def models(self) -> set[str]:
        r = await self.get("/v1/models")
        assert r.status_code == 200, r.text
        return {m["id"] for m in r.json()["data"]}


@pytest.fixture
async def replicas(parts, backend, tmp_path) -> AsyncIterator[list[Replica]]:
    """Two apps over one database, each refreshing every REFRESH_S on this test's loop."""
    out = []
    for i in range(2):
        state = fakes.make_state(parts, tmp_path / f"r{i}",
                                 ServeConfig(api_key=KEY, store_refresh_s=REFRESH_S))
        state.experiments = ExperimentManager(state, store=backend.open())
        app = create_app(state)  # no lifespan: the fake engine stands in
        state.experiments.ready()  # on the running loop: starts the refresh
        out.append(Replica(state, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                    base_url=f"http://replica{i}")))
    try:
        yield out
    finally:
        for r in out:
            await r.client.aclose()
            r.mgr.close()
        await asyncio.sleep(0.01)  # let the cancelled refresh loops end


async def eventually(check, within: float = SEEN_WITHIN_S) -> float:
    """Poll ``check()`` (a coroutine returning a truthy value once it holds) until it holds; the
    seconds it took (AssertionError after ``within``)."""
    t0 = time.monotonic()
    while True:
        last = await check()
        if last:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"not seen within {within:g} s: {last!r}"
        await asyncio.sleep(0.02)


def user_for(name: str, variant_index: int) -> str:
    return next(f"u{i}" for i in range(1000) if assign.assign(name, f"user:u{i}", [1, 1]) == variant_index)


def metric(state: AppState, sample: str) -> float:
    for line in state.metrics.exposition().decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


async def test_preset_created_and_deleted_on_one_is_served_by_the_other(replicas):
    a, b = replicas
    name = f"calm-{uuid.uuid4().hex[:6]}"
    model = f"{MODEL}:{name}"
    r = await a.client.post("/v1/presets", headers=AUTH, json={
        "name": name, "description": "calm", "steering": {"features": {"enthusiasm": -0.75}}})
    assert r.status_code == 200, r.text

    async def b_lists_it():
        return model in await b.models()
    latency = await eventually(b_lists_it)
    print(f"[{b.mgr.store.__class__.__name__}] preset seen by the other replica after {latency:.2f} s")
    got = (await b.get(f"/v1/presets/{name}")).json()
    assert (got["source"], got["description"]) == ("api", "calm")
    ra, rb = await a.chat(model=model), await b.chat(model=model)
    assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
    assert ra.headers["x-steering-hash"] == rb.headers["x-steering-hash"]
    assert rb.json()["steering"] == ra.json()["steering"] and rb.json()["model"] == model

    r = await a.client.delete(f"/v1/presets/{name}", headers=AUTH)
    assert r.status_code == 200, r.text

    async def b_dropped_it():
        return model not in await b.models()
    await eventually(b_dropped_it)
    r = await b.chat(model=model)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert (await b.get(f"/v1/presets/{name}")).status_code == 404
    # The bundled presets stay on both.
    assert f"{MODEL}:pirate" in await b.models() and f"{MODEL}:pirate" in await a.models()


async def test_experiment_created_paused_and_deleted_on_one_is_seen_by_the_other(replicas):
    a, b = replicas
    name = f"tone-{uuid.uuid4().hex[:6]}"
    spec = {"name": name, "unit": "user", "variants": [
        {"name": "control", "weight": 1, "control": True},
        {"name": "pirate", "preset": "pirate", "weight": 1}]}
    r = await a.client.post("/v1/experiments", headers=AUTH, json=spec)
    assert r.status_code == 200, r.text
    created = r.json()

    async def b_has_it():
        r = await b.get(f"/v1/experiments/{name}")
        return r.status_code == 200 and r.json()
    await eventually(b_has_it)
    got = (await b.get(f"/v1/experiments/{name}")).json()
    assert (got["id"], got["variants"], got["status"]) == (created["id"], created["variants"], "running")
    assert f"{MODEL}:exp/{name}" in {m for m in got["models"]}

    # Deterministic assignment: the same user gets the same variant (and steering) on both.
    for k, variant in enumerate(("control", "pirate")):
        user = user_for(name, k)
        ra = await a.chat(user=user, steering={"experiment": name})
        rb = await b.chat(user=user, model=f"{MODEL}:exp/{name}")
        assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
        assert ra.headers["x-steer-variant"] == rb.headers["x-steer-variant"] == variant
        assert ra.headers.get("x-steering-hash") == rb.headers.get("x-steering-hash")
        assert ra.json()["experiment"] == rb.json()["experiment"] == {"name": name, "variant": variant}

    # Paused on A: B serves the control to everyone, and records nothing.
    r = await a.client.patch(f"/v1/experiments/{name}", headers=AUTH, json={"status": "paused"})
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text

    async def b_paused():
        return (await b.get(f"/v1/experiments/{name}")).json()["status"] == "paused"
    await eventually(b_paused)
    rb = await b.chat(user=user_for(name, 1), steering={"experiment": name})
    assert rb.status_code == 200 and rb.headers["x-steer-variant"] == "control", rb.text

    # Running again on B: A sees it.
    r = await b.client.patch(f"/v1/experiments/{name}", headers=AUTH, json={"status": "running"})
    assert r.status_code == 200, r.text

    async def a_running():
        return (await a.get(f"/v1/experiments/{name}")).json()["status"] == "running"
    await eventually(a_running)

    # Deleted on A: gone from B, and its metrics labels are freed there.
    r = await a.client.delete(f"/v1/experiments/{name}", headers=AUTH)
    assert r.status_code == 200, r.text

    async def b_dropped_it():
        return (await b.get(f"/v1/experiments/{name}")).status_code == 404
    await eventually(b_dropped_it)
    r = await b.chat(user="alice", steering={"experiment": name})
    assert r.status_code == 404, r.text
    r = await b.chat(model=f"{MODEL}:exp/{name}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert name not in b.mgr.metrics._labelled
    assert 'steer_experiment_requests_total{experiment="%s"' % name not in \
        b.state.metrics.exposition().decode()


async def test_a_refresh_that_finds_no_change_reads_nothing_more(replicas):
    a, b = replicas
    calls: list[str] = []
    for meth in ("list_presets", "list_experiments"):
        orig = getattr(b.mgr.store, meth)

        def spy(*args, _orig=orig, _name=meth):
            calls.append(_name)
            return _orig(*args)
        setattr(b.mgr.store, meth, spy)
    await asyncio.sleep(REFRESH_S * 5)  # several refreshes: nothing changed
    assert calls == []
    assert await b.mgr.refresh() is False and calls == []
    await a.mgr.create_preset(NewPreset(name="quiet", steering={"features": {"enthusiasm": -0.5}}))
    await eventually(lambda: _has_preset(b, "quiet"))
    assert sorted(set(calls)) == ["list_experiments", "list_presets"]


async def _has_preset(r: Replica, name: str) -> bool:
    return name in r.mgr.presets


async def test_a_failing_store_keeps_the_last_definitions_logs_once_and_counts(replicas, caplog):
    a, b = replicas
    await a.mgr.create_preset(NewPreset(name="before", steering={"features": {"enthusiasm": -0.5}}))
    await eventually(lambda: _has_preset(b, "before"))
    real = b.mgr.store.definitions

    def broken(*_):
        raise sqlite3.OperationalError("disk I/O error")
    b.mgr.store.definitions = broken
    caplog.set_level(logging.INFO, logger="server.experiments.manager")
    await a.mgr.create_preset(NewPreset(name="during", steering={"features": {"enthusiasm": 0.5}}))
    await asyncio.sleep(REFRESH_S * 4)
    for _ in range(3):
        assert await b.mgr.refresh() is False
    assert "before" in b.mgr.presets and "during" not in b.mgr.presets  # the last good state
    assert metric(b.state, 'steer_experiment_store_errors_total{op="refresh"}') >= 3
    r = await b.chat(model=f"{MODEL}:before")  # still served
    assert r.status_code == 200, r.text
    failed = [x for x in caplog.records if "refresh failed" in x.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR, [x.getMessage() for x in failed]
    assert "disk I/O error" in failed[0].getMessage()

    b.mgr.store.definitions = real  # the store is back
    await eventually(lambda: _has_preset(b, "during"))
    assert any("refresh recovered" in x.getMessage() for x in caplog.records)


async def test_a_refreshed_definition_that_does_not_compile_here_is_kept_and_logged(replicas, backend,
                                                                                   caplog):
    """As at start-up: a stored preset or variant that this server's packs cannot compile is
    logged and kept; a request that uses it gets the compiler's 400."""
    a, b = replicas
    caplog.set_level(logging.WARNING, logger="server.experiments.manager")
    other = backend.open()  # a server with other packs wrote these
    try:
        other.add_preset("alien", {"name": "alien", "steering": {"features": {"no_such_feature": 1.0}}})
        other.put_experiment("alien-exp", {"name": "alien-exp", "unit": "user", "variants": [
            {"name": "control", "control": True, "weight": 1.0},
            {"name": "odd", "weight": 1.0, "steering": {"features": {"no_such_feature": 1.0}}}]},
            "running", uuid.uuid4().hex)
    finally:
        other.close()
    for r in (a, b):
        await eventually(lambda: _has_preset(r, "alien"))
        await eventually(lambda: _has_experiment(r, "alien-exp"))
    logged = [x.getMessage() for x in caplog.records]
    assert any("stored preset 'alien' no longer compiles" in m for m in logged), logged
    assert any("experiment 'alien-exp' variant 'odd' no longer compiles" in m for m in logged), logged
    r = await b.chat(model=f"{MODEL}:alien")
    assert r.status_code == 400 and "no_such_feature" in r.text, r.text
    # Logged once by each replica, not at every refresh.
    await asyncio.sleep(REFRESH_S * 4)
    again = [x.getMessage() for x in caplog.records]
    assert sum("stored preset 'alien'" in m for m in again) == 2, again
    assert sum("variant 'odd'" in m for m in again) == 2, again


async def _has_experiment(r: Replica, name: str) -> bool:
    return name in r.mgr.experiments


async def test_a_refresh_read_before_a_local_change_never_undoes_it(replicas):
    """The refresh's read runs on the store thread before this server's own write, and its
    answer is applied after the write's: the local change stays (and the next refresh reads
    the store again)."""
    a, b = replicas
    await a.mgr.create_preset(NewPreset(name="from-a", steering={"features": {"enthusiasm": -0.5}}))
    written = asyncio.Event()
    on_store = b.mgr._on_store

    async def late_answer(fn, *args):
        result = await on_store(fn, *args)
        if fn == b.mgr.store.definitions:
            await written.wait()  # the create below has updated the presets by now
        return result
    b.mgr._on_store = late_answer

    async def create():
        try:
            await b.mgr.create_preset(NewPreset(name="from-b", steering={"features": {"enthusiasm": 0.5}}))
        finally:
            written.set()
    refreshed, _ = await asyncio.gather(b.mgr.refresh(), create())
    assert refreshed is False  # what it read predates "from-b": not applied
    assert "from-b" in b.mgr.presets
    del b.mgr._on_store
    await eventually(lambda: _has_preset(b, "from-a"))
    assert {"from-a", "from-b"} <= set(b.mgr.presets)
    await eventually(lambda: _has_preset(a, "from-b"))


async def test_in_flight_request_keeps_its_routing_when_its_experiment_is_deleted(replicas):
    """A request routed before a refresh removed its experiment keeps its steering; its exposure
    is counted as lost (``experiment_deleted``) exactly as after a local deletion."""
    a, b = replicas
    name = f"gone-{uuid.uuid4().hex[:6]}"
    r = await a.client.post("/v1/experiments", headers=AUTH, json={
        "name": name, "variants": [{"name": "control", "control": True},
                                   {"name": "pirate", "preset": "pirate"}]})
    assert r.status_code == 200, r.text
    await eventually(lambda: _has_experiment(b, name))
    from server.protocol import parse_chat

    req = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                      "user": user_for(name, 1), "steering": {"experiment": name}})
    routed = b.mgr.route(req, {})
    steering = routed.steering
    assert routed.variant == "pirate" and steering is not None
    await a.mgr.delete_experiment(name)
    await eventually(lambda: _lacks_experiment(b, name))
    assert routed.steering is steering  # untouched by the refresh
    job = type("Job", (), {"request_id": "chatcmpl-x", "arrival": time.monotonic(),
                           "generated_tokens": 4, "finish_reason": "length"})()
    body: dict[str, Any] = {}
    b.mgr.finish(routed, job, 3, body)
    assert body["experiment"] == {"name": name, "variant": "pirate"}
    assert metric(b.state, 'steer_experiment_exposures_lost_total{reason="experiment_deleted"}') == 1


async def _lacks_experiment(r: Replica, name: str) -> bool:
    return name not in r.mgr.experiments


def test_refresh_flag_and_off_switch(parts, tmp_path):
    from server.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--store-refresh-s", "0.5"])
    assert config_from_args(args).store_refresh_s == 0.5
    assert config_from_args(build_parser().parse_args(["serve"])).store_refresh_s == \
        ServeConfig().store_refresh_s == 2.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--store-refresh-s", bad])

    async def started(refresh_s: float) -> bool:
        state = fakes.make_state(parts, tmp_path / str(refresh_s),
                                 ServeConfig(api_key=KEY, store_refresh_s=refresh_s))
        create_app(state)
        state.experiments.ready()
        running = state.experiments._refresh_task is not None
        state.experiments.close()
        await asyncio.sleep(0.01)
        return running
    assert asyncio.run(started(0)) is False
    assert asyncio.run(started(1.0)) is True


async def test_a_store_down_at_start_is_reopened_by_the_refresh(parts, tmp_path):
    """A store that could not be opened at start (here: its data dir is a file) is retried every
    interval; once it opens, this server reads what another server stored and takes writes."""
    data = tmp_path / "data"
    data.write_text("not a directory: the store cannot be opened")
    state = fakes.make_state(parts, data, ServeConfig(api_key=KEY, store_refresh_s=REFRESH_S))
    state.experiments = ExperimentManager(state)
    app = create_app(state)
    state.experiments.ready()
    down = Replica(state, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://down"))
    body = {"name": "calm", "steering": {"features": {"enthusiasm": -0.75}}}
    other = None
    try:
        assert (await down.client.post("/v1/presets", headers=AUTH, json=body)).status_code == 503
        data.unlink()
        other_state = fakes.make_state(parts, data, ServeConfig(api_key=KEY, store_refresh_s=0))
        other_state.experiments = other = ExperimentManager(other_state)
        other_app = create_app(other_state)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other_app), base_url="http://up") as up:
            assert (await up.post("/v1/presets", headers=AUTH, json=body)).status_code == 200

        async def served():
            return f"{MODEL}:calm" in await down.models()
        await eventually(served)
        r = await down.client.post("/v1/presets", headers=AUTH, json={**body, "name": "calmer"})
        assert r.status_code == 200, r.text
        assert metric(state, 'steer_experiment_store_errors_total{op="load"}') >= 1  # counted at start
    finally:
        await down.client.aclose()
        state.experiments.close()
        if other is not None:
            other.close()
        await asyncio.sleep(0.01)
