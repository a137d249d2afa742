"""Engine-free: experiments whose results can be trusted (issue 16, section 3).

* a user's request may not override the variant's steering (403); an admin's may, and is marked
  and excluded from the results;
* variant weights and feedback scores are bounded;
* an exposure of a deleted experiment never lands in a new one of the same name;
* a stream that fails mid-way is recorded as failed and left out of the scores;
* the store's queue is bounded: a full queue or a dead store never blocks inference, exposures
  are counted as lost, admin calls answer 503 within their timeout; a failed SQLite COMMIT leaves
  no open transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import MODEL, FakeEngine, load_parts, make_state
from fastapi.testclient import TestClient

from server.app import create_app
from server.auth import hash_key
from server.config import ServeConfig
from server.experiments import assign, routing
from server.experiments.backend import open_store
from server.experiments.manager import ExperimentManager
from server.experiments.models import Experiment
from server.experiments.stats import results
from server.experiments.store import Exposure, SQLiteStore
from server.experiments.writer import WriteLimits
from server.protocol import parse_chat

ADMIN_KEY, USER_KEY = "sk-admin-test", "sk-user-test"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
USER = {"authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="module")
def parts() -> dict[str, Any]:
    return load_parts()


def keyed_state(parts: dict[str, Any], tmp_path: Path, store: Any = None, engine: Any = None,
                limits: WriteLimits | None = None, experiments_db: str | None = None) -> Any:
    """An app state with an admin key and a user key (no policy), and its experiment manager
    over ``store`` (default: SQLite in ``tmp_path``; with ``experiments_db``: that URL)."""
    auth = tmp_path / "auth.yaml"
    auth.write_text("keys:\n"
                    f"  - {{name: ops, role: admin, sha256: '{hash_key(ADMIN_KEY)}'}}\n"
                    f"  - {{name: alice, role: user, sha256: '{hash_key(USER_KEY)}'}}\n")
    state = make_state(parts, tmp_path, config=ServeConfig(auth=str(auth)), engine=engine)
    state.config.experiments_db = experiments_db
    if store is None and experiments_db is None:
        store = SQLiteStore.in_dir(tmp_path)
    state.experiments = ExperimentManager(state, store=store, limits=limits)
    return state


@contextlib.contextmanager
def serving(state: Any) -> Iterator[TestClient]:
    client = TestClient(create_app(state), raise_server_exceptions=False)
    state.experiments.ready()
    try:
        yield client
    finally:
        state.experiments.close()


def chat(client: TestClient, headers: dict[str, str], **extra: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def two_variant(name: str = "tone") -> dict[str, Any]:
    return {"name": name, "variants": [{"name": "control", "control": True},
                                       {"name": "pirate", "preset": "pirate"}]}


def user_for(name: str, variant_index: int) -> str:
    return next(f"u{i}" for i in range(1000)
                if assign.assign(name, f"user:u{i}", [1, 1]) == variant_index)


def by_variant(res: dict[str, Any]) -> dict[str, Any]:
    return {v["name"]: v for v in res["variants"]}


def metric(client: TestClient, line: str) -> float:
    """The value of the exposition line that starts with ``line`` (0 when absent)."""
    for ln in client.get("/metrics").text.splitlines():
        if ln.startswith(line + " "):
            return float(ln.rsplit(" ", 1)[1])
    return 0.0


# -- 1. overriding a variant's steering ------------------------------------------------------
def test_a_user_may_not_override_the_variant(parts, tmp_path):
    state = keyed_state(parts, tmp_path)
    with serving(state) as client:
        assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
        u = user_for("tone", 1)
        for extra, param in (
                ({"steering": {"experiment": "tone", "features": {"pirate": 0.5}}}, "steering"),
                ({"steering": {"experiment": "tone", "vectors": [{"layer": 3, "values": [0.0] * 576}]}},
                 "steering"),
                ({"steering": {"experiment": "tone", "apply_to": "prompt"}}, "steering"),
                ({"steering": {"experiment": "tone", "return_activations": True}}, "steering"),
                ({"model": f"{MODEL}:exp/tone", "steering": {"features": {"formality": 1.0}}}, "steering"),
                ({"model": f"{MODEL}:formal", "steering": {"experiment": "tone"}}, "model")):
            before = len(state.engine.params)
            r = chat(client, USER, user=u, **extra)
            assert r.status_code == 403, (extra, r.text)
            err = r.json()["error"]
            assert (err["code"], err["param"]) == ("permission_denied", param), extra
            assert len(state.engine.params) == before  # nothing ran
        # The experiment alone (or an empty own layer) is the variant, as before.
        for steering in ({"experiment": "tone"}, {"experiment": "tone", "features": {}}):
            r = chat(client, USER, user=u, steering=steering)
            assert r.status_code == 200, r.text
            assert r.json()["experiment"] == {"name": "tone", "variant": "pirate"}
            assert "x-steer-excluded" not in r.headers
        state.experiments.flush()
        res = client.get("/v1/experiments/tone/results", headers=ADMIN).json()
        assert by_variant(res)["pirate"]["n"] == 2


def test_an_admin_override_is_served_marked_and_excluded(parts, tmp_path):
    state = keyed_state(parts, tmp_path)
    with serving(state) as client:
        assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
        u = user_for("tone", 0)
        r = chat(client, ADMIN, user=u, steering={"experiment": "tone", "features": {"pirate": 0.5}})
        assert r.status_code == 200, r.text
        assert r.json()["experiment"] == {"name": "tone", "variant": "control", "excluded": True}
        assert r.headers["x-steer-excluded"] == "true"
        assert state.engine.params[-1].extra_args  # the override ran (the control is unsteered)
        assert chat(client, ADMIN, user=u, steering={"experiment": "tone"}).status_code == 200
        state.experiments.flush()
        control = by_variant(client.get("/v1/experiments/tone/results", headers=ADMIN).json())["control"]
        assert control["n"] == 1 and control["outcomes"] == {"failed": 0, "aborted": 0, "excluded": 1}


def test_routing_override_rule_by_role(parts, tmp_path):
    """:func:`routing.route` itself: the rule does not depend on how the role was found."""
    exp = Experiment.model_validate({"name": "e", "id": "id-1", "variants": [
        {"name": "c", "control": True, "steering": {"features": {"pirate": 1.0}}}]})
    kw = {"served_names": [MODEL], "presets": {}, "experiments": {"e": exp}, "packs": parts["packs"]}

    def req(steering: dict[str, Any]) -> Any:
        return parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                           "steering": steering})

    from server.errors import PermissionDenied

    with pytest.raises(PermissionDenied) as err:
        routing.route(req({"experiment": "e", "features": {"formality": 1.0}}), {}, **kw)
    assert err.value.param == "steering"
    r = req({"experiment": "e", "features": {"formality": 1.0}})
    routed = routing.route(r, {}, admin=True, **kw)
    assert routed.excluded and routed.experiment_id == "id-1" and routed.record
    assert set(routed.steering.features) == {"smollm2-tone/pirate", "smollm2-tone/formality"}
    routed = routing.route(req({"experiment": "e"}), {}, **kw)
    assert not routed.excluded and routed.body_field() == {"name": "e", "variant": "c"}


# -- 2. bounds -------------------------------------------------------------------------------
def test_weight_and_score_bounds(parts, tmp_path):
    state = keyed_state(parts, tmp_path)
    with serving(state) as client:
        def post(path: str, text: str) -> Any:
            return client.post(path, content=text, headers={**ADMIN, "content-type": "application/json"})

        control = '{"name": "c", "control": true}'
        for weight in ("0", "-1", "1000000.5", "1e7", "1e400", "Infinity", "NaN"):
            r = post("/v1/experiments",
                     f'{{"name": "w", "variants": [{control}, {{"name": "t", "weight": {weight}}}]}}')
            assert (r.status_code, r.json()["error"]["param"]) == (400, "variants.[1].weight"), weight
        r = post("/v1/experiments", f'{{"name": "w", "variants": [{control}, {{"name": "t", "weight": 1e6}}]}}')
        assert r.status_code == 200 and r.json()["variants"][1]["weight"] == 1e6
        rid = chat(client, USER, steering={"experiment": "w"}).json()["id"]
        state.experiments.flush()
        for score in ("1000000.001", "-2e6", "1e400", "-Infinity", "NaN"):
            r = post("/v1/experiments/w/feedback", f'{{"response_id": "{rid}", "score": {score}}}')
            assert (r.status_code, r.json()["error"]["param"]) == (400, "score"), score
        for score in ("1e6", "-1e6", "0.5"):
            r = post("/v1/experiments/w/feedback", f'{{"response_id": "{rid}", "score": {score}}}')
            assert r.status_code == 200, r.text


# -- 3. identity: a deleted experiment's exposures ---------------------------------------------
class GateEngine(FakeEngine):
    """Holds each generation until ``release`` is set (``entered`` tells one is in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)
        out = SimpleNamespace(index=0, text="Hello there, friend.", token_ids=[1, 2, 3, 4],
                              finish_reason="length", logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=True, prompt_logprobs=None)


