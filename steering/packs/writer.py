"""PackWriter: assemble a pack in memory and write it (tensors first, manifest last).

Every entry is validated as it is added (:class:`~steering.packs.manifest.FeatureEntry`,
:class:`~steering.packs.manifest.SaeEntry`) and the finished manifest goes through
:func:`~steering.packs.manifest.parse_manifest`, the loader's validation, before it is written,
so a writer cannot produce a pack that :func:`~steering.packs.format.load_pack` refuses for
its manifest.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import BaseModel, ValidationError

from steering.packs.format import SAE
from steering.packs.manifest import (
    FEATURES_FILE, MANIFEST_FILE, SAE_FILE, SAE_LABELS_FILE, SCHEMA_VERSION, FeatureEntry,
    PackError, PackManifest, SaeEntry, check_feature_shape, describe_error, parse_manifest, site,
)
from steering.packs.tensors import save_tensors, sha256_file
from steering.validation import first_error

# SAE tensors kept float32 whatever the SAE dtype (small vectors; the matrices take sae_dtype)
_SAE_FLOAT32 = ("b_enc", "b_dec", "threshold", "latent_p50", "latent_p99", "latent_max", "latent_freq")


def now_iso() -> str:
    """The current UTC time, to the second, in ISO 8601 (``provenance.date``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class PackWriter:
    """Assemble a pack in memory and write it (manifest last, with every file's sha256)."""

    def __init__(self, name: str, version: str, fingerprint: dict[str, Any], model_id: str = "",
                 description: str = "", license: str = "Apache-2.0",
                 provenance: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None) -> None:
        self.manifest: PackManifest = parse_manifest(_plain({
            "schema_version": SCHEMA_VERSION, "name": name, "version": version,
            "description": description, "license": license,
            "model": {"id": model_id, "fingerprint": fingerprint},
            "provenance": {"date": now_iso(), **(provenance or {})},
            "calibration": calibration or {},
            "files": {}, "features": [], "saes": [],
        }), name)
        self._feature_tensors: dict[str, np.ndarray] = {}
        self._sae_tensors: dict[str, dict[str, np.ndarray]] = {}
        self._sidecars: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def hidden_size(self) -> int:
        return self.manifest.model.fingerprint.hidden_size

    def add_feature(self, name: str, layer: int, kind: str, direction: np.ndarray,
                    calibration: dict[str, Any], description: str = "",
                    tags: Iterable[str] = (), default_mode: str = "add",
                    encoder: np.ndarray | None = None, bias: float = 0.0, threshold: float = 0.0,
                    evidence: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, layers: Iterable[int] | None = None,
                    directions: np.ndarray | None = None,
                    lowrank: dict[str, np.ndarray] | None = None) -> None:
        """Add a named feature; ``extra`` holds builder records kept in its manifest entry.

        ``direction`` [d] is the readout direction at ``layer``. A feature that writes at several
        layers gives ``layers`` (sorted, containing ``layer``) and, for kind ``direction``,
        ``directions`` [n, d] (row i written at ``layers[i]``). Kind ``lowrank`` gives
        ``lowrank={"R": [n, r, d], "W": [n, r, d], "b": [n, r]}`` (n = len(layers), 1 without;
        R's rows orthonormal per layer); its rank is taken from R."""
        entry: dict[str, Any] = {
            "name": name, "description": description, "tags": list(tags), "layer": int(layer),
            "site": site(layer), "kind": kind, "default_mode": default_mode,
            "bias": float(bias), "threshold": float(threshold), "calibration": calibration,
        }
        if layers is not None:
            entry["layers"] = [int(x) for x in layers]
        if kind == "lowrank":
            if lowrank is None or set(lowrank) != {"R", "W", "b"}:
                raise ValueError('a lowrank feature needs lowrank={"R": ..., "W": ..., "b": ...}')
            entry["rank"] = int(np.shape(lowrank["R"])[-2])
        if evidence:
            entry["evidence"] = evidence
        if source:
            entry["source"] = source
        if extra:
            entry.update(extra)
        tensors = {"direction": direction}
        if kind == "sae":
            if encoder is None:
                raise ValueError("an sae feature needs an encoder")
            tensors["encoder"] = encoder
        if kind == "direction" and layers is not None:
            if directions is None:
                raise ValueError("a direction feature with layers needs directions [n, d]")
            tensors["directions"] = directions
        if kind == "lowrank":
            tensors.update(lowrank)
        self.add_entry(entry, tensors)

    def add_entry(self, entry: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Add a feature from its whole manifest entry and its tensors by suffix (``direction``,
        ``encoder``, ``directions``, ``R``/``W``/``b``, as :class:`FeatureEntry` names them): how
        ``add_feature`` ends, and how a feature is copied from another pack."""
        name = entry.get("name")
        if any(f.name == name for f in self.manifest.features):
            raise PackError(self.name, f"duplicate feature name {name!r}")
        fe = self._entry(FeatureEntry, entry, "features")
        try:
            check_feature_shape(fe, self.manifest.model.fingerprint.num_layers)
        except ValueError as e:
            raise PackError(self.name, str(e)) from None
        self.manifest.features.append(fe)
        for k, v in tensors.items():
            self._feature_tensors[f"{name}.{k}"] = np.asarray(v, np.float32)

    def add_sae(self, sae: SAE, info: dict[str, Any] | None = None,
                labels: dict[str, Any] | None = None) -> None:
        """Add an SAE's weights; ``info`` (metrics, calibration, training, ...) joins its entry,
        ``labels`` ({"latents": [...]}) is written as its labels sidecar."""
        f = SAE_FILE.format(id=sae.id)
        t = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        for k in ("threshold", "latent_p50", "latent_p99", "latent_max", "latent_freq"):
            v = getattr(sae, k)
            if v is not None:
                t[k] = v
        entry: dict[str, Any] = {"id": sae.id, "layer": sae.layer, "site": site(sae.layer), "d_in": sae.d_in,
                                 "d_sae": sae.d_sae, "activation": sae.activation, "file": f}
        if sae.k:
            entry["k"] = int(sae.k)
        lf = SAE_LABELS_FILE.format(id=sae.id)
        if labels is not None:
            entry["labels"] = lf
        entry.update(info or {})
        self.manifest.saes.append(self._entry(SaeEntry, entry, "saes"))
        self._sae_tensors[f] = t
        if labels is not None:
            self._sidecars[lf] = labels

    def _entry(self, model: type[BaseModel], entry: dict[str, Any], where: str) -> Any:
        data = _plain(entry)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = first_error(e)
            err = {**err, "loc": (where, 0, *err["loc"])}  # as the manifest's first entry
            raise PackError(self.name, describe_error(err, {where: [data]})) from None

    def write(self, out_dir: str | Path, sae_dtype: str = "bfloat16") -> Path:
        """Write tensors, sidecars and (last) ``pack.json`` into ``out_dir``; returns it.
        SAE matrices are stored in ``sae_dtype``, everything else in float32."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        meta = {"pack": self.name, "format": f"steer-pack/{SCHEMA_VERSION}"}
        if self._feature_tensors:
            save_tensors(out / FEATURES_FILE, self._feature_tensors, "float32", meta)
            files.append(FEATURES_FILE)
        for f, t in self._sae_tensors.items():
            save_tensors(out / f, t, sae_dtype, meta, keep_float32=_SAE_FLOAT32)
            files.append(f)
        for f, obj in self._sidecars.items():
            (out / f).write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                                            default=_json_default))
            files.append(f)
        data = self.manifest.model_dump(exclude_unset=True)
        data["files"] = {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size}
                         for f in files}
        data = _plain(data)
        self.manifest = parse_manifest(data, self.name)  # what load_pack will see
        (out / MANIFEST_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return out


def _plain(obj: Any) -> Any:
    """``obj`` as it will read back from JSON (numpy scalars/arrays and paths made plain)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
