"""PackRegistry: a FeatureSource over several loaded packs, plus the catalog queries.

Addressing:
  * ``pack/feature``: a named feature of a pack (always unambiguous);
  * ``feature``: the bare name, when exactly one loaded pack defines it (else AmbiguousFeature,
    listing the qualified names);
  * ``pack/SAE:i`` (bare ``SAE:i``): latent i of the pack's SAE with id SAE (e.g. ``L12:1234``),
    calibrated from the SAE's per-latent p99.

Catalog (for the HTTP routes): :meth:`packs`, :meth:`features`, :meth:`get`, :meth:`search`;
inspect: :meth:`saes`, :meth:`encode`, :meth:`latent_info`. Everything returned is plain
JSON-able data except :meth:`resolve` (a Feature) and :meth:`encode` (an array).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import sysconfig
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from steering.features import AmbiguousFeature, Feature, UnknownFeature
from steering.packs.format import SAE, Pack, load_pack
from steering.packs.manifest import MANIFEST_FILE, NO_EFFECT_TAG, PackError, site
from steering.packs.tensors import model_fingerprint
from steering.validation import echo

__all__ = ["BUNDLED_PACKS", "PackRegistry", "bundled_packs_dir", "discover_packs", "load_config_packs",
           "load_packs", "model_fingerprint"]

BUNDLED_PACKS = "bundled"
"""In a list of pack sources (``SteeringConfig.packs``): the bundled packs that fit the model."""

_LATENT_RE = re.compile(r"^(?P<sae>[A-Za-z0-9_.\-]+):(?P<i>\d+)$")
_WORD_RE = re.compile(r"[a-z0-9]+")


def bundled_packs_dir() -> Path:
    """The bundled data: the ``feature_packs`` package, holding the bundled packs,
    ``presets.yaml`` and ``recipes/``.

    The one place that locates it, found through :mod:`importlib.resources`, so a source
    checkout, an editable install and an installed wheel all serve the same packs whatever the
    working directory. It must be a real folder (packs are read with ``safetensors``)."""
    try:
        root = importlib.resources.files("feature_packs")
    except ModuleNotFoundError:
        raise RuntimeError(
            "the bundled feature packs (the 'feature_packs' package) are not installed: reinstall "
            "steer-server (`make install`, or `pip install -e .` in a checkout)") from None
    path = root if isinstance(root, Path) else Path(str(root))
    if not path.is_dir():
        raise RuntimeError(f"the bundled feature packs at {root} are not a folder on disk: "
                           "install steer-server unzipped (pip does)")
    return path


def default_pack_dir(name: str, base: Path | None = None) -> Path:
    """Where a builder writes pack ``name`` without ``--out``: ``base / name`` (default: beside
    the bundled packs, as in a source checkout) — refused when that lies in an installed package
    (site-packages), which a wheel install must not change."""
    out = ((base or bundled_packs_dir()) / name).resolve()
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if any(d == out or d in out.parents for d in installed):
        raise ValueError(f"no --out given, and the default {out} is inside the installed package: "
                         "pass --out DIR for the new pack")
    return out


def discover_packs(paths: Iterable[str | Path]) -> list[Path]:
    """Pack folders among ``paths``: a pack folder itself, or the pack folders directly inside."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / MANIFEST_FILE).is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if (c / MANIFEST_FILE).is_file()))
        else:
            raise FileNotFoundError(f"{p} is neither a pack folder nor a folder of packs")
    return out


def load_packs(paths: Iterable[str | Path], model_dir: str | Path | None, *,
               bundled: bool = False) -> PackRegistry:
    """The one pack loader of ``steer serve``, the stock-vLLM plugin and the workers: with
    ``bundled`` the bundled packs that fit the model in ``model_dir`` (packs built for other
    models are skipped) plus every pack under ``paths``; without, the packs under ``paths``. A
    pack under ``paths`` must fit the model. Raises PackError / FileNotFoundError naming the pack,
    ValueError for ``bundled`` without a local model folder."""
    paths = list(paths)
    if bundled:
        if model_dir is None:
            raise ValueError(f'steering: packs "{BUNDLED_PACKS}" needs a local model folder')
        return PackRegistry.bundled(model_dir, extra_paths=paths)
    return PackRegistry.from_paths(paths, model_dir)


