"""Persistence of presets, experiments, exposures and feedback behind one small interface.

Two backends run the same queries and the same versioned migrations:

* SQLite (default): ``steer.db`` in the server's data directory (``--data-dir``, env
  ``STEER_DATA_DIR``, default ``~/.cache/steer/data``), WAL mode.
* PostgreSQL: ``--experiments-db postgresql://user:pw@host:port/db`` (env ``STEER_EXPERIMENTS_DB``),
  through psycopg 3 (``pip install 'steer-server[postgres]'``); see :mod:`.postgres`.

:func:`server.experiments.backend.open_store` picks the backend from the URL.

The schema is versioned: ``schema_version``
holds the applied versions, :data:`MIGRATIONS` is the ordered list of SQL scripts (written in the
SQL both databases speak); opening a database applies the scripts it lacks, each in one
transaction under an exclusive lock, so two servers starting at once apply each script once.

Every write of a preset or an experiment also increments the one-row ``definitions_revision``
in its transaction: :meth:`SQLStore.definitions` reads that number and re-reads the definitions
only when it differs from the one the caller last saw, which is how servers sharing one database
pick up each other's changes cheaply (see :meth:`server.experiments.manager.ExperimentManager.refresh`).

Units are stored only as sha256 hashes, never raw user ids.

Over 400 lines because both backends share every query and migration here, so each SQL
statement is written once; only connecting and locking differ per backend (:mod:`.postgres`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DB_FILE = "steer.db"
DB_ENV = "STEER_EXPERIMENTS_DB"

MIGRATIONS: list[str] = [
    # 1: presets, experiments, exposures, feedback
    """
    CREATE TABLE presets (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE experiments (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE exposures (
        response_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        variant TEXT NOT NULL,
        unit_hash TEXT NOT NULL,
        unit_kind TEXT NOT NULL,
        started DOUBLE PRECISION NOT NULL,
        finished DOUBLE PRECISION NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        generated_tokens INTEGER NOT NULL,
        latency_s DOUBLE PRECISION NOT NULL,
        finish_reason TEXT
    );
    CREATE INDEX exposures_by_experiment ON exposures (experiment, variant);
    CREATE TABLE feedback (
        response_id TEXT PRIMARY KEY REFERENCES exposures (response_id) ON DELETE CASCADE,
        experiment TEXT NOT NULL,
        score DOUBLE PRECISION,
        label TEXT,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    );
    """,
    # 2: feedback looked up by experiment for results
    """
    CREATE INDEX feedback_by_experiment ON feedback (experiment);
    """,
    # 3: experiment identity (an experiment deleted and created again under its name is another
    #    one: exposures and feedback name the id), and each exposure's outcome. Experiments of
    #    older servers keep their name as their id.
    """
    ALTER TABLE experiments ADD COLUMN id TEXT;
    UPDATE experiments SET id = name;
    CREATE UNIQUE INDEX experiments_by_id ON experiments (id);
    ALTER TABLE exposures ADD COLUMN experiment_id TEXT;
    UPDATE exposures SET experiment_id = experiment;
    ALTER TABLE exposures ADD COLUMN outcome TEXT NOT NULL DEFAULT 'ok';
    CREATE INDEX exposures_by_experiment_id ON exposures (experiment_id, variant);
    ALTER TABLE feedback ADD COLUMN experiment_id TEXT;
    UPDATE feedback SET experiment_id = experiment;
    CREATE INDEX feedback_by_experiment_id ON feedback (experiment_id);
    """,
    # 4: the revision of the definitions (presets and experiments): one row, incremented in the
    #    transaction of every write to them, so that the servers sharing the database re-read
    #    them only after a change (``ExperimentManager.refresh``).
    """
    CREATE TABLE definitions_revision (
        id INTEGER PRIMARY KEY,
        revision BIGINT NOT NULL
    );
    INSERT INTO definitions_revision (id, revision) VALUES (1, 1);
    """,
    # 5: custom features made in the feature workshop (server/workshop/): a one-feature pack per
    #    row, its pack.json as text and its safetensors file as base64 with the file's sha256;
    #    definitions too (a write bumps the revision, so every replica serves them).
    """
    CREATE TABLE custom_features (
        name TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        tensors TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        job TEXT,
        created DOUBLE PRECISION NOT NULL
    );
    """,
    # 6: workshop job records, so that every replica sharing the database answers for every
    #    job (a load balancer sends the polls anywhere): the record as the jobs route shows it,
    #    the server running it and when that server last wrote it (its heartbeat), and a cancel
    #    asked for through another replica. Not definitions: no revision bump.
    """
    CREATE TABLE workshop_jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        record TEXT NOT NULL,
        active INTEGER NOT NULL,
        server TEXT NOT NULL,
        cancel INTEGER NOT NULL DEFAULT 0,
        updated DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX workshop_jobs_by_updated ON workshop_jobs (updated);
    """,
]

OUTCOMES = ("ok", "failed", "aborted", "excluded")
"""What became of an exposure: ``ok`` (the response completed), ``failed`` (an error ended it),
``aborted`` (the client went away), ``excluded`` (an admin overrode the variant's steering).
Only ``ok`` exposures enter the results' scores."""


def default_data_dir() -> Path:
    """``$STEER_DATA_DIR``, else ``~/.cache/steer/data``."""
    env = os.environ.get("STEER_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steer" / "data"


class StoreError(RuntimeError):
    """The store cannot serve a call (e.g. it could not be opened)."""


@dataclass
class Exposure:
    """One served response of an experiment."""

    response_id: str
    experiment: str
    """The experiment's name (as served)."""
    variant: str
    unit_hash: str
    unit_kind: str  # "user" | "header" | "random"
    started: float
    finished: float
    prompt_tokens: int
    generated_tokens: int
    latency_s: float
    finish_reason: str | None
    experiment_id: str | None = None
    """The id of the experiment that assigned it (None: its name, as for pre-id experiments)."""
    outcome: str = "ok"
    """One of :data:`OUTCOMES`."""


@dataclass
class Definitions:
    """What :meth:`ExperimentStore.definitions` read: the revision of the presets and experiments
    and, unless it was the one the caller already knew, their rows (as ``list_presets`` and
    ``list_experiments`` return them)."""

    revision: int
    presets: list[dict[str, Any]] | None = None
    experiments: list[dict[str, Any]] | None = None
    features: list[dict[str, Any]] | None = None
    """Custom features (``list_features``)."""

    @property
    def changed(self) -> bool:
        return self.presets is not None


class ExperimentStore:
    """The interface the server uses; :class:`SQLiteStore` and ``PostgresStore`` implement it.
    Every method may raise (the caller counts and logs failures; requests are served regardless)."""

    def revision(self) -> int: raise NotImplementedError
    def definitions(self, known: int | None = None) -> Definitions: raise NotImplementedError
    def list_presets(self) -> list[dict[str, Any]]: raise NotImplementedError
    def add_preset(self, name: str, spec: dict[str, Any]) -> bool: raise NotImplementedError
    def delete_preset(self, name: str) -> None: raise NotImplementedError
    def list_experiments(self) -> list[dict[str, Any]]: raise NotImplementedError
    def put_experiment(self, name: str, spec: dict[str, Any], status: str,
                       experiment_id: str | None = None) -> None: raise NotImplementedError
    def set_status(self, name: str, status: str) -> None: raise NotImplementedError
    def delete_experiment(self, name: str) -> None: raise NotImplementedError
    def list_features(self) -> list[dict[str, Any]]: raise NotImplementedError
    def add_feature(self, row: dict[str, Any]) -> bool: raise NotImplementedError
    def delete_feature(self, name: str) -> bool: raise NotImplementedError
    def put_job(self, record: dict[str, Any], active: bool, server: str,
                keep: int) -> bool: raise NotImplementedError
    def get_job(self, job_id: str) -> dict[str, Any] | None: raise NotImplementedError
    def list_jobs(self, limit: int) -> list[dict[str, Any]]: raise NotImplementedError
    def cancel_job(self, job_id: str) -> bool: raise NotImplementedError
    def record_exposure(self, e: Exposure) -> bool: raise NotImplementedError
    def record_feedback(self, experiment_id: str, response_id: str, score: float | None,
                        label: str | None) -> tuple[str, str] | None: raise NotImplementedError
    def observations(self, experiment_id: str) -> list[dict[str, Any]]: raise NotImplementedError
    def close(self) -> None: pass


class Tx:
    """Statements inside one transaction (or one autocommitted statement) of a :class:`SQLStore`."""

    def __init__(self, conn: Any, placeholder: str) -> None:
        self.conn, self.placeholder = conn, placeholder

    def execute(self, sql: str, args: tuple = ()) -> Any:
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        return self.conn.execute(sql, args)

    def all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.execute(sql, args).fetchall()]

    def one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        row = self.execute(sql, args).fetchone()
        return None if row is None else dict(row)


class SQLStore(ExperimentStore):
    """The queries and migrations, written once with ``?`` placeholders and ``ON CONFLICT``
    upserts. A backend provides :meth:`_session` (a connection, with a lock held) and
    :meth:`_transaction` (one transaction; ``exclusive`` also serialises migrations)."""

    placeholder = "?"
    where = "the database"

    @contextlib.contextmanager
    def _session(self) -> Iterator[Tx]:
        raise NotImplementedError
        yield  # pragma: no cover

    @contextlib.contextmanager
    def _transaction(self, exclusive: bool = False) -> Iterator[Tx]:
        raise NotImplementedError
        yield  # pragma: no cover

    # -- schema --------------------------------------------------------------------------
    @staticmethod
    def _version(tx: Tx) -> int:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = tx.one("SELECT MAX(version) AS v FROM schema_version")
        return int(row["v"] or 0) if row else 0

    def schema_version(self) -> int:
        with self._session() as tx:
            return self._version(tx)

    def migrate(self) -> int:
        """Apply the migrations this database lacks; the resulting version."""
        while True:
            with self._transaction(exclusive=True) as tx:
                version = self._version(tx)
                if version > len(MIGRATIONS):
                    raise StoreError(f"{self.where} has schema version {version}, newer than this "
                                     f"server's {len(MIGRATIONS)}")
                if version == len(MIGRATIONS):
                    return version
                for stmt in MIGRATIONS[version].split(";"):
                    if stmt.strip():
                        tx.execute(stmt)
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))

    # -- the revision of the definitions --------------------------------------------------
    @staticmethod
    def _bump(tx: Tx) -> None:
        """Inside a write's transaction: the definitions changed."""
        tx.execute("UPDATE definitions_revision SET revision = revision + 1 WHERE id = 1")

    def revision(self) -> int:
        """The revision of the presets and experiments: it changes with every write to them."""
        with self._session() as tx:
            row = tx.one("SELECT revision FROM definitions_revision WHERE id = 1")
        return int(row["revision"]) if row else 0

    def definitions(self, known: int | None = None) -> Definitions:
        """The revision and, when it is not ``known``, the presets and experiments. The revision
        is read first: rows newer than it only make the next call read them again."""
        rev = self.revision()
        if rev == known:
            return Definitions(rev)
        return Definitions(rev, self.list_presets(), self.list_experiments(), self.list_features())

    # -- presets -------------------------------------------------------------------------
    def list_presets(self) -> list[dict[str, Any]]:
        with self._session() as tx:
            return [json.loads(r["spec"]) for r in tx.all("SELECT spec FROM presets ORDER BY name")]

    def add_preset(self, name: str, spec: dict[str, Any]) -> bool:
        """Insert a preset; False, and nothing written, when the name is taken (two replicas
        creating one name within a refresh interval: the first wins, the other answers 409)."""
        with self._transaction() as tx:
            cur = tx.execute("INSERT INTO presets (name, spec, created) VALUES (?, ?, ?)"
                             " ON CONFLICT (name) DO NOTHING", (name, json.dumps(spec), time.time()))
            if cur.rowcount != 1:
                return False
            self._bump(tx)
        return True

    def delete_preset(self, name: str) -> None:
        with self._transaction() as tx:
            tx.execute("DELETE FROM presets WHERE name = ?", (name,))
            self._bump(tx)

    # -- experiments ---------------------------------------------------------------------
    def list_experiments(self) -> list[dict[str, Any]]:
        with self._session() as tx:
            rows = tx.all("SELECT id, spec, status, created FROM experiments ORDER BY created, name")
        return [{**json.loads(r["spec"]), "id": r["id"], "status": r["status"], "created": r["created"]}
                for r in rows]

    def put_experiment(self, name: str, spec: dict[str, Any], status: str,
                       experiment_id: str | None = None) -> None:
        """Store a new experiment (its id: ``experiment_id``, else its name); a stale row of the
        same name is replaced, id included."""
        now = time.time()
        with self._transaction() as tx:
            tx.execute("INSERT INTO experiments (name, spec, status, created, updated, id)"
                       " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                       " spec = excluded.spec, status = excluded.status, updated = excluded.updated,"
                       " created = excluded.created, id = excluded.id",
                       (name, json.dumps(spec), status, now, now, experiment_id or name))
            self._bump(tx)

    def set_status(self, name: str, status: str) -> None:
        with self._transaction() as tx:
            tx.execute("UPDATE experiments SET status = ?, updated = ? WHERE name = ?",
                       (status, time.time(), name))
            self._bump(tx)

    def delete_experiment(self, name: str) -> None:
        """The experiment, its exposures and their feedback."""
        with self._transaction() as tx:
            tx.execute("DELETE FROM feedback WHERE experiment = ?", (name,))
            tx.execute("DELETE FROM exposures WHERE experiment = ?", (name,))
            tx.execute("DELETE FROM experiments WHERE name = ?", (name,))
            self._bump(tx)

    # -- custom features -----------------------------------------------------------------
    def list_features(self) -> list[dict[str, Any]]:
        """Every custom feature: ``{"name", "manifest", "tensors", "sha256", "job", "created"}``."""
        with self._session() as tx:
            return tx.all("SELECT name, manifest, tensors, sha256, job, created FROM custom_features"
                          " ORDER BY name")

    def add_feature(self, row: dict[str, Any]) -> bool:
        """Insert a custom feature; False, and nothing written, when the name is taken (two
        replicas finishing the same name: the first one wins, the other job fails with 409)."""
        with self._transaction() as tx:
            cur = tx.execute("INSERT INTO custom_features (name, manifest, tensors, sha256, job, created)"
                             " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                             (row["name"], row["manifest"], row["tensors"], row["sha256"],
                              row.get("job"), time.time()))
            if cur.rowcount != 1:
                return False
            self._bump(tx)
        return True

    def delete_feature(self, name: str) -> bool:
        with self._transaction() as tx:
            found = tx.one("SELECT 1 AS x FROM custom_features WHERE name = ?", (name,)) is not None
            tx.execute("DELETE FROM custom_features WHERE name = ?", (name,))
            self._bump(tx)
        return found

    # -- workshop jobs (server/workshop/jobs.py) ---------------------------------------------
    def put_job(self, record: dict[str, Any], active: bool, server: str, keep: int) -> bool:
        """Write a job's record (``Job.view()``; ``active``: not finished) as ``server`` sees it
        now; finished records beyond the newest ``keep`` are dropped. True when a cancel was asked
        for (:meth:`cancel_job`): the write keeps that request."""
        with self._transaction() as tx:
            tx.execute("INSERT INTO workshop_jobs (id, owner, record, active, server, updated)"
                       " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                       " record = excluded.record, active = excluded.active,"
                       " server = excluded.server, updated = excluded.updated",
                       (record["id"], record["owner"], json.dumps(record), int(active), server,
                        time.time()))
            if not active:
                tx.execute("DELETE FROM workshop_jobs WHERE active = 0 AND id NOT IN (SELECT id"
                           " FROM workshop_jobs WHERE active = 0 ORDER BY updated DESC LIMIT ?)",
                           (keep,))
            row = tx.one("SELECT cancel FROM workshop_jobs WHERE id = ?", (record["id"],))
        return bool(row and row["cancel"])

    @staticmethod
    def _job_row(row: dict[str, Any]) -> dict[str, Any]:
        return {"record": json.loads(row["record"]), "server": row["server"],
                "updated": float(row["updated"]), "cancel": bool(row["cancel"])}

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """``{"record", "server", "updated", "cancel"}`` of a job, None if there is none."""
        with self._session() as tx:
            row = tx.one("SELECT record, server, updated, cancel FROM workshop_jobs WHERE id = ?",
                         (job_id,))
        return self._job_row(row) if row else None

    def list_jobs(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently written jobs, as :meth:`get_job` gives each."""
        with self._session() as tx:
            rows = tx.all("SELECT record, server, updated, cancel FROM workshop_jobs"
                          " ORDER BY updated DESC LIMIT ?", (limit,))
        return [self._job_row(r) for r in rows]

    def cancel_job(self, job_id: str) -> bool:
        """Ask the server running an active job to cancel it; False if it is not active."""
        with self._transaction() as tx:
            cur = tx.execute("UPDATE workshop_jobs SET cancel = 1 WHERE id = ? AND active = 1",
                             (job_id,))
            return cur.rowcount == 1

    # -- observations --------------------------------------------------------------------
    def record_exposure(self, e: Exposure) -> bool:
        """Insert one exposure (a response id is recorded once; a repeat is ignored). False, and
        nothing written, when its experiment (by id) no longer exists: an exposure of a deleted
        experiment never lands in a new one of the same name."""
        experiment_id = e.experiment_id or e.experiment
        with self._transaction() as tx:
            if tx.one("SELECT 1 AS x FROM experiments WHERE id = ?", (experiment_id,)) is None:
                return False
            tx.execute(
                "INSERT INTO exposures (response_id, experiment, variant, unit_hash, unit_kind,"
                " started, finished, prompt_tokens, generated_tokens, latency_s, finish_reason,"
                " experiment_id, outcome)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (response_id) DO NOTHING",
                (e.response_id, e.experiment, e.variant, e.unit_hash, e.unit_kind, e.started,
                 e.finished, e.prompt_tokens, e.generated_tokens, e.latency_s, e.finish_reason,
                 experiment_id, e.outcome))
            return True

    def record_feedback(self, experiment_id: str, response_id: str, score: float | None,
                        label: str | None) -> tuple[str, str] | None:
        """Insert or update the feedback of one exposure: ("created" | "updated", its variant), or
        None when the experiment (by id) has no exposure with that response id."""
        with self._transaction() as tx:
            row = tx.one("SELECT variant, experiment FROM exposures"
                         " WHERE response_id = ? AND experiment_id = ?", (response_id, experiment_id))
            if row is None:
                return None
            now = time.time()
            cur = tx.execute("UPDATE feedback SET score = ?, label = ?, updated = ? WHERE response_id = ?",
                             (score, label, now, response_id))
            if cur.rowcount:
                return "updated", row["variant"]
            tx.execute("INSERT INTO feedback (response_id, experiment, score, label, created, updated,"
                       " experiment_id) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (response_id) DO UPDATE"
                       " SET score = excluded.score, label = excluded.label, updated = excluded.updated",
                       (response_id, row["experiment"], score, label, now, now, experiment_id))
            return "created", row["variant"]

    def observations(self, experiment_id: str) -> list[dict[str, Any]]:
        """Per exposure of the experiment ``experiment_id``: variant, outcome, tokens, latency and
        its feedback (score/label or None)."""
        with self._session() as tx:
            return tx.all(
                "SELECT e.variant, e.outcome, e.generated_tokens, e.latency_s, f.score, f.label"
                " FROM exposures e LEFT JOIN feedback f ON f.response_id = e.response_id"
                " WHERE e.experiment_id = ? ORDER BY e.started, e.response_id", (experiment_id,))


class SQLiteStore(SQLStore):
    """One connection shared under a lock (calls are tiny and run off the event loop)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=5.0)
        self._db.row_factory = sqlite3.Row
        self._enable_wal()
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    def _enable_wal(self, within_s: float = 5.0) -> None:
        """Switch the file to WAL (persistent: only the first opener changes it). SQLite may
        answer "database is locked" at once, without its busy timeout, while another connection
        opening the same new file holds a lock (servers starting together): retry briefly."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> SQLiteStore:
        return cls(Path(data_dir).expanduser() / DB_FILE)

    @contextlib.contextmanager
    def _session(self) -> Iterator[Tx]:
        with self._lock:
            yield Tx(self._db, "?")

    @contextlib.contextmanager
    def _transaction(self, exclusive: bool = False) -> Iterator[Tx]:
        with self._lock:
            # IMMEDIATE takes the write lock up front: every transaction here writes.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._db, "?")
                self._db.execute("COMMIT")
            finally:
                # The body or the COMMIT itself failed (disk full, I/O error, busy): never leave
                # the shared connection inside a transaction for the next call.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UnavailableStore(ExperimentStore):
    """Stands in when the database could not be opened: every call raises :class:`StoreError`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getattribute__(self, name: str) -> Any:
        if name in ("error", "close", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        err = object.__getattribute__(self, "error")

        def fail(*_: Any, **__: Any) -> Any:
            raise StoreError(f"experiment store unavailable: {err}")
        return fail


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