def test_in_flight_exposure_of_a_deleted_experiment_is_not_counted_in_its_namesake(backend, parts, tmp_path):
    engine = GateEngine()
    state = keyed_state(parts, tmp_path, store=backend.open(), engine=engine)
    with serving(state) as client:
        old = client.post("/v1/experiments", json=two_variant(), headers=ADMIN).json()
        answer: dict[str, Any] = {}
        t = threading.Thread(target=lambda: answer.update(
            r=chat(client, USER, user="alice", steering={"experiment": "tone"})))
        t.start()
        assert engine.entered.wait(30)  # alice's request is generating inside the old experiment
        assert client.delete("/v1/experiments/tone", headers=ADMIN).status_code == 200
        new = client.post("/v1/experiments", json=two_variant(), headers=ADMIN).json()
        assert new["id"] != old["id"]
        engine.release.set()
        t.join(30)
        assert answer["r"].status_code == 200  # served all the same
        state.experiments.flush()
        res = client.get("/v1/experiments/tone/results", headers=ADMIN).json()
        assert res["n"] == 0 and all(sum(v["outcomes"].values()) == 0 for v in res["variants"])
        assert backend.raw("SELECT COUNT(*) FROM exposures") == [(0,)]
        assert metric(client, 'steer_experiment_exposures_lost_total{reason="experiment_deleted"}') == 1
        r = client.post("/v1/experiments/tone/feedback", headers=USER,
                        json={"response_id": answer["r"].json()["id"], "score": 1})
        assert r.status_code == 404 and r.json()["error"]["param"] == "response_id"
        # A new exposure of the new experiment is recorded, under its id.
        assert chat(client, USER, user="alice", steering={"experiment": "tone"}).status_code == 200
        state.experiments.flush()
        assert client.get("/v1/experiments/tone/results", headers=ADMIN).json()["n"] == 1
        assert backend.raw("SELECT experiment_id FROM exposures") == [(new["id"],)]


