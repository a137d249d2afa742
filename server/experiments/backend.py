"""Which experiment-store backend a URL names, and opening it (SQLite by default, PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from server.experiments.store import ExperimentStore, SQLiteStore, default_data_dir, redact

POSTGRES_SCHEMES = ("postgresql", "postgres")


def check_url(url: str) -> str:
    """``url`` if it names a backend this server can open (ValueError with the reason if not)."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme in POSTGRES_SCHEMES:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ValueError("PostgreSQL needs the psycopg driver: "
                             "pip install 'steer-server[postgres]'") from None
        return url
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise ValueError("a SQLite URL names a file: sqlite:///relative/path.db or "
                             "sqlite:////abs/path.db")
        return url
    raise ValueError(f"unsupported experiments database {redact(url)!r}: use postgresql://USER:PASSWORD@HOST"
                     "[:PORT]/DB or sqlite:///PATH")


def open_store(url: str | None, data_dir: str | Path | None = None) -> ExperimentStore:
    """The store that ``url`` names (``postgresql://…`` or ``sqlite:///PATH``); without one,
    ``steer.db`` in ``data_dir`` (default :func:`default_data_dir`). Raises if it cannot be opened."""
    if not url:
        return SQLiteStore.in_dir(data_dir or default_data_dir())
    check_url(url)
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url[len("sqlite:///"):]).expanduser())
    from server.experiments.postgres import PostgresStore  # psycopg only when asked for

    return PostgresStore(url)
