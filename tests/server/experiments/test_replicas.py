"""Replicas agree (issue #18): two real ``steer serve`` processes (the real engine on the bundled
model) on one throwaway PostgreSQL database. Presets and experiments created, paused and
deleted through replica A's admin API are served by replica B within a few seconds: the same
steering (``x-steering-hash``, the ``steering`` summary, the greedy text) for a preset model, the
same variant for the same user in an experiment (assignment is deterministic), and gone once
deleted. A custom feature made by A's workshop (issue #31) likewise steers on B, and goes.

Slow: two engines start side by side (eager mode, a short context, a few tokens per request).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from clients.launch import RunningServer, local_server
from server.experiments import assign

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-replicas-test"
OCEAN = Path(__file__).parents[3] / "docs/examples/workshop-ocean.json"
PORTS = range(18400, 18500)
REFRESH_S = 0.5
SEEN_WITHIN_S = 10.0
"""How long a change may take to reach the other replica (the interval plus a loaded machine's
slack); the observed time is printed."""


def _free_ports(n: int) -> list[int]:
    """``n`` ports of :data:`PORTS` that nothing listens on now."""
    out = []
    for port in PORTS:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            out.append(port)
            if len(out) == n:
                return out
    raise RuntimeError(f"no {n} free ports in {PORTS}")


@contextlib.contextmanager
def replicas(args: Sequence[str], n: int = 2) -> Iterator[list[RunningServer]]:
    """``n`` servers (:func:`clients.launch.local_server`) with ``args``, started side by side on
    ports of :data:`PORTS`; all stopped on leaving."""
    servers = [local_server(args, api_key=KEY) for _ in range(n)]
    with mock.patch("clients.launch.free_port", side_effect=_free_ports(n)), \
            ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(cm.__enter__) for cm in servers]
        outcomes = []
        for fut in futures:
            try:
                outcomes.append(fut.result())
            except BaseException as exc:  # noqa: BLE001  (stop the others, then raise)
                outcomes.append(exc)
    started = [(cm, s) for cm, s in zip(servers, outcomes) if not isinstance(s, BaseException)]
    try:
        for s in outcomes:
            if isinstance(s, BaseException):
                raise s
        yield [s for _, s in started]
    finally:
        for cm, _ in started:
            cm.__exit__(None, None, None)


def call(srv: RunningServer, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{srv.url}{path}", json=body, headers=srv.headers, timeout=300)


def chat(srv: RunningServer, model: str, **extra: Any) -> httpx.Response:
    return call(srv, "POST", "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Tell me about your day."}],
        "max_tokens": 4, "temperature": 0, **extra})


def models(srv: RunningServer) -> set[str]:
    r = call(srv, "GET", "/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def eventually(check, what: str) -> float:
    """Poll ``check()`` until it is true; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < SEEN_WITHIN_S, f"{what}: not seen within {SEEN_WITHIN_S:g} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def user_for(name: str, variant_index: int) -> str:
    return next(f"u{i}" for i in range(1000) if assign.assign(name, f"user:u{i}", [1, 1]) == variant_index)


