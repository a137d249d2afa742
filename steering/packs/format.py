"""The feature-pack format: a folder with a JSON manifest and safetensors tensor files.

    my-pack/
      pack.json                  manifest (MANIFEST_FILE)
      features.safetensors       per-feature tensors (FEATURES_FILE): "{name}.direction" [d],
                                 and for SAE-kind features "{name}.encoder" [d]
      sae_{id}.safetensors       full SAE weights, if the pack has an SAE (SAE_FILE)
      sae_{id}.labels.json       per-latent labels / top contexts (SAE_LABELS_FILE)

``pack.json`` (schema 1)::

    {"schema_version": 1, "name": "smollm2-tone", "version": "1.0.0", "description": "...",
     "license": "Apache-2.0",
     "model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct",
               "fingerprint": {"hidden_size": 576, "num_layers": 30, "vocab_size": 49152,
                               "tensors": [...], "sha256": "..."}},
     "provenance": {"builder": "...", "corpus": ..., "recipe": ..., "date": "..."},
     "calibration": {"unit": "...", "corpus": ..., "tokens": N},
     "files": {"features.safetensors": {"sha256": "...", "bytes": N}, ...},
     "features": [{"name", "description", "tags", "layer", "site", "kind", "default_mode",
                   "bias", "threshold", "calibration": {"scale", "p50", "p99", "max",
                   "direction_norm", "strength_range"}, "evidence"?, "source"?}],
     "saes": [{"id", "layer", "site", "d_in", "d_sae", "activation", "k"?, "file", "labels"?,
               "metrics"?, "training"?}]}

Every file the manifest lists is verified against its sha256 on load; tensors are read with
safetensors (never pickles) and must be finite. Any problem raises :class:`PackError` naming
the pack and the problem. Calibration units are documented in ``steering/packs/README.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from steering.features import Feature

SCHEMA_VERSION = 1
MANIFEST_FILE = "pack.json"
FEATURES_FILE = "features.safetensors"
SAE_FILE = "sae_{id}.safetensors"
SAE_LABELS_FILE = "sae_{id}.labels.json"
SITE = "blocks.{layer}.hook_resid_post"
KINDS = ("direction", "sae")
SAE_ACTIVATIONS = ("relu", "jumprelu", "topk")
DEFAULT_MODES = ("add", "clamp", "scale", "ablate")
# Suffixes of the weights hashed into a model fingerprint ({last} = the last decoder layer).
FINGERPRINT_TENSORS = (
    "embed_tokens.weight",
    "layers.0.input_layernorm.weight",
    "layers.{last}.post_attention_layernorm.weight",
    "norm.weight",
)
# The dose unit (see steering.packs.calibration): scale = DOSE_FRACTION × median ‖h‖ at the layer.
DOSE_FRACTION = 0.25
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class PackError(ValueError):
    """A pack is malformed, corrupt or for another model; the message names pack and problem."""

    def __init__(self, pack: str, problem: str) -> None:
        super().__init__(f"feature pack {pack!r}: {problem}")
        self.pack = pack
        self.problem = problem


def site(layer: int) -> str:
    return SITE.format(layer=layer)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------
# model fingerprint
# ---------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """Identify a Hugging Face model folder: hidden size, layer count, vocab size and a sha256
    over the raw bytes (with name, dtype and shape) of a few weights (:data:`FINGERPRINT_TENSORS`)
    read straight from its safetensors files. The same weights saved in another dtype give
    another fingerprint."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden, layers, vocab = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights")
    where: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for p in files:
        header, base = _safetensors_header(p)
        for k, v in header.items():
            if k != "__metadata__":
                where[k] = (p, v, base)
    wanted = [s.format(last=layers - 1) for s in FINGERPRINT_TENSORS]
    h = hashlib.sha256()
    used = []
    for suffix in wanted:
        hits = sorted(k for k in where if k == suffix or k.endswith("." + suffix))
        if not hits:
            continue
        key = hits[0]
        p, info, base = where[key]
        s, e = info["data_offsets"]
        h.update(f"{suffix}|{info['dtype']}|{info['shape']}|".encode())
        with open(p, "rb") as f:
            f.seek(base + s)
            remaining = e - s
            while remaining:
                chunk = f.read(min(remaining, 1 << 22))
                if not chunk:
                    raise ValueError(f"{p} is truncated")
                h.update(chunk)
                remaining -= len(chunk)
        used.append(suffix)
    if not used:
        raise ValueError(f"{model_dir}: none of {wanted} found in the weights")
    return {"hidden_size": hidden, "num_layers": layers, "vocab_size": vocab,
            "tensors": used, "sha256": h.hexdigest()}


