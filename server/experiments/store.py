"""Persistence of presets, experiments, exposures and feedback: SQLite behind a small interface.

The database lives in the server's data directory (``--data-dir``, env ``STEER_DATA_DIR``, default
``~/.cache/steer/data``) as ``steer.db`` in WAL mode. Its schema is versioned: ``schema_version``
holds the applied version, :data:`MIGRATIONS` is the ordered list of SQL scripts; opening a
database applies the scripts it lacks, each in one transaction.

Units are stored only as sha256 hashes, never raw user ids.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_FILE = "steer.db"

MIGRATIONS: list[str] = [
    # 1: presets, experiments, exposures, feedback
    """
    CREATE TABLE presets (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE experiments (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE exposures (
        response_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        variant TEXT NOT NULL,
        unit_hash TEXT NOT NULL,
        unit_kind TEXT NOT NULL,
        started REAL NOT NULL,
        finished REAL NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        generated_tokens INTEGER NOT NULL,
        latency_s REAL NOT NULL,
        finish_reason TEXT
    );
    CREATE INDEX exposures_by_experiment ON exposures (experiment, variant);
    CREATE TABLE feedback (
        response_id TEXT PRIMARY KEY REFERENCES exposures (response_id) ON DELETE CASCADE,
        experiment TEXT NOT NULL,
        score REAL,
        label TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 2: feedback looked up by experiment for results
    """
    CREATE INDEX feedback_by_experiment ON feedback (experiment);
    """,
]


def default_data_dir() -> Path:
    """``$STEER_DATA_DIR``, else ``~/.cache/steer/data``."""
    env = os.environ.get("STEER_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steer" / "data"


@dataclass
class Exposure:
    """One served response of an experiment."""

    response_id: str
    experiment: str
    variant: str
    unit_hash: str
    unit_kind: str  # "user" | "header" | "random"
    started: float
    finished: float
    prompt_tokens: int
    generated_tokens: int
    latency_s: float
    finish_reason: str | None


class ExperimentStore:
    """The interface the server uses; :class:`SQLiteStore` implements it. Every method may raise
    (the caller counts and logs failures; requests are served regardless)."""

    def list_presets(self) -> list[dict[str, Any]]: raise NotImplementedError
    def put_preset(self, name: str, spec: dict[str, Any]) -> None: raise NotImplementedError
    def delete_preset(self, name: str) -> None: raise NotImplementedError
    def list_experiments(self) -> list[dict[str, Any]]: raise NotImplementedError
    def put_experiment(self, name: str, spec: dict[str, Any], status: str) -> None: raise NotImplementedError
    def set_status(self, name: str, status: str) -> None: raise NotImplementedError
    def delete_experiment(self, name: str) -> None: raise NotImplementedError
    def record_exposure(self, e: Exposure) -> None: raise NotImplementedError
    def record_feedback(self, experiment: str, response_id: str, score: float | None,
                        label: str | None) -> tuple[str, str] | None: raise NotImplementedError
    def observations(self, experiment: str) -> list[dict[str, Any]]: raise NotImplementedError
    def close(self) -> None: pass


class SQLiteStore(ExperimentStore):
    """One connection shared under a lock (calls are tiny and run off the event loop)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=5.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> "SQLiteStore":
        return cls(Path(data_dir).expanduser() / DB_FILE)

    # -- schema --------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self._lock:
            return self._version()

    def _version(self) -> int:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def migrate(self) -> int:
        """Apply the migrations this database lacks; the resulting version."""
        with self._lock:
            version = self._version()
            if version > len(MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this "
                                   f"server's {len(MIGRATIONS)}")
            for v, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in script.split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (v,))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            return self._version()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- presets -------------------------------------------------------------------------
    def list_presets(self) -> list[dict[str, Any]]:
        return [json.loads(r["spec"]) for r in self._all("SELECT spec FROM presets ORDER BY name")]

    def put_preset(self, name: str, spec: dict[str, Any]) -> None:
        self._exec("INSERT OR REPLACE INTO presets (name, spec, created) VALUES (?, ?, ?)",
                   (name, json.dumps(spec), time.time()))

    def delete_preset(self, name: str) -> None:
        self._exec("DELETE FROM presets WHERE name = ?", (name,))

    # -- experiments ---------------------------------------------------------------------
    def list_experiments(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT spec, status, created FROM experiments ORDER BY created, name")
        return [{**json.loads(r["spec"]), "status": r["status"], "created": r["created"]} for r in rows]

    def put_experiment(self, name: str, spec: dict[str, Any], status: str) -> None:
        now = time.time()
        self._exec("INSERT OR REPLACE INTO experiments (name, spec, status, created, updated) "
                   "VALUES (?, ?, ?, ?, ?)", (name, json.dumps(spec), status, now, now))

    def set_status(self, name: str, status: str) -> None:
        self._exec("UPDATE experiments SET status = ?, updated = ? WHERE name = ?",
                   (status, time.time(), name))

    def delete_experiment(self, name: str) -> None:
        """The experiment, its exposures and their feedback."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM feedback WHERE experiment = ?", (name,))
                self._db.execute("DELETE FROM exposures WHERE experiment = ?", (name,))
                self._db.execute("DELETE FROM experiments WHERE name = ?", (name,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- observations --------------------------------------------------------------------
    def record_exposure(self, e: Exposure) -> None:
        self._exec(
            "INSERT OR REPLACE INTO exposures (response_id, experiment, variant, unit_hash, unit_kind,"
            " started, finished, prompt_tokens, generated_tokens, latency_s, finish_reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.response_id, e.experiment, e.variant, e.unit_hash, e.unit_kind, e.started, e.finished,
             e.prompt_tokens, e.generated_tokens, e.latency_s, e.finish_reason))

    def record_feedback(self, experiment: str, response_id: str, score: float | None,
                        label: str | None) -> tuple[str, str] | None:
        """Insert or update the feedback of one exposure: ("created" | "updated", its variant), or
        None when the experiment has no exposure with that id."""
        with self._lock:
            row = self._db.execute("SELECT variant FROM exposures WHERE response_id = ? AND experiment = ?",
                                   (response_id, experiment)).fetchone()
            if row is None:
                return None
            now = time.time()
            cur = self._db.execute(
                "UPDATE feedback SET score = ?, label = ?, updated = ? WHERE response_id = ?",
                (score, label, now, response_id))
            if cur.rowcount:
                return "updated", row[0]
            self._db.execute(
                "INSERT INTO feedback (response_id, experiment, score, label, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)", (response_id, experiment, score, label, now, now))
            return "created", row[0]

    def observations(self, experiment: str) -> list[dict[str, Any]]:
        """Per exposure: variant, tokens, latency and its feedback (score/label or None)."""
        rows = self._all(
            "SELECT e.variant, e.generated_tokens, e.latency_s, f.score, f.label"
            " FROM exposures e LEFT JOIN feedback f ON f.response_id = e.response_id"
            " WHERE e.experiment = ?", (experiment,))
        return [dict(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UnavailableStore(ExperimentStore):
    """Stands in when the database could not be opened: every call raises."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getattribute__(self, name: str) -> Any:
        if name in ("error", "close", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        err = object.__getattribute__(self, "error")

        def fail(*_: Any, **__: Any) -> Any:
            raise sqlite3.OperationalError(f"experiment store unavailable: {err}")
        return fail