def _exposure(rid: str, experiment_id: str | None, outcome: str = "ok") -> Exposure:
    return Exposure(response_id=rid, experiment="e", variant="a", unit_hash="h", unit_kind="user",
                    started=1.0, finished=2.0, prompt_tokens=1, generated_tokens=2, latency_s=1.0,
                    finish_reason="stop", experiment_id=experiment_id, outcome=outcome)


def test_store_writes_exposures_only_to_a_living_experiment_id(backend):
    """The write itself checks the id: an exposure queued (or sent by another server) for a
    deleted experiment is not written into the new one of the same name."""
    store = backend.open()
    store.put_experiment("e", {"name": "e"}, "running", "id-1")
    assert store.record_exposure(_exposure("r1", "id-1")) is True
    assert store.record_exposure(_exposure("r2", "id-1", "failed")) is True
    store.delete_experiment("e")
    store.put_experiment("e", {"name": "e"}, "running", "id-2")
    assert store.record_exposure(_exposure("r3", "id-1")) is False
    assert store.record_exposure(_exposure("r4", "id-2", "aborted")) is True
    assert [(o["variant"], o["outcome"]) for o in store.observations("id-2")] == [("a", "aborted")]
    assert store.observations("id-1") == []
    assert store.record_feedback("id-1", "r4", 1.0, None) is None
    assert store.record_feedback("id-2", "r4", 1.0, None) == ("created", "a")
    assert backend.raw("SELECT response_id, experiment_id, outcome FROM exposures") == [("r4", "id-2", "aborted")]
    assert [e["id"] for e in store.list_experiments()] == ["id-2"]
    store.close()


