"""The served presets: those of the presets file and those created through the API.

The presets file is ``--presets FILE``, else the bundled ``feature_packs/presets.yaml`` when the
bundled packs are loaded. File presets are read-only here and shadow a stored (API) preset of the
same name. Once the engine is up, :meth:`Presets.check` compiles the file presets: a bad preset in
a ``--presets`` file stops the server, one in the bundled file is skipped.

The stored presets are re-read while the server runs (:meth:`Presets.replace_stored`, called by
the manager's refresh when another server sharing the database changed them); the file presets
stay as they were loaded and checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from server.errors import InvalidRequest, NotFound
from server.experiments.models import Preset, PresetsFile
from steering.packs import bundled_packs_dir
from steering.spec import SteeringError, SteeringSpec
from steering.validation import first_error, param_path

logger = logging.getLogger(__name__)


def bundled_presets() -> Path:
    """``presets.yaml`` of the bundled data (beside the bundled packs)."""
    return bundled_packs_dir() / "presets.yaml"


def presets_file(config: Any) -> tuple[Path | None, bool]:
    """The presets file of ``config`` and whether it is strict (given with ``--presets``)."""
    path = getattr(config, "presets", None)
    if path:
        return Path(path), True
    if getattr(config, "bundled_packs", False) and config.steering and bundled_presets().is_file():
        return bundled_presets(), False
    return None, False


def read_presets_file(path: Path) -> list[Preset]:
    """The presets of ``path``; ValueError naming the entry when its shape is wrong."""
    data = yaml.safe_load(path.read_text())
    try:
        return PresetsFile.model_validate(data).entries()
    except ValidationError as exc:
        error = first_error(exc)
        where = param_path(error["loc"])
        raise ValueError(f"{path}: {where}: {error['msg']}" if where else f"{path}: {error['msg']}") \
            from None


class Presets:
    """Name → :class:`Preset`, remembering which come from the presets file."""

    def __init__(self, path: Path | None = None, strict: bool = False) -> None:
        self.path, self.strict = path, strict
        self.items: dict[str, Preset] = {}
        self.from_file: set[str] = set()
        self.file_names: frozenset[str] = frozenset()
        """Every name in the file, also those :meth:`check` dropped: they shadow stored presets."""
        self._reported: set[str] = set()
        if path is not None:
            for preset in read_presets_file(path):
                self.items[preset.name] = preset
                self.from_file.add(preset.name)
            self.file_names = frozenset(self.from_file)

    def get(self, name: str) -> Preset:
        """The preset ``name``; NotFound (404) if there is none."""
        preset = self.items.get(name)
        if preset is None:
            raise NotFound(f"no preset named {name!r}", "name")
        return preset

    def check_removable(self, name: str) -> None:
        """NotFound if there is no such preset; 400 if it comes from the file."""
        self.get(name)
        if name in self.from_file:
            raise InvalidRequest(f"preset {name!r} comes from the presets file; edit the file",
                                 "name", "preset_from_file")

    def load(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add the stored presets (rows of ``store.list_presets()``) the file does not shadow."""
        self.items.update(self._stored(rows))

    def _stored(self, rows: Iterable[dict[str, Any]]) -> dict[str, Preset]:
        """Name → preset of the stored ``rows`` the file does not shadow; what is skipped is
        logged once per name (a refresh reads the same rows again)."""
        out: dict[str, Preset] = {}
        for row in rows:
            name = row.get("name")
            if name in self.file_names:
                if name not in self._reported:
                    logger.warning("preset %r from the presets file shadows the stored one", name)
                    self._reported.add(name)
                continue
            try:
                out[name] = Preset.model_validate({**row, "source": "api"})
            except ValidationError as exc:
                if name not in self._reported:
                    logger.warning("skipping stored preset %r: %s", name, exc)
                    self._reported.add(name)
        return out

    def replace_stored(self, rows: Iterable[dict[str, Any]]) -> list[Preset]:
        """Serve exactly the stored ``rows`` (and the file presets): presets deleted from the store
        go, new and changed ones come. ``items`` is replaced by a new dict, never changed in place
        (whoever holds the old one keeps a consistent view). The new and changed presets."""
        stored = self._stored(rows)
        items = {name: p for name, p in self.items.items() if name in self.from_file}
        fresh = [p for name, p in stored.items() if self.items.get(name) != p]
        items.update(stored)
        self.items = items
        return fresh

    def stored(self) -> list[Preset]:
        """The presets that come from the store."""
        return [p for name, p in self.items.items() if name not in self.from_file]

    def check(self, compile: Callable[[SteeringSpec, str], Any]) -> None:
        """Compile each file preset with ``compile(steering, param)``; raise (strict file) or
        drop it (bundled file) when it does not compile on this engine."""
        for name in sorted(self.from_file):
            try:
                compile(self.items[name].steering, "steering")
            except (SteeringError, InvalidRequest) as exc:
                if self.strict:
                    raise ValueError(f"preset {name!r} in {self.path}: {exc} ({exc.param})") from None
                logger.warning("skipping bundled preset %r: %s", name, exc)
                del self.items[name]
                self.from_file.discard(name)
