"""The feature-pack format: reading a pack folder into verified runtime objects.

    my-pack/
      pack.json                  manifest (MANIFEST_FILE), typed in steering.packs.manifest
      features.safetensors       per-feature tensors (FEATURES_FILE), with n = len(layers)
                                 (1 without ``layers``) and r = rank:
                                   "{name}.direction"  [d]     readout direction (every feature)
                                   "{name}.encoder"    [d]     sae features
                                   "{name}.directions" [n, d]  direction features with layers:
                                                               row i is written at layers[i]
                                   "{name}.R" [n, r, d], "{name}.W" [n, r, d], "{name}.b" [n, r]
                                                               lowrank features (R's rows
                                                               orthonormal per layer)
      sae_{id}.safetensors       full SAE weights, if the pack has an SAE (SAE_FILE)
      sae_{id}.labels.json       per-latent labels / top contexts (SAE_LABELS_FILE)

:func:`load_pack` validates the manifest (:func:`~steering.packs.manifest.read_manifest`), checks
the model fingerprint, verifies every listed file against its sha256, then reads tensors with
safetensors (never pickles) and requires them finite and of the right shapes. Any problem raises
:class:`PackError` naming the pack and the problem. Writing: :mod:`steering.packs.writer`.
Calibration units: ``steering/packs/README.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from steering.features import Feature, LowRank
from steering.packs.manifest import (
    FEATURES_FILE, FeatureEntry, ModelFingerprint, PackError, PackManifest, SaeEntry, dose_scale,
    read_manifest,
)
from steering.packs.tensors import load_tensors, model_fingerprint, sha256_file


# ---------------------------------------------------------------------------------------------
# SAE
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class SAE:
    """A sparse autoencoder at ``blocks.{layer}.hook_resid_post`` with SAELens conventions:

        pre  = (h − b_dec) @ W_enc + b_enc
        acts = ReLU(pre)                      activation "relu"
               pre·[pre > threshold]          activation "jumprelu" (threshold > 0)
               ReLU(pre) kept at the top k    activation "topk"
        ĥ    = acts @ W_dec + b_dec
    """

    id: str
    layer: int
    activation: str  # manifest.SaeActivation
    W_enc: np.ndarray  # [d_in, d_sae]
    b_enc: np.ndarray  # [d_sae]
    W_dec: np.ndarray  # [d_sae, d_in]
    b_dec: np.ndarray  # [d_in]
    threshold: np.ndarray | None = None  # [d_sae] (jumprelu)
    k: int | None = None
    labels: list[dict[str, Any]] | None = None
    # per-latent calibration in *native* activation units (None = not calibrated)
    latent_p50: np.ndarray | None = None  # [d_sae]
    latent_p99: np.ndarray | None = None  # [d_sae]
    latent_max: np.ndarray | None = None  # [d_sae]
    latent_freq: np.ndarray | None = None  # [d_sae]
    resid_norm_p50: float | None = None  # median ‖h‖ at the layer (sets the dose unit), if measured
    _torch: dict[str, Any] = field(default_factory=dict, repr=False)  # torch copies of the weights

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def _weights(self) -> dict[str, Any]:
        import torch

        if not self._torch:
            self._torch.update(W_enc=torch.from_numpy(self.W_enc), b_enc=torch.from_numpy(self.b_enc),
                               b_dec=torch.from_numpy(self.b_dec), W_dec=torch.from_numpy(self.W_dec),
                               thr=None if self.threshold is None else torch.from_numpy(self.threshold))
        return self._torch

    def encode(self, h):
        """acts [T, d_sae] for h [T, d_in] (numpy or torch; returns the same kind)."""
        import torch

        is_np = not isinstance(h, torch.Tensor)
        x = torch.as_tensor(np.asarray(h, np.float32)) if is_np else h.float()
        w = self._weights()
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # [T, d_sae]
        if self.activation == "jumprelu":
            acts = pre * (pre > w["thr"]).to(pre.dtype)
        else:
            acts = torch.relu(pre)
            if self.activation == "topk" and self.k:
                vals, idx = acts.topk(min(self.k, acts.shape[-1]), dim=-1)
                acts = torch.zeros_like(acts).scatter_(-1, idx, vals)
        return acts.numpy() if is_np else acts

    def decode(self, acts):
        """ĥ [T, d_in] for acts [T, d_sae] (numpy or torch; returns the same kind)."""
        import torch

        is_np = not isinstance(acts, torch.Tensor)
        a = torch.as_tensor(np.asarray(acts, np.float32)) if is_np else acts.float()
        w = self._weights()
        out = a @ w["W_dec"] + w["b_dec"]
        return out.numpy() if is_np else out

    def dose_scale(self) -> float | None:
        """The pack dose unit for this SAE's latents (None when not calibrated)."""
        return dose_scale(self.resid_norm_p50) if self.resid_norm_p50 else None

    def label(self, i: int) -> str:
        if self.labels and 0 <= i < len(self.labels):
            return str(self.labels[i].get("label", ""))
        return ""

    def latent_feature(self, i: int, name: str, description: str = "",
                       default_mode: str = "add") -> Feature:
        """Latent ``i`` as a steerable :class:`Feature`, normalized to a unit decoder row.

        With n = ‖W_dec[i]‖ (JumpReLU/ReLU are positively homogeneous): e = n·W_enc[:, i],
        b = n·(b_enc[i] − W_enc[:, i]·b_dec), θ = n·threshold[i], d = W_dec[i]/n, so
        act'(h)·d = act(h)·W_dec[i] exactly and the feature's activation is measured in
        residual-stream units along d̂. ``scale`` c is the pack's dose unit
        (``steering.builders.calibration``): DOSE_FRACTION × the layer's median residual norm when
        the SAE records it (``resid_norm_p50``), else n·p99 of the latent, else 1.
        """
        if not 0 <= i < self.d_sae:
            raise IndexError(f"latent {i} outside [0, {self.d_sae})")
        dec = self.W_dec[i].astype(np.float64)  # [d]
        n = float(np.linalg.norm(dec))
        if n == 0.0:
            raise ValueError(f"latent {i} has a zero decoder row")
        e = self.W_enc[:, i].astype(np.float64)  # [d]
        b = float(self.b_enc[i] - e @ self.b_dec.astype(np.float64))
        thr = float(self.threshold[i]) if self.threshold is not None else 0.0
        c = self.dose_scale()
        if c is None:
            c = float(self.latent_p99[i]) * n if self.latent_p99 is not None else 1.0
            if not c > 0:
                c = float(self.latent_max[i]) * n if self.latent_max is not None and self.latent_max[i] > 0 else 1.0
        return Feature(name=name, layer=self.layer, kind="sae", direction=dec / n, encoder=e * n,
                       bias=b * n, threshold=thr * n, scale=c, default_mode=default_mode,
                       description=description or self.label(i))