def check_fingerprint(pack: str, expected: dict[str, Any], actual: dict[str, Any],
                      strict: bool = True) -> None:
    """Raise PackError when a pack's model fingerprint does not match the serving model.

    Shape facts (hidden size, layers, vocab) always must match; the weight sha256 only when
    ``strict`` (a pack may knowingly be used on a fine-tune of its model with strict=False)."""
    for key in ("hidden_size", "num_layers", "vocab_size"):
        if int(expected.get(key, -1)) != int(actual.get(key, -2)):
            raise PackError(pack, f"built for another model: {key} {expected.get(key)} in the pack, "
                                  f"{actual.get(key)} in the model")
    if strict and expected.get("sha256") != actual.get("sha256"):
        raise PackError(pack, "built for another model: the weight fingerprint "
                              f"{str(expected.get('sha256'))[:12]}… does not match the model's "
                              f"{str(actual.get('sha256'))[:12]}… (same architecture, other weights)")


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def save_tensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "float32",
                 metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays to a safetensors file in ``dtype`` (float32 | bfloat16 | float16)."""
    import torch
    from safetensors.torch import save_file

    td = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = {}
    for k, v in tensors.items():
        a = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        if not a.flags.writeable:  # e.g. a view of a read-only safetensors buffer
            a = a.copy()
        out[k] = torch.from_numpy(a).to(td).contiguous()
    save_file(out, str(path), metadata=metadata)


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file as float32 numpy arrays (any float dtype on disk)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k).float().numpy()
    return out


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
    activation: str
    W_enc: np.ndarray  # [d_in, d_sae]
    b_enc: np.ndarray  # [d_sae]
    W_dec: np.ndarray  # [d_sae, d_in]
    b_dec: np.ndarray  # [d_in]
    threshold: np.ndarray | None = None  # [d_sae] (jumprelu)
    k: int | None = None
    labels: list[dict[str, Any]] | None = None
    # per-latent calibration in *native* activation units (None = not calibrated)
    latent_p50: np.ndarray | None = None
    latent_p99: np.ndarray | None = None
    latent_max: np.ndarray | None = None
    latent_freq: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, h):
        """acts [T, d_sae] for h [T, d_in] (numpy or torch; returns the same kind)."""
        import torch

        is_np = not isinstance(h, torch.Tensor)
        x = torch.as_tensor(np.asarray(h, np.float32)) if is_np else h.float()
        cache = self.__dict__.setdefault("_torch", {})
        if not cache:
            cache.update(W_enc=torch.from_numpy(self.W_enc), b_enc=torch.from_numpy(self.b_enc),
                         b_dec=torch.from_numpy(self.b_dec),
                         thr=None if self.threshold is None else torch.from_numpy(self.threshold),
                         W_dec=torch.from_numpy(self.W_dec))
        pre = (x - cache["b_dec"]) @ cache["W_enc"] + cache["b_enc"]
        if self.activation == "jumprelu":
            acts = pre * (pre > cache["thr"]).to(pre.dtype)
        else:
            acts = torch.relu(pre)
            if self.activation == "topk" and self.k:
                vals, idx = acts.topk(min(self.k, acts.shape[-1]), dim=-1)
                acts = torch.zeros_like(acts).scatter_(-1, idx, vals)
        return acts.numpy() if is_np else acts

    def decode(self, acts):
        import torch

        is_np = not isinstance(acts, torch.Tensor)
        a = torch.as_tensor(np.asarray(acts, np.float32)) if is_np else acts.float()
        self.encode(np.zeros((1, self.d_in), np.float32))  # fills the cache
        out = a @ self.__dict__["_torch"]["W_dec"] + self.__dict__["_torch"]["b_dec"]
        return out.numpy() if is_np else out

    def dose_scale(self) -> float | None:
        rn = (self.meta.get("calibration") or {}).get("resid_norm_p50")
        return DOSE_FRACTION * float(rn) if rn else None

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
        (``steering.packs.calibration``): 0.25 × the layer's median residual norm when the SAE
        records it (``meta["calibration"]["resid_norm_p50"]``), else n·p99 of the latent, else 1.
        """
        if not 0 <= i < self.d_sae:
            raise IndexError(f"latent {i} outside [0, {self.d_sae})")
        dec = self.W_dec[i].astype(np.float64)
        n = float(np.linalg.norm(dec))
        if n == 0.0:
            raise ValueError(f"latent {i} has a zero decoder row")
        e = self.W_enc[:, i].astype(np.float64)
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
    """A loaded, verified pack."""

    path: Path
    manifest: dict[str, Any]
    features: dict[str, Feature]
    saes: dict[str, SAE]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    def feature_meta(self, name: str) -> dict[str, Any]:
        for f in self.manifest["features"]:
            if f["name"] == name:
                return f
        raise KeyError(name)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m["name"], "version": self.version, "description": m.get("description", ""),
            "license": m.get("license"), "model": {"id": m["model"].get("id"),
                                                    "fingerprint": m["model"]["fingerprint"]},
            "provenance": m.get("provenance", {}), "path": str(self.path),
            "num_features": len(self.features),
            "layers": sorted({f.layer for f in self.features.values()} | {s.layer for s in self.saes.values()}),
            "saes": [{k: v for k, v in s.items() if k not in ("file", "labels")}
                     for s in m.get("saes", [])],
        }


