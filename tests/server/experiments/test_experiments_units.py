"""Engine-free: assignment, the store and its migrations over both backends (SQLite, PostgreSQL),
results statistics, merging."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from server.experiments import assign
from clients.ab.cli import render
from server.experiments.stats import results
from server.stats import srm_check, two_proportion_p, wilson_ci
from server.experiments.store import (
    MIGRATIONS,
    Exposure,
    SQLiteStore,
    StoreError,
    redact,
)
from server.experiments.backend import check_url, open_store


def test_split_within_two_percent_of_weights():
    weights = [0.5, 0.3, 0.2]
    counts = Counter(assign.assign("tone-test", f"user-{i}", weights) for i in range(10_000))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 10_000 - w) < 0.02, (i, counts)
    # Unnormalised weights give the same buckets.
    assert all(assign.assign("tone-test", f"u{i}", [5, 3, 2]) == assign.assign("tone-test", f"u{i}", weights)
               for i in range(500))


def test_assignment_is_sticky_and_depends_on_the_experiment():
    for i in range(200):
        first = assign.assign("exp-a", f"user-{i}", [1, 1])
        assert all(assign.assign("exp-a", f"user-{i}", [1, 1]) == first for _ in range(5))
    a = [assign.assign("exp-a", f"user-{i}", [1, 1]) for i in range(1000)]
    b = [assign.assign("exp-b", f"user-{i}", [1, 1]) for i in range(1000)]
    assert a != b  # independent hashing per experiment
    u = assign.uniform("exp-a", "x")
    assert 0.0 <= u < 1.0 and assign.bucket(0.0, [1, 1]) == 0 and assign.bucket(0.999999, [1, 1]) == 1
    assert assign.unit_hash("alice") != "alice" and len(assign.unit_hash("alice")) == 64


def _exposure(rid: str, variant: str, tokens: int = 10, latency: float = 0.5) -> Exposure:
    return Exposure(response_id=rid, experiment="e", variant=variant, unit_hash=assign.unit_hash(rid),
                    unit_kind="user", started=1.0, finished=1.5, prompt_tokens=5,
                    generated_tokens=tokens, latency_s=latency, finish_reason="length")


def test_migrations_from_empty_and_reopen(backend):
    store = backend.open()
    assert store.schema_version() == len(MIGRATIONS) == 6
    store.close()
    assert {"schema_version", "presets", "experiments", "exposures", "feedback",
            "definitions_revision", "custom_features", "workshop_jobs"} <= backend.tables()
    assert {"exposures_by_experiment", "feedback_by_experiment", "experiments_by_id",
            "exposures_by_experiment_id", "feedback_by_experiment_id",
            "workshop_jobs_by_updated"} <= backend.indexes()
    assert backend.raw("SELECT version FROM schema_version ORDER BY version") == [(1,), (2,), (3,), (4,), (5,), (6,)]
    if backend.name == "sqlite":
        assert backend.raw("PRAGMA journal_mode") == [("wal",)]
    again = backend.open()  # re-opening applies nothing twice
    assert again.schema_version() == 6
    again.close()
    assert backend.raw("SELECT version FROM schema_version ORDER BY version") == [(1,), (2,), (3,), (4,), (5,), (6,)]


def test_custom_features_are_insert_only_definitions(backend):
    """Workshop features (#31): a name is stored once (the second insert is refused, nothing
    written), every write moves the revision so replicas re-read, and definitions carry them."""
    store = backend.open()
    row = {"name": "ocean", "manifest": "{}", "tensors": "AAAA", "sha256": "0" * 64, "job": "fjob-1"}
    rev = store.revision()
    assert store.add_feature(row) is True
    assert store.revision() == rev + 1
    assert store.add_feature({**row, "tensors": "BBBB"}) is False
    assert store.revision() == rev + 1
    [got] = store.list_features()
    assert (got["name"], got["tensors"], got["job"]) == ("ocean", "AAAA", "fjob-1")
    defs = store.definitions(rev)
    assert [f["name"] for f in defs.features] == ["ocean"]
    assert store.definitions(defs.revision).features is None  # unchanged: not read again
    assert store.delete_feature("ocean") is True and store.list_features() == []
    assert store.delete_feature("ocean") is False
    store.close()


def test_workshop_job_records(backend):
    """Workshop job records (#31): written again and again by the server running the job, read
    by any replica, a cancel asked for on an active record only (and kept through later writes),
    the finished ones pruned to the newest ``keep``; not definitions (no revision bump)."""
    store = backend.open()
    rev = store.revision()
    job = {"object": "feature.job", "id": "fjob-1", "name": "sea", "owner": "ops", "status": "running",
           "progress": 0.5}
    assert store.put_job(job, True, "a:1:x", 2) is False
    got = store.get_job("fjob-1")
    assert got["record"] == job and got["server"] == "a:1:x" and got["cancel"] is False
    assert abs(got["updated"] - time.time()) < 60
    assert store.cancel_job("fjob-1") is True
    assert store.put_job({**job, "progress": 0.6}, True, "a:1:x", 2) is True  # the ask survives the write
    assert store.get_job("fjob-1")["record"]["progress"] == 0.6
    assert store.put_job({**job, "status": "cancelled"}, False, "a:1:x", 2) is True
    assert store.cancel_job("fjob-1") is False  # finished: nothing to ask
    for i in range(2, 5):  # three more finished: only the newest two finished records stay
        store.put_job({**job, "id": f"fjob-{i}", "status": "done"}, False, "b:2:y", 2)
        time.sleep(0.01)
    assert [r["record"]["id"] for r in store.list_jobs(10)] == ["fjob-4", "fjob-3"]
    assert store.get_job("fjob-1") is None and store.get_job("nope") is None
    assert store.revision() == rev
    store.close()


def test_float_columns_keep_full_precision(backend):
    """Timestamps and latencies round-trip exactly (PostgreSQL's REAL would keep ~7 digits)."""
    store = backend.open()
    store.put_experiment("e", {"name": "e"}, "running")
    e = _exposure("r1", "a", latency=0.123456789012)
    e.started = 1_700_000_000.123456
    store.record_exposure(e)
    assert store.observations("e")[0]["latency_s"] == 0.123456789012
    assert backend.raw("SELECT started FROM exposures") == [(1_700_000_000.123456,)]
    store.close()


def test_partial_migration_is_completed(backend):
    """A database at version 1 (an older server) is brought to the latest version; its
    experiments keep their name as their id, their exposures count as completed (``ok``)."""
    backend.script("CREATE TABLE schema_version (version INTEGER NOT NULL);" + MIGRATIONS[0]
                   + ";INSERT INTO schema_version VALUES (1)"
                   + ";INSERT INTO experiments VALUES ('old', '{\"name\": \"old\"}', 'running', 1, 1)"
                   + ";INSERT INTO exposures VALUES ('r1', 'old', 'a', 'h', 'user', 1, 2, 3, 4, 1, 'stop')"
                   + ";INSERT INTO feedback VALUES ('r1', 'old', 2.5, NULL, 1, 1)")
    assert "feedback_by_experiment" not in backend.indexes()
    store = backend.open()
    assert store.schema_version() == len(MIGRATIONS)
    assert "feedback_by_experiment" in backend.indexes()
    assert [e["id"] for e in store.list_experiments()] == ["old"]
    [obs] = store.observations("old")
    assert (obs["variant"], obs["outcome"], obs["score"]) == ("a", "ok", 2.5)
    assert store.record_feedback("old", "r1", 3.0, None) == ("updated", "a")
    store.close()


def test_newer_schema_is_refused(backend):
    backend.script("CREATE TABLE schema_version (version INTEGER NOT NULL);"
                   "INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="newer"):
        backend.open()


def test_concurrent_openers_migrate_once(backend):
    """Servers starting at once over one empty database: each script is applied exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: backend.open(), range(4)))
    assert all(s.schema_version() == len(MIGRATIONS) for s in stores)
    assert backend.raw("SELECT version FROM schema_version ORDER BY version") == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    for s in stores:
        s.close()


def test_definitions_exposures_and_feedback_survive_reopen(backend):
    store = backend.open()
    store.add_preset("calm", {"name": "calm", "steering": {"features": {"enthusiasm": -1.0}}})
    assert not store.add_preset("calm", {"name": "calm", "steering": {"features": {"enthusiasm": -0.5}}})
    spec = {"name": "e", "unit": "user", "variants": [{"name": "a", "weight": 1.0, "control": True}]}
    store.put_experiment("e", spec, "running")
    store.record_exposure(_exposure("r1", "a"))
    store.record_exposure(_exposure("r2", "a", tokens=7))
    store.record_exposure(_exposure("r2", "a", tokens=99))  # a repeated id is recorded once
    assert store.record_feedback("e", "r1", 4.0, None) == ("created", "a")
    assert store.record_feedback("e", "r1", 5.0, "good") == ("updated", "a")  # idempotent per id
    assert store.record_feedback("e", "nope", 1.0, None) is None
    assert store.record_feedback("other", "r1", 1.0, None) is None
    store.set_status("e", "paused")
    store.close()

    store = backend.open()
    assert store.list_presets() == [{"name": "calm", "steering": {"features": {"enthusiasm": -1.0}}}]
    [exp] = store.list_experiments()
    assert exp["name"] == "e" and exp["status"] == "paused" and exp["variants"] == spec["variants"]
    obs = sorted(store.observations("e"), key=lambda o: o["score"] is None)
    assert len(obs) == 2 and obs[0]["score"] == 5.0 and obs[0]["label"] == "good"
    assert obs[1]["score"] is None and obs[1]["generated_tokens"] == 7
    raw = backend.raw("SELECT unit_hash FROM exposures")
    assert len(raw) == 2 and all(len(r[0]) == 64 and r[0] != "r1" for r in raw)
    assert backend.raw("SELECT COUNT(*) FROM feedback") == [(1,)]
    store.delete_preset("calm")
    store.delete_experiment("e")
    assert store.observations("e") == [] and store.list_experiments() == [] and store.list_presets() == []
    assert backend.raw("SELECT COUNT(*) FROM feedback") == [(0,)]
    store.close()


def test_store_urls(tmp_path):
    assert isinstance(open_store(None, tmp_path), SQLiteStore)
    assert (tmp_path / "steer.db").exists()
    s = open_store(f"sqlite:///{tmp_path / 'other.db'}")
    assert isinstance(s, SQLiteStore) and s.path == tmp_path / "other.db"
    s.close()
    for bad, msg in (("mysql://u@h/db", "unsupported"), ("sqlite://", "names a file"),
                     ("/tmp/x.db", "unsupported")):
        with pytest.raises(ValueError, match=msg):
            check_url(bad)
    with pytest.raises(ValueError) as err:
        check_url("mysql://u:hunter2@h/db")
    assert "hunter2" not in str(err.value) and "***" in str(err.value)
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert check_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_results_statistics():
    spec = {"name": "e", "status": "running", "variants": [
        {"name": "control", "weight": 1.0, "control": True},
        {"name": "pirate", "weight": 1.0, "control": False}]}
    rng = np.random.default_rng(0)
    obs = []
    for v, mu, p_good in (("control", 3.0, 0.3), ("pirate", 4.0, 0.7)):
        for i in range(100):
            obs.append({"variant": v, "generated_tokens": 10 + i % 5, "latency_s": 0.1 * (1 + i % 10),
                        "score": float(rng.normal(mu, 1.0)), "label": "good" if rng.random() < p_good else "bad"})
    res = results(spec, obs)
    c, t = res["variants"]
    assert c["n"] == t["n"] == 100 and res["n"] == 200 and res["control"] == "control"
    lo, hi = c["score"]["ci95"]
    assert lo < c["score"]["mean"] < hi and 2.6 < c["score"]["mean"] < 3.4
    assert t["vs_control"]["score_p_value"] < 1e-6 and t["vs_control"]["score_diff"] > 0.5
    assert t["vs_control"]["good_rate_p_value"] < 0.01 and t["vs_control"]["good_rate_diff"] > 0.2
    assert c["generated_tokens"]["p50"] == 12 and c["latency_s"]["p95"] == pytest.approx(1.0)
    assert res["sample_ratio"]["mismatch"] is False and res["warnings"] == []
    text = render(res)
    assert "pirate" in text and "control" in text

    skewed = results(spec, obs[:100] + obs[100:110])
    assert skewed["sample_ratio"]["mismatch"] is True and "sample ratio mismatch" in skewed["warnings"][0]
    empty = results(spec, [])
    assert empty["variants"][1]["vs_control"]["score_p_value"] is None
    assert empty["variants"][0]["score"]["mean"] is None


def test_wilson_interval():
    lo, hi = wilson_ci(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook value
    assert wilson_ci(0, 0) == (None, None)
    lo, hi = wilson_ci(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2
    assert wilson_ci(20, 20)[1] == 1.0


def test_srm_and_proportions_edges():
    assert srm_check([500, 500], [1, 1])["mismatch"] is False
    assert srm_check([0, 0], [1, 1])["p_value"] is None
    assert two_proportion_p(0, 0, 1, 2) is None
    assert two_proportion_p(5, 10, 5, 10) == pytest.approx(1.0)


def test_presets_are_insert_only(backend):
    """Two replicas creating one preset name within a refresh interval: the first wins, the
    second insert writes nothing (the manager answers 409) — no silent last-write-wins."""
    store = backend.open()
    rev = store.revision()
    assert store.add_preset("calm", {"name": "calm", "steering": {"features": {"enthusiasm": -1.0}}})
    assert not store.add_preset("calm", {"name": "calm", "steering": {"features": {"enthusiasm": 2.0}}})
    assert store.revision() == rev + 1
    assert store.list_presets()[0]["steering"]["features"] == {"enthusiasm": -1.0}
    store.close()


def test_a_statement_behind_a_held_lock_is_cancelled(pg_cluster, monkeypatch):
    """PostgreSQL: a write that waits on a lock another session holds fails after the statement
    timeout instead of holding the store's thread for as long as the lock is held."""
    import psycopg

    from server.experiments import postgres

    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_MS", 500)
    db = pg_cluster.create_db()
    try:
        store = postgres.PostgresStore(pg_cluster.url(db))
        with psycopg.connect(pg_cluster.url(db)) as holder:
            holder.execute("LOCK TABLE presets IN ACCESS EXCLUSIVE MODE")
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                store.add_preset("calm", {"name": "calm"})
            assert time.monotonic() - t0 < 5
        assert store.add_preset("calm", {"name": "calm"})  # the lock gone, it works
        store.close()
    finally:
        pg_cluster.drop_db(db)
