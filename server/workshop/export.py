"""``steer pack export-custom DIR``: the workshop's custom features, from the experiment store,
as normal pack folders (``DIR/custom-<name>/``) that ship like any pack (``--feature-pack``).

Reads the store a server uses (``--experiments-db URL``, else SQLite in ``--data-dir`` / env
``STEER_DATA_DIR``); each row is checked against its sha256 and loaded by the one pack loader
before the command says it wrote it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from server.experiments.backend import open_store
from server.experiments.store import DB_ENV, default_data_dir
from server.experiments.custom import write_row
from steering.builders.workshop import CUSTOM_PACK
from steering.packs.format import load_pack


def export_custom(out: Path, url: str | None, data_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Write the stored custom features (``names``: some of them) under ``out``; their folders."""
    store = open_store(url, data_dir)
    try:
        rows = store.list_features()
    finally:
        store.close()
    if names:
        missing = sorted(set(names) - {r["name"] for r in rows})
        if missing:
            raise SystemExit(f"no custom feature {', '.join(missing)} in the store")
        rows = [r for r in rows if r["name"] in names]
    written = []
    for row in rows:
        folder = write_row(row, out / f"{CUSTOM_PACK}-{row['name']}")
        load_pack(folder)  # sha256 and manifest checked as the server checks them
        written.append(folder)
    return written


def _cmd(a: argparse.Namespace) -> int:
    url = a.experiments_db or os.environ.get(DB_ENV) or None
    written = export_custom(Path(a.out), url, Path(a.data_dir) if a.data_dir else default_data_dir(),
                            a.names.split(",") if a.names else None)
    for folder in written:
        print(folder)
    if not written:
        print("no custom features in the store")
    return 0


def add_export_parser(pack_sub: argparse._SubParsersAction) -> None:
    s = pack_sub.add_parser("export-custom", help="write the workshop's custom features as pack folders",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("out", help="folder to write custom-<name>/ pack folders into")
    s.add_argument("--names", default=None, help="comma list of custom features (default: all)")
    s.add_argument("--experiments-db", default=None, metavar="URL",
                   help="the store's URL (postgresql://… or sqlite:///…; env STEER_EXPERIMENTS_DB)")
    s.add_argument("--data-dir", default=None, help="the SQLite store's folder (default: $STEER_DATA_DIR or "
                                                   "~/.cache/steer/data)")
    s.set_defaults(func=_cmd)
