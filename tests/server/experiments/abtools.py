"""Test tools of the experiment suite: a throwaway PostgreSQL cluster and store backends.

:class:`PgCluster` runs ``initdb`` into a temporary folder and ``pg_ctl start`` on a free TCP port
of 127.0.0.1 (its unix socket in the same folder), trust authentication, fsync off. PostgreSQL
refuses to run as root, so under root the binaries run as the ``postgres`` user that Debian's
package creates (``runuser -u postgres``), else as ``nobody``. :func:`pg_bindir` finds the
binaries on PATH or under ``/usr/lib/postgresql/*/bin``.

:class:`Backend` is one store backend under test: ``open()`` a store over the same database
again and again (a server restart), ``raw()`` queries it past the store.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

from server.experiments.backend import open_store
from server.experiments.store import ExperimentStore
from clients.launch import free_port

PG_TOOLS = ("initdb", "pg_ctl", "postgres")


def pg_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: from PATH, else the newest Debian install."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        d = Path(os.path.realpath(on_path)).parent
        if all((d / t).exists() for t in PG_TOOLS):
            return d
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                    key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                    reverse=True):
        if all((Path(d) / t).exists() for t in PG_TOOLS):
            return Path(d)
    return None


class PgCluster:
    """A PostgreSQL server of its own in a temporary folder; ``stop()``/``start()`` it at will."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="steer-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
                self.user = "postgres"
            except KeyError:
                self.user = "nobody"
            shutil.chown(self.root, user=self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                               f"{proc.stderr}\n{tail}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "-o", opts, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def create_db(self) -> str:
        """A fresh, empty database; its name."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_db(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


class Backend:
    """One store backend under test, over one empty database."""

    def __init__(self, name: str, url: str, cluster: PgCluster | None = None) -> None:
        self.name, self.url, self.cluster = name, url, cluster

    def open(self) -> ExperimentStore:
        return open_store(self.url)

    def raw(self, sql: str, args: tuple = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` past the store (``?`` placeholders) on a connection of its own."""
        if self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(self.url[len("sqlite:///"):])) as db, db:
                return [tuple(r) for r in db.execute(sql, args).fetchall()]
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), args)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def script(self, sql: str) -> None:
        """Run several statements (``;``-separated) in one transaction."""
        stmts = [s for s in sql.split(";") if s.strip()]
        if self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(self.url[len("sqlite:///"):])) as db, db:
                for s in stmts:
                    db.execute(s)
            return
        import psycopg

        with psycopg.connect(self.url) as conn:  # one transaction, committed on exit
            for s in stmts:
                conn.execute(s)

    def tables(self) -> set[str]:
        if self.name == "sqlite":
            return {r[0] for r in self.raw("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {r[0] for r in self.raw("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    def indexes(self) -> set[str]:
        if self.name == "sqlite":
            return {r[0] for r in self.raw("SELECT name FROM sqlite_master WHERE type = 'index'")}
        return {r[0] for r in self.raw("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