def workshop_feature_reaches_the_other_replica(a: RunningServer, b: RunningServer) -> None:
    """Issue #31: a feature made by A's workshop (docs/examples/workshop-ocean.json) steers on A at
    once and on B within the refresh interval, the same way; deleted through A, gone from B. The
    job is polled through B (its record in PostgreSQL), as a load balancer would send the polls."""
    body = {**json.loads(OCEAN.read_text()), "name": f"ocean{uuid.uuid4().hex[:6]}", "calibrate": False}
    feature = f"custom/{body['name']}"
    r = call(a, "POST", "/v1/features", body)
    assert r.status_code == 202, r.text
    t0 = time.monotonic()
    job_id = r.json()["id"]
    while (job := call(b, "GET", f"/v1/features/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() - t0 < 600, job
        time.sleep(0.5)
    assert job["status"] == "done", job
    assert job == call(a, "GET", f"/v1/features/jobs/{job_id}").json()  # A's own record, the same
    print(f"workshop job done in {time.monotonic() - t0:.1f} s")
    seen = eventually(lambda: call(b, "GET", f"/v1/features/{feature}").status_code == 200, "the feature on B")
    print(f"custom feature served by B {seen:.2f} s after A finished")
    steer = {"steering": {"features": {feature: 1.0}}, "max_tokens": 8}
    ra, rb = chat(a, MODEL, **steer), chat(b, MODEL, **steer)
    assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
    assert ra.headers["x-steering-hash"] == rb.headers["x-steering-hash"]
    assert ra.json()["choices"][0]["message"]["content"] == rb.json()["choices"][0]["message"]["content"]
    plain = chat(a, MODEL, max_tokens=8)
    assert plain.json()["choices"][0]["message"]["content"] != ra.json()["choices"][0]["message"]["content"]
    assert call(a, "DELETE", f"/v1/features/{feature}").status_code == 200
    eventually(lambda: call(b, "GET", f"/v1/features/{feature}").status_code == 404, "the deletion on B")
    r = chat(b, MODEL, **steer)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_feature", r.text


def test_two_real_replicas_on_one_postgres_agree(pg_cluster):
    db = pg_cluster.create_db()
    args = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--api-key", KEY,
            "--experiments-db", pg_cluster.url(db), "--store-refresh-s", str(REFRESH_S))
    t_start = time.monotonic()
    try:
        with replicas(args) as (a, b):
            t_up = time.monotonic()
            print(f"\ntwo servers up in {t_up - t_start:.1f} s")
            preset = f"calm-{uuid.uuid4().hex[:6]}"
            exp = f"tone-{uuid.uuid4().hex[:6]}"
            preset_model, exp_model = f"{MODEL}:{preset}", f"{MODEL}:exp/{exp}"
            assert preset_model not in models(b)

            # Created through A...
            r = call(a, "POST", "/v1/presets", {"name": preset, "description": "calm",
                                                "steering": {"features": {"enthusiasm": -1.0}}})
            assert r.status_code == 200, r.text
            t0 = time.monotonic()
            r = call(a, "POST", "/v1/experiments", {"name": exp, "unit": "user", "variants": [
                {"name": "control", "control": True}, {"name": "calm", "preset": preset}]})
            assert r.status_code == 200, r.text
            created = r.json()
            # ...served by B.
            seen = eventually(lambda: preset_model in models(b), "the preset on B")
            seen = max(seen, eventually(lambda: call(b, "GET", f"/v1/experiments/{exp}").status_code == 200,
                                        "the experiment on B"))
            print(f"created on A, served by B after {time.monotonic() - t0:.2f} s "
                  f"(refresh every {REFRESH_S:g} s)")
            got = call(b, "GET", f"/v1/experiments/{exp}").json()
            assert (got["id"], got["variants"], got["status"]) == \
                (created["id"], created["variants"], "running")

            # The preset steers the same way on both.
            ra, rb = chat(a, preset_model), chat(b, preset_model)
            assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
            assert ra.headers["x-steering-hash"] == rb.headers["x-steering-hash"]
            assert ra.json()["steering"] == rb.json()["steering"]
            assert ra.json()["model"] == rb.json()["model"] == preset_model
            assert ra.json()["choices"][0]["message"]["content"] == \
                rb.json()["choices"][0]["message"]["content"]
            preset_hash = rb.headers["x-steering-hash"]

            # The same user gets the same variant (and the same steering) on both.
            for k, variant in enumerate(("control", "calm")):
                user = user_for(exp, k)
                ra, rb = chat(a, exp_model, user=user), chat(b, exp_model, user=user)
                assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
                assert ra.headers["x-steer-variant"] == rb.headers["x-steer-variant"] == variant
                assert ra.headers.get("x-steering-hash") == rb.headers.get("x-steering-hash")
                assert ra.json()["experiment"] == rb.json()["experiment"] == \
                    {"name": exp, "variant": variant}
                if variant == "calm":  # the variant's steering is the preset's
                    assert rb.headers["x-steering-hash"] == preset_hash
                else:
                    assert "x-steering-hash" not in rb.headers

            # Paused through A: B serves the control.
            r = call(a, "PATCH", f"/v1/experiments/{exp}", {"status": "paused"})
            assert r.status_code == 200, r.text
            eventually(lambda: call(b, "GET", f"/v1/experiments/{exp}").json()["status"] == "paused",
                       "the pause on B")
            rb = chat(b, exp_model, user=user_for(exp, 1))
            assert rb.status_code == 200 and rb.headers["x-steer-variant"] == "control", rb.text

            # Deleted through A: gone from B.
            assert call(a, "DELETE", f"/v1/experiments/{exp}").status_code == 200
            assert call(a, "DELETE", f"/v1/presets/{preset}").status_code == 200
            t0 = time.monotonic()
            eventually(lambda: preset_model not in models(b), "the preset's deletion on B")
            eventually(lambda: call(b, "GET", f"/v1/experiments/{exp}").status_code == 404,
                       "the experiment's deletion on B")
            print(f"deleted on A, gone from B after {time.monotonic() - t0:.2f} s")
            for model in (preset_model, exp_model):
                r = chat(b, model)
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            workshop_feature_reaches_the_other_replica(a, b)
            metrics = httpx.get(f"{b.url}/metrics", timeout=30).text
            assert 'steer_experiment_store_errors_total{op="refresh"}' not in metrics
            t_done = time.monotonic()
        print(f"checks {t_done - t_up:.1f} s; total with shutdown {time.monotonic() - t_start:.1f} s")
    finally:
        pg_cluster.drop_db(db)