def load_config_packs(sources: Iterable[str], model_dir: str | Path | None) -> PackRegistry | None:
    """The packs of a list of pack sources (``SteeringConfig.packs``): ``"bundled"``
    (:data:`BUNDLED_PACKS`) is the bundled packs that fit the model in ``model_dir``, anything
    else a pack folder (or a folder of packs) that must fit; None when the list is empty (no
    registry, so no model fingerprint either). See :func:`load_packs`."""
    sources = list(sources)
    if not sources:
        return None
    return load_packs([p for p in sources if p != BUNDLED_PACKS], model_dir,
                      bundled=BUNDLED_PACKS in sources)


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("_", " "))


class PackRegistry:
    """Loaded packs, checked against one model's fingerprint (if given)."""

    def __init__(self, fingerprint: dict[str, Any] | None = None, strict_model: bool = True) -> None:
        self.fingerprint = fingerprint
        self.strict_model = strict_model
        self._packs: dict[str, Pack] = {}
        self._cache: dict[str, Feature] = {}

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], model_dir: str | Path | None = None,
                   strict_model: bool = True) -> "PackRegistry":
        """Load every pack under ``paths`` (see :func:`discover_packs`), verified against the
        model in ``model_dir`` when given."""
        reg = cls(model_fingerprint(model_dir) if model_dir is not None else None, strict_model)
        for p in discover_packs(paths):
            reg.load(p)
        return reg

    @classmethod
    def bundled(cls, model_dir: str | Path, extra_paths: Iterable[str | Path] = (),
                strict_model: bool = True) -> "PackRegistry":
        """The packs of ``feature_packs/`` that fit the model in ``model_dir`` (packs for other
        models are skipped), plus every pack under ``extra_paths`` (those must fit)."""
        reg = cls(model_fingerprint(model_dir), strict_model)
        for p in discover_packs([bundled_packs_dir()]):
            try:
                reg.load(p)
            except PackError as e:
                if "built for another model" not in e.problem:
                    raise
        for p in discover_packs(extra_paths):
            reg.load(p)
        return reg

    def load(self, path: str | Path) -> Pack:
        pack = load_pack(path, self.fingerprint, self.strict_model)
        self.add(pack)
        return pack

    def add(self, pack: Pack) -> None:
        if pack.name in self._packs:
            raise PackError(pack.name, f"a pack of that name is already loaded (from {self._packs[pack.name].path})")
        if self._packs:
            ref = next(iter(self._packs.values())).manifest.model.fingerprint
            if ref.hidden_size != pack.manifest.model.fingerprint.hidden_size:
                raise PackError(pack.name, "hidden size differs from the other loaded packs")
        self._packs[pack.name] = pack
        self._cache.clear()

    def put(self, pack: Pack) -> None:
        """Add ``pack``, replacing the loaded pack of that name if any (the workshop's
        ``custom`` pack as custom features come and go); checked as :meth:`add` checks."""
        old = self._packs.pop(pack.name, None)
        try:
            self.add(pack)
        except PackError:
            if old is not None:
                self._packs[old.name] = old
            raise

    def remove(self, name: str) -> None:
        self._packs.pop(name)
        self._cache.clear()

    def __contains__(self, name: str) -> bool:
        """Whether a pack named ``name`` is loaded."""
        return name in self._packs

    def pack(self, name: str) -> Pack:
        try:
            return self._packs[name]
        except KeyError:
            raise KeyError(f"no pack {name!r} is loaded") from None

    # -- FeatureSource ----------------------------------------------------------------------
    def _locate(self, name: str) -> tuple[Pack, str]:
        """(pack, local name) for a qualified or bare name."""
        if "/" in name:
            pname, local = name.split("/", 1)
            if pname not in self._packs:
                raise UnknownFeature(f"unknown feature {echo(name)}: no pack {echo(pname)} is loaded")
            pack = self._packs[pname]
            if local in pack.features or self._latent(pack, local) is not None:
                return pack, local
            raise UnknownFeature(f"unknown feature {echo(name)}: pack {echo(pname)} has no feature {echo(local)}")
        hits = [p for p in self._packs.values()
                if name in p.features or self._latent(p, name) is not None]
        if not hits:
            raise UnknownFeature(f"unknown feature {echo(name)}")
        if len(hits) > 1:
            raise AmbiguousFeature(
                f"feature {name!r} is ambiguous: use one of {sorted(f'{p.name}/{name}' for p in hits)}")
        return hits[0], name

    @staticmethod
    def _latent(pack: Pack, local: str) -> tuple[SAE, int] | None:
        m = _LATENT_RE.match(local)
        if not m or m["sae"] not in pack.saes:
            return None
        sae, i = pack.saes[m["sae"]], int(m["i"])
        return (sae, i) if i < sae.d_sae else None

    def resolve(self, name: str) -> Feature:
        pack, local = self._locate(name)
        key = f"{pack.name}/{local}"
        if key in self._cache:
            return self._cache[key]
        if local in pack.features:
            feat = dataclasses.replace(pack.features[local], name=key)
        else:
            sae, i = self._latent(pack, local)  # type: ignore[misc]
            feat = sae.latent_feature(i, key)
        self._cache[key] = feat
        return feat

    # -- catalog ----------------------------------------------------------------------------
    def packs(self) -> list[dict[str, Any]]:
        return [p.summary() for p in sorted(self._packs.values(), key=lambda p: p.name)]

    def _entry(self, pack: Pack, local: str, full: bool = False) -> dict[str, Any]:
        meta = pack.feature_meta(local)
        e = {"id": f"{pack.name}/{local}", "name": local, "pack": pack.name,
             "description": meta.description, "tags": list(meta.tags),
             "layer": meta.layer, "site": meta.site or site(meta.layer),
             "kind": meta.kind, "default_mode": meta.default_mode,
             "calibration": meta.calibration.model_dump(exclude_unset=True)}
        if meta.layers is not None and len(meta.layers) > 1:
            e["layers"] = list(meta.layers)
        if meta.rank is not None:
            e["rank"] = meta.rank
        if full:
            e.update(meta.model_dump(include={"evidence", "source"} & meta.model_fields_set,
                                     exclude_unset=True))
        return e

    def features(self, pack: str | None = None, tag: str | None = None,
                 layer: int | None = None) -> list[dict[str, Any]]:
        """Named features (SAE latents are not listed; see :meth:`search` / :meth:`saes`)."""
        out = []
        for p in sorted(self._packs.values(), key=lambda p: p.name):
            if pack is not None and p.name != pack:
                continue
            for local, f in p.features.items():
                if layer is not None and f.layer != layer:
                    continue
                e = self._entry(p, local)
                if tag is not None and tag not in e["tags"]:
                    continue
                out.append(e)
        if pack is not None and pack not in self._packs:
            raise KeyError(f"no pack {pack!r} is loaded")
        return out

    def get(self, name: str) -> dict[str, Any]:
        """Catalog entry of a feature or latent (qualified or unambiguous bare name)."""
        pack, local = self._locate(name)
        if local in pack.features:
            return self._entry(pack, local, full=True)
        sae, i = self._latent(pack, local)  # type: ignore[misc]
        return self.latent_info(pack.name, sae.id, i)

    def latent_info(self, pack: str, sae_id: str, i: int) -> dict[str, Any]:
        p = self.pack(pack)
        sae = p.saes[sae_id]
        feat = sae.latent_feature(i, f"{pack}/{sae_id}:{i}")
        lab = (sae.labels[i] if sae.labels and i < len(sae.labels) else {}) or {}
        e = {"id": f"{pack}/{sae_id}:{i}", "name": f"{sae_id}:{i}", "pack": pack, "kind": "sae",
             "layer": sae.layer, "site": site(sae.layer), "latent": i, "sae": sae_id,
             "description": lab.get("label", ""), "tags": [], "default_mode": "add",
             "calibration": {"scale": feat.scale, "calibrated": sae.latent_p99 is not None}}
        for k in ("label", "top_tokens", "examples", "frequency", "explanation"):
            if k in lab:
                e[k] = lab[k]
        named = [f.name for f in p.manifest.features
                 if f.source is not None and f.source.sae == sae_id and f.source.latent == i]
        if named:
            e["named_as"] = [f"{pack}/{n}" for n in named]
        return e

    def search(self, q: str, limit: int = 20, include_latents: bool = True) -> list[dict[str, Any]]:
        """Rank features (and SAE latents) by token/substring matches of ``q`` against names,
        tags, descriptions and latent labels / top tokens. Each hit carries its ``score``."""
        qw = _words(q)
        ql = q.strip().lower()
        if not qw and not ql:
            return []
        hits: list[tuple[float, str, dict[str, Any]]] = []

        def score_text(name: str, tags: list[str], desc: str, extra: list[str] = ()) -> float:
            s = 0.0
            nw, dw = set(_words(name)), set(_words(desc))
            tw = {w for t in tags for w in _words(t)}
            ew = {w for t in extra for w in _words(t)}
            for w in qw:
                if w in nw:
                    s += 6
                elif any(x.startswith(w) or w in x for x in nw):
                    s += 3
                if w in tw:
                    s += 4
                if w in dw:
                    s += 2
                elif len(w) >= 3 and w in desc.lower():
                    s += 1
                if w in ew:
                    s += 1.5
            if ql and ql == name.lower().replace("_", " ").strip():
                s += 10
            return s

        for p in self._packs.values():
            for local in p.features:
                e = self._entry(p, local)
                sc = score_text(local, e["tags"], e["description"])
                if NO_EFFECT_TAG in e["tags"]:  # its name promises a concept steering did not show
                    sc *= 0.5
                if sc > 0:
                    hits.append((sc, e["id"], e))
            if not include_latents:
                continue
            for sid, sae in p.saes.items():
                if not sae.labels:
                    continue
                for i, lab in enumerate(sae.labels):
                    if not lab:
                        continue
                    toks = [t if isinstance(t, str) else str(t[0]) for t in lab.get("top_tokens", [])][:8]
                    sc = 0.6 * score_text("", [], lab.get("label", "") + " " + lab.get("explanation", ""), toks)
                    if sc > 0:
                        hits.append((sc, f"{p.name}/{sid}:{i}", {
                            "id": f"{p.name}/{sid}:{i}", "name": f"{sid}:{i}", "pack": p.name,
                            "kind": "sae", "layer": sae.layer, "latent": i,
                            "description": lab.get("label", ""), "top_tokens": toks}))
        hits.sort(key=lambda t: (-t[0], t[1]))
        return [{**e, "score": round(s, 3)} for s, _, e in hits[:max(0, int(limit))]]

    # -- SAE access (inspect) ---------------------------------------------------------------
    def saes(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self._packs.values(), key=lambda p: p.name):
            for sid, s in p.saes.items():
                out.append({"pack": p.name, "id": sid, "layer": s.layer, "site": site(s.layer),
                            "d_in": s.d_in, "d_sae": s.d_sae, "activation": s.activation, "k": s.k,
                            "labelled": bool(s.labels), "metrics": p.sae_meta(sid).metrics or {}})
        return out

    def sae(self, layer: int, pack: str | None = None, sae_id: str | None = None) -> SAE:
        cands = [(p.name, s) for p in self._packs.values() for s in p.saes.values()
                 if s.layer == layer and (pack is None or p.name == pack)
                 and (sae_id is None or s.id == sae_id)]
        if not cands:
            raise KeyError(f"no SAE at layer {layer}" + (f" in pack {pack!r}" if pack else ""))
        if len(cands) > 1:
            raise KeyError(f"several SAEs at layer {layer}: {sorted(f'{n}/{s.id}' for n, s in cands)}; pass pack=")
        return cands[0][1]

    def encode(self, layer: int, h, pack: str | None = None, sae_id: str | None = None):
        """SAE latent activations [T, d_sae] (native SAELens units) of residuals h [T, d]."""
        return self.sae(layer, pack, sae_id).encode(h)

    def labels(self, layer: int, pack: str | None = None) -> list[dict[str, Any]] | None:
        return self.sae(layer, pack).labels

    def top_latents(self, layer: int, h, k: int = 10, pack: str | None = None) -> list[list[dict[str, Any]]]:
        """Per position, the k most active latents with their labels (for an inspect view)."""
        sae = self.sae(layer, pack)
        acts = np.asarray(sae.encode(h))
        out = []
        for row in acts:
            idx = np.argsort(-row)[:k]
            out.append([{"latent": int(i), "act": float(row[i]), "label": sae.label(int(i))}
                        for i in idx if row[i] > 0])
        return out