# -- 4. outcomes -----------------------------------------------------------------------------
class FailsMidStream(FakeEngine):
    """One delta, then the engine fails."""

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        out = SimpleNamespace(index=0, text="Hel", token_ids=[1], finish_reason=None, logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=False, prompt_logprobs=None)
        raise RuntimeError("the engine fell over")


def test_failed_generations_are_recorded_as_failed_and_not_scored(parts, tmp_path):
    engine = FakeEngine()
    state = keyed_state(parts, tmp_path, engine=engine)
    with serving(state) as client:
        assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
        u = user_for("tone", 1)
        ok = chat(client, USER, user=u, steering={"experiment": "tone"})
        assert ok.status_code == 200
        state.engine = FailsMidStream()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "stream": True, "user": u, "steering": {"experiment": "tone"}}
        with client.stream("POST", "/v1/chat/completions", headers=USER, json=body) as s:
            assert s.status_code == 200  # the stream started; the error is reported in-band
            text = "".join(s.iter_text())
        assert '"error"' in text and text.endswith("data: [DONE]\n\n")
        r = chat(client, USER, user=u, steering={"experiment": "tone"})  # not streamed
        assert r.status_code >= 500
        state.experiments.flush()
        rows = state.experiments.store.observations(state.experiments.experiments["tone"].id)
        assert sorted(o["outcome"] for o in rows) == ["failed", "failed", "ok"]
        pirate = by_variant(client.get("/v1/experiments/tone/results", headers=ADMIN).json())["pirate"]
        assert pirate["n"] == 1 and pirate["outcomes"]["failed"] == 2
        assert pirate["generated_tokens"]["p50"] == 4  # only the completed response is measured
        assert metric(client, 'steer_experiment_requests_total{experiment="tone",variant="pirate"}') == 1
        assert metric(client, 'steer_experiment_unsuccessful_requests_total'
                              '{experiment="tone",outcome="failed",variant="pirate"}') == 2


class StallsAfterOneDelta(FakeEngine):
    """One delta, then nothing more (until aborted)."""

    async def generate(self, prompt, params, request_id):
        self.params.append(params)
        out = SimpleNamespace(index=0, text="Hel", token_ids=[1], finish_reason=None, logprobs=None)
        yield SimpleNamespace(outputs=[out], finished=False, prompt_logprobs=None)
        await asyncio.sleep(60)


def test_a_stream_the_client_leaves_ends_aborted(parts, tmp_path):
    """The stream's body generator, closed at a chunk (the client left between chunks) or
    cancelled while it waits for the engine (DisconnectAwareStream cancels it): ``aborted``."""
    from server.responses import stream as _stream
    from server.runner import Job
    from server.sampling import sampling_params

    state = keyed_state(parts, tmp_path, engine=StallsAfterOneDelta())
    req = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True})

    async def leave(cancel: bool) -> list[str]:
        outcomes: list[str] = []
        job = Job(request_id="chatcmpl-a", prompt_ids=[1, 2], params=sampling_params(req, None),
                      compiled=None)
        body = _stream(state, req, job, None, MODEL, True, None, on_complete=outcomes.append)
        assert '"Hel"' in await body.__anext__()
        if cancel:
            task = asyncio.ensure_future(body.__anext__())
            await asyncio.sleep(0.05)  # now waiting for the engine's next delta
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await body.aclose()
        return outcomes

    assert asyncio.run(leave(cancel=False)) == ["aborted"]
    assert asyncio.run(leave(cancel=True)) == ["aborted"]
    state.experiments.close()