def _req(pack: str, d: dict[str, Any], key: str, typ, where: str):
    if key not in d:
        raise PackError(pack, f"{where} lacks the required field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise PackError(pack, f"{where}.{key} has the wrong type ({type(v).__name__})")
    return v


def _finite_arrays(pack: str, fname: str, tensors: dict[str, np.ndarray]) -> None:
    for k, v in tensors.items():
        if not np.all(np.isfinite(v)):
            bad = int((~np.isfinite(v)).sum())
            raise PackError(pack, f"tensor {k!r} in {fname} has {bad} NaN/inf values")


def _finite_num(pack: str, x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise PackError(pack, f"{where} must be a finite number, got {x!r}")
    return float(x)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST_FILE if path.is_dir() else path
    label = path.name
    if not mf.is_file():
        raise PackError(label, f"no {MANIFEST_FILE} in {path}")
    try:
        m = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackError(label, f"{MANIFEST_FILE} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise PackError(label, f"{MANIFEST_FILE} must be a JSON object")
    return m


def load_pack(path: str | Path, fingerprint: dict[str, Any] | None = None,
              strict_model: bool = True, load_saes: bool = True) -> Pack:
    """Load and verify the pack folder ``path``.

    ``fingerprint`` (from :func:`model_fingerprint` of the serving model) makes a pack for
    another model fail. Raises :class:`PackError` on any problem."""
    path = Path(path)
    m = read_manifest(path)
    pname = m.get("name") if isinstance(m.get("name"), str) else path.name
    sv = _req(pname, m, "schema_version", int, "pack.json")
    if sv != SCHEMA_VERSION:
        raise PackError(pname, f"unsupported schema_version {sv} (this server reads {SCHEMA_VERSION})")
    name = _req(pname, m, "name", str, "pack.json")
    if not _NAME_RE.match(name):
        raise PackError(name, "pack name must match [A-Za-z0-9][A-Za-z0-9_.-]*")
    _req(name, m, "version", str, "pack.json")
    model = _req(name, m, "model", dict, "pack.json")
    fp = _req(name, model, "fingerprint", dict, "pack.json model")
    for key in ("hidden_size", "num_layers", "vocab_size", "sha256"):
        if key not in fp:
            raise PackError(name, f"model fingerprint lacks {key!r}")
    if fingerprint is not None:
        check_fingerprint(name, fp, fingerprint, strict_model)
    d, n_layers = int(fp["hidden_size"]), int(fp["num_layers"])
    files = _req(name, m, "files", dict, "pack.json")
    feats_meta = _req(name, m, "features", list, "pack.json")
    saes_meta = m.get("saes", [])
    if not isinstance(saes_meta, list):
        raise PackError(name, "pack.json saes must be a list")

    # files: presence + sha256 (before parsing anything in them)
    for fname, info in files.items():
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise PackError(name, f"file name {fname!r} must be a plain name inside the pack")
        fpath = path / fname
        if not fpath.is_file():
            raise PackError(name, f"the manifest lists {fname} but it is missing")
        want = info.get("sha256") if isinstance(info, dict) else None
        if not want:
            raise PackError(name, f"no sha256 recorded for {fname}")
        got = sha256_file(fpath)
        if got != want:
            raise PackError(name, f"sha256 mismatch for {fname}: manifest {want[:12]}…, file {got[:12]}… "
                                  "(corrupt or modified)")

    def tensors_of(fname: str) -> dict[str, np.ndarray]:
        if fname not in files:
            raise PackError(name, f"{fname} is used but not listed in the manifest's files")
        cache = tensors_of.__dict__.setdefault("c", {})
        if fname not in cache:
            try:
                t = load_tensors(path / fname)
            except Exception as e:  # noqa: BLE001 — any parse failure is a corrupt pack
                raise PackError(name, f"{fname} is not a readable safetensors file: {e}") from None
            _finite_arrays(name, fname, t)
            cache[fname] = t
        return cache[fname]

    # SAEs
    saes: dict[str, SAE] = {}
    for i, s in enumerate(saes_meta):
        where = f"saes[{i}]"
        if not isinstance(s, dict):
            raise PackError(name, f"{where} must be an object")
        sid = _req(name, s, "id", str, where)
        if sid in saes:
            raise PackError(name, f"duplicate SAE id {sid!r}")
        layer = _req(name, s, "layer", int, where)
        if not 0 <= layer < n_layers:
            raise PackError(name, f"SAE {sid!r} layer {layer} outside [0, {n_layers})")
        act = _req(name, s, "activation", str, where)
        if act not in SAE_ACTIVATIONS:
            raise PackError(name, f"SAE {sid!r} activation {act!r} not in {SAE_ACTIVATIONS}")
        if not load_saes:
            continue
        t = tensors_of(_req(name, s, "file", str, where))
        for key in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if act == "jumprelu" else ()):
            if key not in t:
                raise PackError(name, f"SAE {sid!r}: tensor {key!r} is missing from {s['file']}")
        W_enc, W_dec = t["W_enc"], t["W_dec"]
        m_ = W_enc.shape[1] if W_enc.ndim == 2 else -1
        if W_enc.shape != (d, m_) or W_dec.shape != (m_, d) or t["b_enc"].shape != (m_,) \
                or t["b_dec"].shape != (d,) or ("threshold" in t and t["threshold"].shape != (m_,)):
            raise PackError(name, f"SAE {sid!r}: tensor shapes do not fit d_in={d}")
        labels = None
        if s.get("labels"):
            lf = s["labels"]
            if lf not in files:
                raise PackError(name, f"SAE {sid!r} labels file {lf} is not listed in files")
            try:
                labels = json.loads((path / lf).read_text())["latents"]
            except (ValueError, KeyError, TypeError) as e:
                raise PackError(name, f"{lf} is not a valid labels file: {e}") from None
        saes[sid] = SAE(id=sid, layer=layer, activation=act, W_enc=W_enc, b_enc=t["b_enc"],
                        W_dec=W_dec, b_dec=t["b_dec"], threshold=t.get("threshold"),
                        k=s.get("k"), labels=labels, latent_p50=t.get("latent_p50"),
                        latent_p99=t.get("latent_p99"), latent_max=t.get("latent_max"),
                        latent_freq=t.get("latent_freq"), meta=s)

    # features
    features: dict[str, Feature] = {}
    for i, f in enumerate(feats_meta):
        where = f"features[{i}]"
        if not isinstance(f, dict):
            raise PackError(name, f"{where} must be an object")
        fname_ = _req(name, f, "name", str, where)
        if not _NAME_RE.match(fname_) or ":" in fname_:
            raise PackError(name, f"feature name {fname_!r} must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        if fname_ in features:
            raise PackError(name, f"duplicate feature name {fname_!r}")
        layer = _req(name, f, "layer", int, where)
        if not 0 <= layer < n_layers:
            raise PackError(name, f"feature {fname_!r} layer {layer} outside [0, {n_layers})")
        if f.get("site", site(layer)) != site(layer):
            raise PackError(name, f"feature {fname_!r}: site must be {site(layer)!r}")
        kind = _req(name, f, "kind", str, where)
        if kind not in KINDS:
            raise PackError(name, f"feature {fname_!r}: kind {kind!r} not in {KINDS}")
        mode = f.get("default_mode", "add")
        if mode not in DEFAULT_MODES:
            raise PackError(name, f"feature {fname_!r}: default_mode {mode!r} not in {DEFAULT_MODES}")
        cal = _req(name, f, "calibration", dict, where)
        scale = _finite_num(name, cal.get("scale"), f"feature {fname_!r} calibration.scale")
        if scale <= 0:
            raise PackError(name, f"feature {fname_!r}: calibration.scale must be > 0")
        t = tensors_of(FEATURES_FILE)
        dkey, ekey = f"{fname_}.direction", f"{fname_}.encoder"
        if dkey not in t:
            raise PackError(name, f"tensor {dkey!r} named by feature {fname_!r} is missing from {FEATURES_FILE}")
        direction = t[dkey]
        if direction.shape != (d,) or not np.linalg.norm(direction) > 0:
            raise PackError(name, f"feature {fname_!r}: direction must be a nonzero [{d}] vector")
        encoder = None
        if kind == "sae":
            if ekey not in t:
                raise PackError(name, f"tensor {ekey!r} named by feature {fname_!r} is missing from {FEATURES_FILE}")
            encoder = t[ekey]
            if encoder.shape != (d,):
                raise PackError(name, f"feature {fname_!r}: encoder must be a [{d}] vector")
        features[fname_] = Feature(
            name=fname_, layer=layer, kind=kind, direction=direction, encoder=encoder,
            bias=_finite_num(name, f.get("bias", 0.0), f"feature {fname_!r} bias"),
            threshold=_finite_num(name, f.get("threshold", 0.0), f"feature {fname_!r} threshold"),
            scale=scale, default_mode=mode, description=str(f.get("description", "")))
    if FEATURES_FILE in files and not feats_meta:
        tensors_of(FEATURES_FILE)  # still verify it is finite
    return Pack(path=path, manifest=m, features=features, saes=saes)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class PackWriter:
    """Assemble a pack in memory and write it (manifest last, with every file's sha256)."""

    def __init__(self, name: str, version: str, fingerprint: dict[str, Any], model_id: str = "",
                 description: str = "", license: str = "Apache-2.0",
                 provenance: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None) -> None:
        if not _NAME_RE.match(name):
            raise PackError(name, "pack name must match [A-Za-z0-9][A-Za-z0-9_.-]*")
        self.manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "name": name, "version": version,
            "description": description, "license": license,
            "model": {"id": model_id, "fingerprint": fingerprint},
            "provenance": {"date": now_iso(), **(provenance or {})},
            "calibration": calibration or {},
            "files": {}, "features": [], "saes": [],
        }
        self._feature_tensors: dict[str, np.ndarray] = {}
        self._sae_tensors: dict[str, dict[str, np.ndarray]] = {}
        self._sidecars: dict[str, Any] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["model"]["fingerprint"]["hidden_size"])

    def add_feature(self, name: str, layer: int, kind: str, direction: np.ndarray,
                    calibration: dict[str, Any], description: str = "",
                    tags: Iterable[str] = (), default_mode: str = "add",
                    encoder: np.ndarray | None = None, bias: float = 0.0, threshold: float = 0.0,
                    evidence: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
        if any(f["name"] == name for f in self.manifest["features"]):
            raise PackError(self.manifest["name"], f"duplicate feature name {name!r}")
        if "scale" not in calibration:
            raise ValueError("calibration needs 'scale'")
        entry: dict[str, Any] = {
            "name": name, "description": description, "tags": list(tags), "layer": int(layer),
            "site": site(layer), "kind": kind, "default_mode": default_mode,
            "bias": float(bias), "threshold": float(threshold), "calibration": calibration,
        }
        if evidence:
            entry["evidence"] = evidence
        if source:
            entry["source"] = source
        if extra:
            entry.update(extra)
        self.manifest["features"].append(entry)
        self._feature_tensors[f"{name}.direction"] = np.asarray(direction, np.float32)
        if kind == "sae":
            if encoder is None:
                raise ValueError("an sae feature needs an encoder")
            self._feature_tensors[f"{name}.encoder"] = np.asarray(encoder, np.float32)

    def add_sae(self, sae: SAE, info: dict[str, Any] | None = None,
                labels: dict[str, Any] | None = None) -> None:
        f = SAE_FILE.format(id=sae.id)
        t = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        for k in ("threshold", "latent_p50", "latent_p99", "latent_max", "latent_freq"):
            v = getattr(sae, k)
            if v is not None:
                t[k] = v
        self._sae_tensors[f] = t
        entry = {"id": sae.id, "layer": sae.layer, "site": site(sae.layer), "d_in": sae.d_in,
                 "d_sae": sae.d_sae, "activation": sae.activation, "file": f}
        if sae.k:
            entry["k"] = int(sae.k)
        if labels is not None:
            lf = SAE_LABELS_FILE.format(id=sae.id)
            self._sidecars[lf] = labels
            entry["labels"] = lf
        entry.update(info or {})
        self.manifest["saes"].append(entry)

    def write(self, out_dir: str | Path, sae_dtype: str = "bfloat16") -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {}
        meta = {"pack": self.manifest["name"], "format": f"steer-pack/{SCHEMA_VERSION}"}
        if self._feature_tensors:
            save_tensors(out / FEATURES_FILE, self._feature_tensors, "float32", meta)
            files[FEATURES_FILE] = None
        for f, t in self._sae_tensors.items():
            # large matrices in sae_dtype; small vectors stay float32
            big = {k: v for k, v in t.items() if k in ("W_enc", "W_dec")}
            small = {k: v for k, v in t.items() if k not in big}
            _save_mixed(out / f, big, small, sae_dtype, meta)
            files[f] = None
        for f, obj in self._sidecars.items():
            (out / f).write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                                            default=_json_default))
            files[f] = None
        self.manifest["files"] = {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size}
                                  for f in files}
        (out / MANIFEST_FILE).write_text(
            json.dumps(self.manifest, indent=2, ensure_ascii=False, default=_json_default) + "\n")
        return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _save_mixed(path: Path, big: dict[str, np.ndarray], small: dict[str, np.ndarray], dtype: str,
                metadata: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save_file

    td = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(td).contiguous() for k, v in big.items()}
    out.update({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in small.items()})
    save_file(out, str(path), metadata=metadata)


def validate_pack(path: str | Path, model_dir: str | Path | None = None,
                  strict_model: bool = True) -> dict[str, Any]:
    """Load ``path`` fully (against ``model_dir``'s fingerprint when given); a summary dict."""
    fp = model_fingerprint(model_dir) if model_dir is not None else None
    pack = load_pack(path, fp, strict_model)
    s = pack.summary()
    s["ok"] = True
    s["checked_against_model"] = fp is not None
    return s