# ---------------------------------------------------------------------------------------------
# Pack
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Pack:
    """A loaded, verified pack: its typed manifest and the runtime features and SAEs."""

    path: Path
    manifest: PackManifest
    features: dict[str, Feature]
    saes: dict[str, SAE]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def feature_meta(self, name: str) -> FeatureEntry:
        """The manifest entry of feature ``name`` (KeyError if none)."""
        return self.manifest.feature(name)

    def sae_meta(self, sae_id: str) -> SaeEntry:
        """The manifest entry of SAE ``sae_id`` (KeyError if none)."""
        return self.manifest.sae(sae_id)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (the catalog's ``/v1/packs`` item)."""
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "description": m.description,
            "license": m.license, "model": {"id": m.model.id,
                                            "fingerprint": m.model.fingerprint.model_dump(exclude_unset=True)},
            "provenance": m.provenance.model_dump(exclude_unset=True), "path": str(self.path),
            "num_features": len(self.features),
            "layers": sorted({f.layer for f in self.features.values()} | {s.layer for s in self.saes.values()}),
            "saes": [s.model_dump(exclude_unset=True, exclude={"file", "labels"}) for s in m.saes],
        }


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_pack(path: str | Path, fingerprint: dict[str, Any] | None = None,
              strict_model: bool = True, load_saes: bool = True) -> Pack:
    """Load and verify the pack folder ``path``.

    ``fingerprint`` (from :func:`model_fingerprint` of the serving model) makes a pack for
    another model fail. Raises :class:`PackError` on any problem."""
    path = Path(path)
    m = read_manifest(path)
    if fingerprint is not None:
        check_fingerprint(m.name, m.model.fingerprint, fingerprint, strict_model)
    _verify_files(path, m)
    files = _TensorFiles(path, m.name)
    saes = {s.id: _load_sae(files, s, m.model.fingerprint.hidden_size) for s in m.saes} if load_saes else {}
    features = {f.name: _load_feature(files, f, m.model.fingerprint.hidden_size) for f in m.features}
    if FEATURES_FILE in m.files and not m.features:
        files.get(FEATURES_FILE)  # still verify it is finite
    return Pack(path=path, manifest=m, features=features, saes=saes)