def test_finish_records_each_response_once_with_its_outcome(parts, tmp_path):
    state = keyed_state(parts, tmp_path)
    with serving(state) as client:
        assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
        mgr = state.experiments
        req = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                          "user": "bob", "steering": {"experiment": "tone"}})
        routed = mgr.route(req, {})
        job = SimpleNamespace(request_id="chatcmpl-x", arrival=time.monotonic(), generated_tokens=2,
                              finish_reason=None)
        mgr.finish(routed, job, 3, outcome="aborted")
        mgr.finish(routed, job, 3, outcome="ok")  # the same response again: ignored
        mgr.flush()
        [row] = mgr.store.observations(mgr.experiments["tone"].id)
        assert row["outcome"] == "aborted"


def test_results_measure_only_completed_exposures():
    spec = {"name": "e", "variants": [{"name": "c", "weight": 1.0, "control": True},
                                      {"name": "t", "weight": 1.0}]}
    obs = [{"variant": v, "outcome": o, "generated_tokens": 10, "latency_s": 1.0, "score": s, "label": None}
           for v, o, s in (("c", "ok", 1.0), ("c", "ok", 2.0), ("t", "ok", 3.0), ("t", "failed", -100.0),
                           ("t", "aborted", None), ("t", "excluded", 50.0))]
    res = results(spec, obs)
    c, t = res["variants"]
    assert (c["n"], t["n"], res["n"]) == (2, 1, 3)
    assert t["score"]["mean"] == 3.0 and t["outcomes"] == {"failed": 1, "aborted": 1, "excluded": 1}
    # Every assignment counts in the sample-ratio check: 2 vs 204 here, not 2 vs 1.
    assert results(spec, obs[:3])["sample_ratio"]["mismatch"] is False
    skew = results(spec, obs + [dict(obs[3]) for _ in range(200)])
    assert skew["sample_ratio"]["mismatch"] is True


