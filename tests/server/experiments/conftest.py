"""Fixtures of the experiment tests: a session-wide throwaway PostgreSQL cluster and ``backend``,
which runs a test once over SQLite and once over PostgreSQL (each time an empty database).

The PostgreSQL runs are skipped only where the PostgreSQL binaries are absent (outside CI; under
``CI`` their absence fails the run: ``.ci/run`` installs them)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from abtools import Backend, PgCluster, pg_bindir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = pg_bindir()
    if bindir is None:
        reason = ("PostgreSQL binaries (initdb, pg_ctl, postgres) not found on PATH or under "
                  "/usr/lib/postgresql/*/bin: apt-get install postgresql")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = PgCluster(bindir)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'steer.db'}")
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    db = cluster.create_db()
    try:
        yield Backend("postgres", cluster.url(db), cluster)
    finally:
        cluster.drop_db(db)