def combine_packs(name: str, packs: list[Pack], description: str = "") -> Pack:
    """One catalog pack ``name`` holding the named features of ``packs`` (each loaded and
    verified by :func:`load_pack`; the workshop keeps one pack per custom feature and serves them
    all as ``custom``). Each feature keeps its own manifest entry; the provenance names the
    source packs. The packs must be for one model (the first one's manifest gives it)."""
    if not packs:
        raise ValueError("combine_packs needs at least one pack")
    entries = [f for p in packs for f in p.manifest.features]
    names = [f.name for f in entries]
    if len(set(names)) != len(names):
        raise PackError(name, "two of the combined packs define the same feature")
    head = packs[0].manifest
    manifest = head.model_copy(update={
        "name": name, "version": str(len(packs)), "description": description, "files": {},
        "features": entries, "saes": [],
        "provenance": head.provenance.model_copy(update={"combined": [p.name for p in packs]})})
    features = {k: v for p in packs for k, v in p.features.items()}
    return Pack(path=packs[0].path.parent, manifest=manifest, features=features, saes={})


def validate_pack(path: str | Path, model_dir: str | Path | None = None,
                  strict_model: bool = True) -> dict[str, Any]:
    """Load ``path`` fully (against ``model_dir``'s fingerprint when given); a summary dict."""
    fp = model_fingerprint(model_dir) if model_dir is not None else None
    pack = load_pack(path, fp, strict_model)
    s = pack.summary()
    s["ok"] = True
    s["checked_against_model"] = fp is not None
    return s


def check_fingerprint(pack: str, expected: ModelFingerprint, actual: Mapping[str, Any] | ModelFingerprint,
                      strict: bool = True) -> None:
    """Raise PackError when a pack's model fingerprint does not match the serving model.

    Shape facts (hidden size, layers, vocab) always must match; the weight sha256 only when
    ``strict`` (a pack may knowingly be used on a fine-tune of its model with strict=False)."""
    act = actual.model_dump() if isinstance(actual, ModelFingerprint) else dict(actual)
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if getattr(expected, key) != act.get(key):
            raise PackError(pack, f"built for another model: {key} {getattr(expected, key)} in the pack, "
                                  f"{act.get(key)} in the model")
    if strict and expected.sha256 != act.get("sha256"):
        raise PackError(pack, "built for another model: the weight fingerprint "
                              f"{expected.sha256[:12]}… does not match the model's "
                              f"{str(act.get('sha256'))[:12]}… (same architecture, other weights)")


def _verify_files(path: Path, m: PackManifest) -> None:
    """Presence and sha256 of every listed file (before parsing anything in them)."""
    for fname, info in m.files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise PackError(m.name, f"the manifest lists {fname} but it is missing")
        got = sha256_file(fpath)
        if got != info.sha256:
            raise PackError(m.name, f"sha256 mismatch for {fname}: manifest {info.sha256[:12]}…, "
                                    f"file {got[:12]}… (corrupt or modified)")


class _TensorFiles:
    """The pack's safetensors files, each read once and checked finite."""

    def __init__(self, path: Path, pack: str) -> None:
        self.path, self.pack = path, pack
        self._cache: dict[str, dict[str, np.ndarray]] = {}

    def get(self, fname: str) -> dict[str, np.ndarray]:
        if fname not in self._cache:
            try:
                t = load_tensors(self.path / fname)
            except Exception as e:  # noqa: BLE001 — any parse failure is a corrupt pack
                raise PackError(self.pack, f"{fname} is not a readable safetensors file: {e}") from None
            for k, v in t.items():
                if not np.all(np.isfinite(v)):
                    bad = int((~np.isfinite(v)).sum())
                    raise PackError(self.pack, f"tensor {k!r} in {fname} has {bad} NaN/inf values")
            self._cache[fname] = t
        return self._cache[fname]


