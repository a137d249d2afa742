"""The custom features one server serves: rows of the store, made into verified pack folders
and served together as the catalog pack ``custom`` (``custom/<name>``).

A row (:meth:`server.experiments.store.SQLStore.list_features`) is a one-feature pack: its
``pack.json`` text and its ``features.safetensors`` as base64 with the file's sha256. Installing
writes each new row to ``<data dir>/custom/<name>-<sha256[:16]>/`` (through a temporary folder
and a rename, so a folder is whole or absent), loads it with the one pack loader (the manifest's
sha256 of the file checked again, the model's fingerprint matched) and puts the combination of
all of them in the registry in one step; a row that fails any check is logged and skipped, never
served. The experiment manager installs the rows at start and at every refresh that saw a change,
so every replica sharing the store serves the same custom features.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steering.builders.workshop import CUSTOM_PACK
from steering.packs.format import Pack, combine_packs, load_pack
from steering.packs.manifest import FEATURES_FILE, MANIFEST_FILE

logger = logging.getLogger(__name__)


def feature_row(pack_dir: Path, name: str, job: str | None) -> dict[str, Any]:
    """The store row of the one-feature pack in ``pack_dir``."""
    tensors = (pack_dir / FEATURES_FILE).read_bytes()
    return {"name": name, "manifest": (pack_dir / MANIFEST_FILE).read_text(encoding="utf-8"),
            "tensors": base64.b64encode(tensors).decode("ascii"),
            "sha256": hashlib.sha256(tensors).hexdigest(), "job": job}


def write_row(row: dict[str, Any], folder: Path) -> Path:
    """Write a row as a pack folder ``folder`` (whole or not at all); checks the sha256."""
    tensors = base64.b64decode(row["tensors"], validate=True)
    if hashlib.sha256(tensors).hexdigest() != row["sha256"]:
        raise ValueError(f"custom feature {row['name']!r}: its tensors do not match their sha256")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder.parent))
    try:
        (tmp / FEATURES_FILE).write_bytes(tensors)
        (tmp / MANIFEST_FILE).write_text(row["manifest"], encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class CustomFeatures:
    """The custom features installed in one registry (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "custom"
        self.packs: dict[str, Pack] = {}
        """Name → its loaded one-feature pack."""
        self._sha: dict[str, str] = {}
        self.rows: list[dict[str, Any]] | None = None
        """The rows last read from the store (installed once a registry exists)."""

    @property
    def names(self) -> list[str]:
        return sorted(self.packs)

    def install(self, registry: Any, rows: list[dict[str, Any]] | None = None) -> bool:
        """Serve exactly ``rows`` (default: the rows last given) in ``registry``; True when what is
        served changed. Without a registry (steering off, or before the packs are loaded) the rows
        are only kept."""
        if rows is not None:
            self.rows = rows
        if registry is None or self.rows is None:
            return False
        if CUSTOM_PACK in registry and not self.packs:
            logger.error("a loaded pack is named %r: custom features are not served", CUSTOM_PACK)
            return False
        fresh: dict[str, Pack] = {}
        sha: dict[str, str] = {}
        for row in self.rows:
            name = row["name"]
            if self._sha.get(name) == row["sha256"] and name in self.packs:
                fresh[name], sha[name] = self.packs[name], row["sha256"]
                continue
            try:
                folder = write_row(row, self.dir / f"{name}-{row['sha256'][:16]}")
                pack = load_pack(folder, registry.fingerprint, registry.strict_model)
                if list(pack.features) != [name]:
                    raise ValueError(f"its pack holds {sorted(pack.features)}, not exactly {name!r}")
            except Exception as exc:  # noqa: BLE001  (one bad row must not stop the others)
                logger.error("custom feature %r not served: %s", name, exc)
                continue
            fresh[name], sha[name] = pack, row["sha256"]
        changed = set(fresh) != set(self.packs) or sha != self._sha
        if not changed:
            return False
        if fresh:
            registry.put(combine_packs(CUSTOM_PACK, [fresh[n] for n in sorted(fresh)],
                                       "Features made in the feature workshop (POST /v1/features)."))
        elif CUSTOM_PACK in registry:
            registry.remove(CUSTOM_PACK)
        self.packs, self._sha = fresh, sha
        logger.info("custom features served: %s", sorted(fresh))
        return True