# -- 5. a bounded queue, a dead store, a failed COMMIT ----------------------------------------
class BlockingStore(SQLiteStore):
    """``block`` set: every call waits for ``release`` (a hung database)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.block, self.entered, self.release = False, threading.Event(), threading.Event()

    def _wait(self) -> None:
        if self.block:
            self.entered.set()
            self.release.wait(30)

    def record_exposure(self, e):
        self._wait()
        return super().record_exposure(e)

    def put_experiment(self, *a):
        self._wait()
        return super().put_experiment(*a)

    def observations(self, *a):
        self._wait()
        return super().observations(*a)


def test_full_queue_counts_lost_exposures_and_fails_admin_calls_fast(parts, tmp_path):
    store = BlockingStore(tmp_path / "steer.db")
    state = keyed_state(parts, tmp_path, store=store, limits=WriteLimits(max_pending=2))
    with serving(state) as client:
        assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
        store.block = True
        assert chat(client, USER, steering={"experiment": "tone"}).status_code == 200
        assert store.entered.wait(10)  # the writer is stuck on the first exposure
        for _ in range(4):  # two more fill the queue, two are lost
            t0 = time.monotonic()
            r = chat(client, USER, steering={"experiment": "tone"})
            assert r.status_code == 200 and time.monotonic() - t0 < 5
        assert metric(client, 'steer_experiment_exposures_lost_total{reason="queue_full"}') == 2
        t0 = time.monotonic()
        r = client.get("/v1/experiments/tone/results", headers=ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "store_unavailable")
        assert time.monotonic() - t0 < 1  # refused at once, not after the timeout
        store.release.set()
        state.experiments.flush(10)
        assert client.get("/v1/experiments/tone/results", headers=ADMIN).json()["n"] == 3


def test_hung_store_never_blocks_inference_and_admin_calls_time_out(parts, tmp_path):
    store = BlockingStore(tmp_path / "steer.db")
    state = keyed_state(parts, tmp_path, store=store, limits=WriteLimits(call_timeout_s=0.5))
    with serving(state) as client:
        assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
        store.block = True
        t0 = time.monotonic()
        r = chat(client, USER, steering={"experiment": "tone"})
        assert r.status_code == 200 and r.json()["experiment"]["name"] == "tone"
        assert time.monotonic() - t0 < 5
        for call in (lambda: client.post("/v1/experiments", json=two_variant("t2"), headers=ADMIN),
                     lambda: client.get("/v1/experiments/tone/results", headers=ADMIN)):
            t0 = time.monotonic()
            r = call()
            elapsed = time.monotonic() - t0
            assert (r.status_code, r.json()["error"]["code"]) == (503, "store_unavailable")
            assert 0.5 <= elapsed < 3, elapsed
            assert "0.5 s" in r.json()["error"]["message"]
        assert "t2" not in state.experiments.experiments
        store.release.set()
        state.experiments.flush(10)
        # The timed-out calls never ran once the store came back; the exposure was written.
        assert client.get("/v1/experiments/tone/results", headers=ADMIN).json()["n"] == 1
        assert metric(client, 'steer_experiment_store_errors_total{op="admin"}') == 1


def test_postgres_down_inference_served_admin_503_exposure_counted_lost(parts, tmp_path, pg_cluster):
    db = pg_cluster.create_db()
    state = keyed_state(parts, tmp_path, store=open_store(pg_cluster.url(db)),
                        limits=WriteLimits(retry_backoff_s=0.05))
    try:
        with serving(state) as client:
            assert client.post("/v1/experiments", json=two_variant(), headers=ADMIN).status_code == 200
            pg_cluster.stop()
            try:
                t0 = time.monotonic()
                r = chat(client, USER, steering={"experiment": "tone"})
                assert r.status_code == 200 and time.monotonic() - t0 < 5
                t0 = time.monotonic()
                r = client.post("/v1/experiments", json=two_variant("t2"), headers=ADMIN)
                assert (r.status_code, r.json()["error"]["code"]) == (503, "store_unavailable")
                assert time.monotonic() - t0 < WriteLimits().call_timeout_s + 1
                assert "postgres" not in r.json()["error"]["message"]  # the driver's text stays in the log
                state.experiments.flush(30)
                assert metric(client, 'steer_experiment_exposures_lost_total{reason="store_error"}') == 1
            finally:
                pg_cluster.start()
    finally:
        pg_cluster.drop_db(db)


def test_closed_postgres_port_serves_and_answers_503(parts, tmp_path):
    from clients.launch import free_port

    state = keyed_state(parts, tmp_path,
                        experiments_db=f"postgresql://postgres@127.0.0.1:{free_port()}/nope")
    with serving(state) as client:
        assert chat(client, USER, model=f"{MODEL}:pirate").status_code == 200
        t0 = time.monotonic()
        r = client.post("/v1/experiments", json=two_variant(), headers=ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (503, "store_unavailable")
        assert time.monotonic() - t0 < 2


class CommitFails:
    """A sqlite3 connection whose next ``COMMIT`` fails (a full disk); everything else passes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.fail_next = db, True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip().upper() == "COMMIT" and self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


def test_sqlite_commit_failure_leaves_no_open_transaction(tmp_path):
    store = SQLiteStore(tmp_path / "steer.db")
    store.put_experiment("e", {"name": "e"}, "running", "id-1")
    real = store._db
    store._db = CommitFails(real)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.record_exposure(_exposure("r1", "id-1"))
    assert real.in_transaction is False
    assert store.observations("id-1") == []  # rolled back
    assert store.record_exposure(_exposure("r2", "id-1")) is True  # the next write succeeds
    assert [o["outcome"] for o in store.observations("id-1")] == ["ok"]
    other = sqlite3.connect(str(tmp_path / "steer.db"), timeout=0.5)  # and no lock is held
    other.execute("INSERT INTO presets VALUES ('p', '{}', 1)")
    other.commit()
    other.close()
    store._db = real
    store.close()