def _load_sae(files: _TensorFiles, s: SaeEntry, d: int) -> SAE:
    pack = files.pack
    t = files.get(s.file)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if s.activation == "jumprelu" else ()):
        if key not in t:
            raise PackError(pack, f"SAE {s.id!r}: tensor {key!r} is missing from {s.file}")
    W_enc, W_dec = t["W_enc"], t["W_dec"]  # [d, m], [m, d]
    m = W_enc.shape[1] if W_enc.ndim == 2 else -1
    if W_enc.shape != (d, m) or W_dec.shape != (m, d) or t["b_enc"].shape != (m,) \
            or t["b_dec"].shape != (d,) or ("threshold" in t and t["threshold"].shape != (m,)):
        raise PackError(pack, f"SAE {s.id!r}: tensor shapes do not fit d_in={d}")
    if s.d_sae is not None and s.d_sae != m:
        raise PackError(pack, f"SAE {s.id!r}: d_sae {s.d_sae} in the manifest, {m} latents in {s.file}")
    labels = None
    if s.labels:
        try:
            labels = json.loads((files.path / s.labels).read_text())["latents"]
        except (ValueError, KeyError, TypeError) as e:
            raise PackError(pack, f"{s.labels} is not a valid labels file: {e}") from None
    return SAE(id=s.id, layer=s.layer, activation=s.activation, W_enc=W_enc, b_enc=t["b_enc"],
               W_dec=W_dec, b_dec=t["b_dec"], threshold=t.get("threshold"), k=s.k, labels=labels,
               latent_p50=t.get("latent_p50"), latent_p99=t.get("latent_p99"),
               latent_max=t.get("latent_max"), latent_freq=t.get("latent_freq"),
               resid_norm_p50=s.calibration.resid_norm_p50 if s.calibration else None)


ORTHONORMAL_TOL = 1e-3
"""Largest |R_i R_iᵀ − I| entry a lowrank feature's R may have (float32 storage of an
orthonormalised matrix is far inside it; an unnormalised one is far outside)."""


def _load_feature(files: _TensorFiles, f: FeatureEntry, d: int) -> Feature:
    pack = files.pack
    t = files.get(FEATURES_FILE)
    what = f"feature {f.name!r}"

    def tensor(suffix: str, shape: tuple[int, ...], shape_text: str) -> np.ndarray:
        key = f"{f.name}.{suffix}"
        if key not in t:
            raise PackError(pack, f"tensor {key!r} named by {what} is missing from {FEATURES_FILE}")
        if t[key].shape != shape:
            raise PackError(pack, f"{what}: {suffix} must be {shape_text}, not {list(t[key].shape)}")
        return t[key]

    direction = tensor("direction", (d,), f"a nonzero [{d}] vector")  # [d]
    if not np.linalg.norm(direction) > 0:
        raise PackError(pack, f"{what}: direction must be a nonzero [{d}] vector")
    layers = tuple(f.layers) if f.layers is not None else ()
    n = len(layers) or 1
    encoder = directions = lowrank = None
    if f.kind == "sae":
        encoder = tensor("encoder", (d,), f"a [{d}] vector")  # [d]
    elif f.kind == "direction" and layers:
        directions = tensor("directions", (n, d), f"[{n}, {d}] (one row per layer of layers)")
        if not np.all(np.linalg.norm(directions, axis=1) > 0):
            raise PackError(pack, f"{what}: every row of directions must be nonzero")
    elif f.kind == "lowrank":
        r = int(f.rank)
        R = tensor("R", (n, r, d), f"[{n}, {r}, {d}] (layers × rank × hidden size)")
        W = tensor("W", (n, r, d), f"[{n}, {r}, {d}] (layers × rank × hidden size)")
        b = tensor("b", (n, r), f"[{n}, {r}] (layers × rank)")
        R64 = R.astype(np.float64)
        off = np.abs(R64 @ R64.transpose(0, 2, 1) - np.eye(r)).max()  # R_i R_iᵀ − I, [n, r, r]
        if not off <= ORTHONORMAL_TOL:
            raise PackError(pack, f"{what}: the rows of R must be orthonormal per layer "
                                  f"(|R Rᵀ − I| reaches {off:.3g} > {ORTHONORMAL_TOL:g})")
        lowrank = LowRank(R=R, W=W, b=b)
    if f.kind != "direction" or not layers:
        key = f"{f.name}.directions"
        if key in t:
            raise PackError(pack, f"{what}: tensor {key!r} is only for direction features with layers")
    return Feature(name=f.name, layer=f.layer, kind=f.kind, direction=direction, encoder=encoder,
                   bias=f.bias, threshold=f.threshold, scale=f.calibration.scale,
                   default_mode=f.default_mode, description=f.description, layers=layers,
                   directions=directions, lowrank=lowrank)
