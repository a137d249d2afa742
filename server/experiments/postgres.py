"""The PostgreSQL backend of the experiment store (psycopg 3; ``pip install 'steer-server[postgres]'``).

``PostgresStore("postgresql://user:pw@host:5432/db")`` connects, applies the migrations it lacks
(the same scripts as SQLite, serialised across servers by a transaction-scoped advisory lock) and
runs each call on one autocommit connection under a lock. A call that fails because the server
went away drops the connection and raises; the next call connects again, so the store recovers
by itself once the database is back. Connecting gives up after ``connect_timeout`` seconds
(default 5, or the URL's own ``connect_timeout``); a statement after ``STATEMENT_TIMEOUT_MS``
(a lock another session holds, a database too busy to answer: the server cancels it, so the
store's thread is never stuck behind it — the caller itself stops waiting after
``WriteLimits.call_timeout_s``); TCP keepalives find a peer that vanished in ~25 s.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.rows import dict_row

from server.experiments.store import SQLStore, Tx, redact

# pg_advisory_xact_lock key of schema migrations: any fixed 64-bit number ("steerdb" in ASCII).
MIGRATION_LOCK = 0x7374656572646200
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 10_000
"""PostgreSQL's ``statement_timeout`` for the store's session (unless the URL's ``options`` set one)."""
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


class PostgresStore(SQLStore):
    """One connection to ``url``, reopened after a failure."""

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = redact(url)
        info = psycopg.conninfo.conninfo_to_dict(url)
        info.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        info.setdefault("application_name", "steer")
        for k, v in KEEPALIVES.items():
            info.setdefault(k, v)
        if "statement_timeout" not in info.get("options", ""):
            info["options"] = f"{info.get('options', '')} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
        self._conninfo = info
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self.migrate()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(**self._conninfo, autocommit=True, row_factory=dict_row)
        return self._conn

    def _drop_if_broken(self) -> None:
        conn = self._conn
        if conn is not None and (conn.broken or conn.closed):
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _session(self) -> Iterator[Tx]:
        with self._lock:
            try:
                yield Tx(self._connection(), self.placeholder)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._drop_if_broken()
                raise

    @contextlib.contextmanager
    def _transaction(self, exclusive: bool = False) -> Iterator[Tx]:
        with self._session() as tx:
            with tx.conn.transaction():
                if exclusive:
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
                yield tx

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
