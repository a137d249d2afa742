"""Engine-free HTTP tests of presets and experiments: the real app and steering compiler (bundled
packs) over a fake engine, a temporary data directory, and an injected failing store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import AppState, create_app
from server.experiments import assign
from server.experiments.manager import ExperimentManager
from server.experiments.backend import open_store
from server.experiments.store import SQLiteStore

import fakes
from fakes import AUTH, KEY, MODEL, load_parts


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


def make_state(parts: dict[str, Any], data_dir: Path, store: Any = None) -> AppState:
    state = fakes.make_state(parts, data_dir)
    if store is not None:
        state.experiments = ExperimentManager(state, store=store)
    return state


@pytest.fixture
def api(parts, tmp_path) -> Iterator[tuple[TestClient, AppState]]:
    state = make_state(parts, tmp_path)
    app = create_app(state)  # no lifespan: the fake engine stands in
    state.experiments.ready()
    with_client = TestClient(app)
    yield with_client, state
    state.experiments.close()


def chat(client: TestClient, _headers: dict[str, str] | None = None, **extra: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body, headers={**AUTH, **(_headers or {})})


def two_variant(name: str = "tone-test", **kw: Any) -> dict[str, Any]:
    return {"name": name, "unit": "user", "variants": [
        {"name": "control", "weight": 1, "control": True},
        {"name": "pirate", "preset": "pirate", "weight": 1}], **kw}


def user_for(name: str, variant_index: int, weights=(1, 1)) -> str:
    return next(f"u{i}" for i in range(1000)
                if assign.assign(name, f"user:u{i}", list(weights)) == variant_index)


def test_bundled_presets_listed_as_models(api):
    client, _ = api
    ids = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    for p in ("formal", "friendly", "no-hedging", "pirate"):
        assert ids[f"{MODEL}:{p}"]["parent"] == MODEL
    presets = {p["name"]: p for p in client.get("/v1/presets", headers=AUTH).json()["data"]}
    assert presets["pirate"]["steering"] == {"features": {"pirate": 1.5}}
    assert presets["pirate"]["source"] == "file"


def test_preset_model_and_merge_rule(api):
    client, state = api
    r = chat(client, model=f"{MODEL}:formal")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == f"{MODEL}:formal"
    applied = {a["feature"]: a["strength"] for a in r.json()["steering"]["applied"]}
    assert applied == {"smollm2-tone/formality": 1.0, "smollm2-tone/humor": -0.5}
    r = chat(client, model=f"{MODEL}:formal", steering={"features": {"formality": 0.25, "pirate": 0.5}})
    applied = {a["feature"]: a["strength"] for a in r.json()["steering"]["applied"]}
    assert applied == {"smollm2-tone/formality": 0.25, "smollm2-tone/humor": -0.5,
                       "smollm2-tone/pirate": 0.5}
    # Names are matched after resolution: a qualified name overrides the preset's bare one.
    r = chat(client, model=f"{MODEL}:formal", steering={"features": {"smollm2-tone/formality": -0.25}})
    applied = {a["feature"]: a["strength"] for a in r.json()["steering"]["applied"]}
    assert applied == {"smollm2-tone/formality": -0.25, "smollm2-tone/humor": -0.5}
    r = chat(client, model=f"{MODEL}:formal", steering={"features": {"no_such": 1.0}})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "steering.features.no_such")
    r = chat(client, model=f"{MODEL}:nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_preset_admin_and_bad_inputs(api, parts, tmp_path):
    client, _ = api
    ok = {"name": "calm", "steering": {"features": {"enthusiasm": -1.0}}, "description": "calm"}
    r = client.post("/v1/presets", json=ok, headers=AUTH)
    assert r.status_code == 200 and r.json()["models"] == [f"{MODEL}:calm"]
    cases = [
        (ok, 409, "name"),
        ({**ok, "name": "bad name"}, 400, "name"),
        ({"name": "x"}, 400, "steering"),
        ({"name": "x", "steering": {"features": {"no_such": 1.0}}}, 400, "steering.features.no_such"),
        ({"name": "x", "steering": {"features": {"pirate": 99.0}}}, 400, "steering.features.pirate"),
        ({"name": "x", "steering": {}}, 400, "steering"),
        ({"name": "x", "steering": {"features": {"pirate": 1}}, "extra": 1}, 400, "extra"),
    ]
    for body, status, param in cases:
        r = client.post("/v1/presets", json=body, headers=AUTH)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.text)
    r = client.delete("/v1/presets/pirate", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert client.delete("/v1/presets/nope", headers=AUTH).status_code == 404
    assert client.post("/v1/presets", json=ok).status_code == 401

    # Persisted: a restarted server (same data dir) still has it; then it can be deleted.
    state2 = make_state(parts, tmp_path)
    c2 = TestClient(create_app(state2))
    assert "calm" in {p["name"] for p in c2.get("/v1/presets", headers=AUTH).json()["data"]}
    assert c2.delete("/v1/presets/calm", headers=AUTH).json()["deleted"] is True
    assert "calm" not in state2.experiments.presets
    state2.experiments.close()


def test_experiment_bad_inputs(api):
    client, _ = api
    control = {"name": "c", "control": True}
    cases = [
        ({"name": "e", "variants": []}, "variants"),
        ({"name": "e"}, "variants"),
        ({"name": "e", "variants": [control, {"name": "t", "weight": 0}]}, "variants.[1].weight"),
        ({"name": "e", "variants": [control, {"name": "t", "weight": -1}]}, "variants.[1].weight"),
        ({"name": "e", "variants": [control, {"name": "c", "weight": 1}]}, "variants.[1].name"),
        ({"name": "e", "variants": [{"name": "a"}, {"name": "b"}]}, "variants"),
        ({"name": "e", "variants": [control, {**control, "name": "d"}]}, "variants"),
        ({"name": "e", "variants": [control, {"name": "t", "steering": {"features": {"zzz": 1}}}]},
         "variants.[1].steering.features.zzz"),
        ({"name": "e", "variants": [control, {"name": "t", "steering": {"vectors": [{"layer": 99, "values": [0.0]}]}}]},
         "variants.[1].steering.vectors[0].layer"),
        ({"name": "e", "variants": [control, {"name": "t", "preset": "nope"}]}, "variants.[1].preset"),
        ({"name": "e", "unit": "team", "variants": [control]}, "unit"),
        ({"name": "e", "status": "done", "variants": [control]}, "status"),
        ({"name": "e/x", "variants": [control]}, "name"),
    ]
    for body, param in cases:
        r = client.post("/v1/experiments", json=body, headers=AUTH)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), (body, r.text)
    assert client.post("/v1/experiments", json=two_variant(), headers=AUTH).status_code == 200
    r = client.post("/v1/experiments", json=two_variant(), headers=AUTH)
    assert r.status_code == 409
    for path, status, param in (("/v1/experiments/nope", 404, "name"),
                                ("/v1/experiments/nope/results", 404, "name")):
        r = client.get(path, headers=AUTH)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param)
    r = client.patch("/v1/experiments/tone-test", json={"status": "finished"}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "status")
    r = client.patch("/v1/experiments/tone-test", json={"variants": []}, headers=AUTH)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "variants")
    r = chat(client, steering={"experiment": "nope"})
    assert (r.status_code, r.json()["error"]["param"]) == (404, "steering.experiment")
    r = chat(client, model=f"{MODEL}:exp/nope")
    assert (r.status_code, r.json()["error"]["param"]) == (404, "model")
    r = chat(client, model=f"{MODEL}:exp/tone-test", steering={"experiment": "other"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "steering.experiment")


def test_assignment_headers_feedback_results_and_restart(backend, parts, tmp_path):
    """Over SQLite and PostgreSQL: assignment, headers, feedback, results, then a restart."""
    state = make_state(parts, tmp_path, store=backend.open())
    client = TestClient(create_app(state))
    state.experiments.ready()
    assert client.post("/v1/experiments", json=two_variant(), headers=AUTH).status_code == 200
    u_control, u_pirate = user_for("tone-test", 0), user_for("tone-test", 1)
    ids = {}
    for user, variant in ((u_control, "control"), (u_pirate, "pirate")):
        for _ in range(3):
            r = chat(client, user=user, steering={"experiment": "tone-test"})
            assert r.status_code == 200, r.text
            assert r.headers["x-steer-experiment"] == "tone-test"
            assert r.headers["x-steer-variant"] == variant
            assert r.json()["experiment"] == {"name": "tone-test", "variant": variant}
            ids.setdefault(variant, []).append(r.json()["id"])
    # The variant's steering reached the engine; the control's did not.
    assert state.engine.seen[0] is None and state.engine.seen[-1] is not None
    # Header unit and model-name entry.
    r = chat(client, model=f"{MODEL}:exp/tone-test", _headers={"x-steer-user": u_pirate})
    assert r.headers["x-steer-variant"] == "pirate" and r.json()["model"] == f"{MODEL}:exp/tone-test"
    # Streaming is tagged by headers and recorded too.
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True, "user": u_control, "steering": {"experiment": "tone-test"}}) as s:
        assert s.headers["x-steer-variant"] == "control"
        assert "".join(s.iter_text()).endswith("data: [DONE]\n\n")

    scores = {"control": [1, 2, 3], "pirate": [4, 5, 4.5]}
    for variant, rids in ids.items():
        for rid, score in zip(rids, scores[variant]):
            r = client.post("/v1/experiments/tone-test/feedback", headers=AUTH,
                            json={"response_id": rid, "score": score,
                                  "label": "good" if variant == "pirate" else "bad"})
            assert r.status_code == 200 and r.json()["status"] == "created"
    r = client.post("/v1/experiments/tone-test/feedback", headers=AUTH,
                    json={"response_id": ids["pirate"][0], "score": 4})
    assert r.status_code == 200 and r.json()["status"] == "updated"  # idempotent per response
    for body, status, param in (({"response_id": "chatcmpl-nope", "score": 1}, 404, "response_id"),
                                ({"response_id": ids["pirate"][0]}, 400, "score"),
                                ({"response_id": ids["pirate"][0], "label": "meh"}, 400, "label"),
                                ({"response_id": ids["pirate"][0], "score": "x"}, 400, "score")):
        r = client.post("/v1/experiments/tone-test/feedback", headers=AUTH, json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (status, param)

    res = client.get("/v1/experiments/tone-test/results", headers=AUTH).json()
    by = {v["name"]: v for v in res["variants"]}
    assert by["control"]["n"] == 4 and by["pirate"]["n"] == 4 and res["n"] == 8
    assert by["pirate"]["score"]["n"] == 3 and by["pirate"]["labels"]["good_rate"] == 1.0
    assert by["pirate"]["generated_tokens"]["p50"] == 4
    assert by["pirate"]["vs_control"]["score_p_value"] < 0.05
    metrics = client.get("/metrics").text
    assert 'steer_experiment_requests_total{experiment="tone-test",variant="pirate"} 4.0' in metrics
    assert 'steer_experiment_feedback_total{experiment="tone-test",variant="pirate"} 3.0' in metrics

    # Paused: control for everyone, nothing recorded.
    client.patch("/v1/experiments/tone-test", json={"status": "paused"}, headers=AUTH)
    r = chat(client, user=u_pirate, steering={"experiment": "tone-test"})
    assert r.headers["x-steer-variant"] == "control"
    assert client.get("/v1/experiments/tone-test/results", headers=AUTH).json()["n"] == 8

    # Restart: a new app over the same data directory sees the same experiment and data.
    state.experiments.close()
    state2 = make_state(parts, tmp_path, store=backend.open())
    c2 = TestClient(create_app(state2))
    exp = c2.get("/v1/experiments/tone-test", headers=AUTH).json()
    assert exp["status"] == "paused" and [v["name"] for v in exp["variants"]] == ["control", "pirate"]
    res2 = c2.get("/v1/experiments/tone-test/results", headers=AUTH).json()
    assert res2["n"] == 8 and res2["variants"][1]["score"]["n"] == 3
    raw = backend.raw("SELECT unit_hash FROM exposures")
    assert len(raw) == 8 and all(u_pirate not in h and u_control not in h for (h,) in raw)
    assert c2.delete("/v1/experiments/tone-test", headers=AUTH).json()["deleted"] is True
    assert backend.raw("SELECT COUNT(*) FROM exposures") == [(0,)]
    state2.experiments.close()


def _sse_events(text: str) -> list[Any]:
    import json

    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_chunks_carry_the_experiment(api):
    """stream=True, chat and text completions: the first SSE chunk has the ``experiment`` body
    field (as the non-streamed body does), the headers name experiment and variant, and the
    exposure is recorded; a paused experiment tags its control variant."""
    client, state = api
    assert client.post("/v1/experiments", json=two_variant(), headers=AUTH).status_code == 200
    u_pirate = user_for("tone-test", 1)
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
        "/v1/completions": {"prompt": "Hi"},
    }
    for status, variant in (("running", "pirate"), ("paused", "control")):
        client.patch("/v1/experiments/tone-test", json={"status": status}, headers=AUTH)
        for path, extra in bodies.items():
            body = {"model": MODEL, "max_tokens": 4, "stream": True, "user": u_pirate,
                    "stream_options": {"include_usage": True},
                    "steering": {"experiment": "tone-test"}, **extra}
            with client.stream("POST", path, headers=AUTH, json=body) as s:
                assert s.status_code == 200
                assert (s.headers["x-steer-experiment"], s.headers["x-steer-variant"]) == ("tone-test", variant)
                chunks = _sse_events("".join(s.iter_text()))
            assert chunks[0]["experiment"] == {"name": "tone-test", "variant": variant}, (path, chunks[0])
            assert chunks[0]["choices"] and chunks[-1]["usage"]["completion_tokens"] == 4
            assert all("experiment" not in c for c in chunks[1:])
            # Steering of the variant reached the engine only for the running experiment.
            assert (state.engine.seen[-1] is not None) == (variant == "pirate")
    res = client.get("/v1/experiments/tone-test/results", headers=AUTH).json()
    assert res["n"] == 2  # the two running streams; paused ones record nothing
    # Without an experiment no chunk has the field.
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}) as s:
        assert "x-steer-experiment" not in s.headers
        assert all("experiment" not in c for c in _sse_events("".join(s.iter_text())))


def test_offline_run_mechanics(api, tmp_path, monkeypatch, capsys):
    """``steer ab run`` over the real app (fake engine, in-process transport): each prompt keeps
    its seed in every variant, the variant's steering reaches the engine, scores are summarised
    per variant and paired against the control, nothing is recorded as an exposure, and the HTML
    has one column per variant and one row per prompt."""
    import json

    import httpx

    from clients.cli import main
    from clients.eval import harness

    client, state = api
    assert client.post("/v1/experiments", json=two_variant("off"), headers=AUTH).status_code == 200
    prompts = [{"id": "a", "prompt": "Hi <b>there</b>"}, {"id": "b", "prompt": "Tell me a story."},
               {"id": "c", "prompt": "What is 2+2?"}]
    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in prompts))

    def in_process(self, url, api_key=None, timeout=600.0):
        assert (url, api_key) == ("http://t", KEY)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url=url,
                                      headers={"Authorization": f"Bearer {api_key}"})
    monkeypatch.setattr(harness.Client, "__init__", in_process)
    out = tmp_path / "report"
    assert main(["ab", "run", "--experiment", "off", "--prompts", str(pfile), "--url", "http://t",
                 "--api-key", KEY, "--scorers", "pirate,verbosity", "--seed", "3", "--max-tokens", "4",
                 "--concurrency", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["scorer", "control", "pirate"] and "verbosity" in table
    report = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text()
    assert main(["ab", "run", "--experiment", "off", "--prompts", str(pfile), "--url", "http://t",
                 "--api-key", KEY, "--scorers", "pirate,nope"]) == 2
    assert "nope" in capsys.readouterr().err

    assert report["model"] == MODEL and report["config"]["seeds"] == [300009, 300010, 300011]
    # concurrency 1: requests in order, variants of one prompt next to each other, same seed.
    assert state.engine.seeds == [300009, 300009, 300010, 300010, 300011, 300011]
    assert [x is not None for x in state.engine.seen] == [False, True] * 3
    by = {v["name"]: v for v in report["variants"]}
    assert by["control"]["n"] == by["pirate"]["n"] == 3 and by["pirate"]["preset"] == "pirate"
    assert by["control"]["scores"]["verbosity"]["mean"] == 3.0  # "Hello there, friend."
    assert by["pirate"]["scores"]["verbosity"]["mean"] == 3.0
    assert by["pirate"]["scores"]["pirate"]["mean"] > 0 == by["control"]["scores"]["pirate"]["mean"]
    vs = by["pirate"]["scores"]["pirate"]["vs_control"]
    assert vs["diff"] == by["pirate"]["scores"]["pirate"]["mean"]
    assert by["pirate"]["scores"]["verbosity"]["vs_control"] == {"diff": 0.0, "p_value": None}
    assert "vs_control" not in by["control"]["scores"]["pirate"]
    texts = {(o["variant"], o["prompt_id"]): o["text"] for o in report["outputs"]}
    assert texts[("pirate", "a")] == "Arr matey, ahoy!" and texts[("control", "a")] == "Hello there, friend."
    assert client.get("/v1/experiments/off/results", headers=AUTH).json()["n"] == 0  # not exposures

    assert page.count('<th class="variant" data-variant="control">') == 2  # summary + side by side
    assert page.count('<th class="variant" data-variant="pirate">') == 2
    assert [page.count(f'data-prompt="{p["id"]}"') for p in prompts] == [1, 1, 1]
    assert "Hi &lt;b&gt;there&lt;/b&gt;" in page and "<b>there</b>" not in page  # escaped
    assert "Arr matey, ahoy!" in page and "<script" not in page and "http" not in page


def test_results_plot_from_the_api(api, tmp_path, monkeypatch, capsys):
    """``steer ab results NAME --plot``: a real results body (fake engine, real app and store) as
    a PNG whose bars and CIs are drawn in the variants' colours."""
    import httpx
    import numpy as np
    from matplotlib.image import imread

    from clients.cli import main
    from clients.ab.plot import CONTROL_COLOR, VARIANT_COLOR

    client, _ = api
    assert client.post("/v1/experiments", json=two_variant("plot"), headers=AUTH).status_code == 200
    scores = {0: [1.0, 2.0, 1.5, 2.5], 1: [4.0, 4.5, 3.5, 5.0]}
    for k, variant_scores in scores.items():
        for i, score in enumerate(variant_scores):
            r = chat(client, user=user_for("plot", k), steering={"experiment": "plot"})
            rid = r.json()["id"]
            assert client.post("/v1/experiments/plot/feedback", headers=AUTH, json={
                "response_id": rid, "score": score, "label": "good" if score > 3 else "bad"}).status_code == 200
    body = client.get("/v1/experiments/plot/results", headers=AUTH).json()
    assert [v["score"]["n"] for v in body["variants"]] == [4, 4]

    monkeypatch.setattr(httpx, "get", lambda url, headers, timeout: client.get(
        url.replace("http://x", ""), headers=headers))
    out = tmp_path / "plots" / "ab.png"
    assert main(["ab", "results", "plot", "--url", "http://x", "--api-key", KEY, "--plot", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (int(6.4 * 110), int(4.2 * 110))  # figsize * dpi for 2 variants
    img = (imread(out)[..., :3] * 255).round().astype(int)

    def pixels(hex_color: str) -> int:
        rgb = [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]
        return int((np.abs(img - rgb).sum(axis=-1) <= 3).sum())
    assert pixels(VARIANT_COLOR) > 50 and pixels(CONTROL_COLOR) > 50  # error bars of both variants


class FailingStore(SQLiteStore):
    """Definitions load, then every write or read raises like a broken disk."""

    def record_exposure(self, e):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    def record_feedback(self, *a):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    def observations(self, *a):
        raise sqlite3.OperationalError("disk I/O error")


def test_failing_store_still_serves_and_counts(parts, tmp_path):
    state = make_state(parts, tmp_path, store=FailingStore.in_dir(tmp_path))
    client = TestClient(create_app(state))
    state.experiments.ready()
    assert client.post("/v1/experiments", json=two_variant("fs"), headers=AUTH).status_code == 200
    r = chat(client, user="alice", steering={"experiment": "fs"})
    assert r.status_code == 200 and r.json()["experiment"]["name"] == "fs"
    state.experiments.flush()  # the recording has run
    m = client.get("/metrics").text
    assert 'steer_experiment_store_errors_total{op="exposure"} 1.0' in m
    r = client.post("/v1/experiments/fs/feedback", headers=AUTH, json={"response_id": r.json()["id"], "score": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert client.get("/v1/experiments/fs/results", headers=AUTH).status_code == 503
    state.experiments.close()


def test_postgres_outage_still_serves_counts_and_recovers(parts, tmp_path, pg_cluster, caplog):
    """The PostgreSQL server stops mid-test: requests are still served and tagged, the failures
    are counted and logged; once it is back the store reconnects and records again."""
    db = pg_cluster.create_db()
    state = make_state(parts, tmp_path, store=open_store(pg_cluster.url(db)))
    client = TestClient(create_app(state))
    state.experiments.ready()
    flush = state.experiments.flush
    try:
        assert client.post("/v1/experiments", json=two_variant("pg"), headers=AUTH).status_code == 200
        r = chat(client, user="alice", steering={"experiment": "pg"})
        assert r.status_code == 200
        flush()
        pg_cluster.stop()
        try:
            for _ in range(2):
                r = chat(client, user="alice", steering={"experiment": "pg"})
                assert r.status_code == 200 and r.json()["experiment"]["name"] == "pg"
            flush()
            m = client.get("/metrics").text
            assert 'steer_experiment_store_errors_total{op="exposure"} 2.0' in m
            logged = [r.getMessage() for r in caplog.records if r.name == "server.experiments.manager"]
            assert sum("experiment store exposure failed" in x for x in logged) == 2, logged
            r = client.post("/v1/experiments/pg/feedback", headers=AUTH,
                            json={"response_id": r.json()["id"], "score": 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert client.get("/v1/experiments/pg/results", headers=AUTH).status_code == 503
            assert 'steer_experiment_store_errors_total{op="results"} 1.0' in client.get("/metrics").text
        finally:
            pg_cluster.start()
        r = chat(client, user="alice", steering={"experiment": "pg"})
        assert r.status_code == 200
        flush()
        res = client.get("/v1/experiments/pg/results", headers=AUTH)
        assert res.status_code == 200 and res.json()["n"] == 2  # before the outage and after it
        r = client.post("/v1/experiments/pg/feedback", headers=AUTH, json={"response_id": r.json()["id"], "score": 3})
        assert r.status_code == 200 and r.json()["status"] == "created"
    finally:
        state.experiments.close()
        pg_cluster.drop_db(db)


def test_unwritable_data_dir_still_serves(parts, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    state = make_state(parts, blocked / "data")
    client = TestClient(create_app(state))
    state.experiments.ready()
    assert client.get("/metrics").text.count('steer_experiment_store_errors_total{op="load"} 1.0') == 1
    r = chat(client, model=f"{MODEL}:pirate")
    assert r.status_code == 200
    r = client.post("/v1/experiments", json=two_variant("x"), headers=AUTH)
    assert r.status_code == 503
    state.experiments.close()


def test_presets_file_flag(parts, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("presets:\n  shouty: {steering: {features: {enthusiasm: 1.5}}, description: loud}\n")
    state = make_state(parts, tmp_path / "d1")
    state.config.presets = str(good)
    mgr = ExperimentManager(state)
    mgr.ready()
    assert set(mgr.presets) == {"shouty"} and mgr.presets["shouty"].description == "loud"
    mgr.close()

    bad = tmp_path / "bad.yaml"
    bad.write_text("presets:\n  broken: {steering: {features: {no_such_feature: 1.0}}}\n")
    state = make_state(parts, tmp_path / "d2")
    state.config.presets = str(bad)
    mgr = ExperimentManager(state)
    with pytest.raises(ValueError, match="broken.*steering.features.no_such_feature"):
        mgr.ready()  # a bad --presets file stops the server at start-up
    mgr.close()

    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("presets:\n  x: 3\n")
    state = make_state(parts, tmp_path / "d3")
    state.config.presets = str(malformed)
    with pytest.raises(ValueError, match="needs a 'steering' mapping"):
        ExperimentManager(state)
