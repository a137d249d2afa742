"""The `steering` object of a chat/completions request: validation and compilation to a program.

    "steering": {
      "features": {"formality": 0.6, "golden_gate": {"strength": 4.0, "mode": "clamp"}},
      "vectors":  [{"layer": 12, "values": [...d floats], "scale": 2.0, "mode": "add"},
                   {"layer": 12, "base64": "<little-endian float32>", "mode": "clamp", "target": 3.0}],
      "apply_to": "all" | "prompt" | "generated",
      "return_activations": false
    }

Semantics at site L (the residual stream after decoder block L), with d̂ the unit direction,
act(h) the feature's activation and c its calibration scale (1 for raw vectors):
    add:    h ← h + s·c·d̂            (raw vector v: h ← h + scale·v)
    clamp:  h ← h + (t − act(h))·d   (t = s·c, or `target` for raw vectors)
    scale:  h ← h + (s − 1)·act(h)·d
    ablate: clamp to 0
Only the delta is added: an SAE's reconstruction error never enters the stream.
Any invalid field raises SteeringError with an OpenAI-style ``param`` path; nothing is applied.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from steering.config import SteeringConfig
from steering.features import MODES, AmbiguousFeature, Feature, FeatureSource, UnknownFeature
from steering.program import EXTRA_ARGS_KEY, WIRE_VERSION, SteeringProgram

APPLY_TO = {"all": 0, "prompt": 1, "generated": 2}
_TOP_KEYS = {"features", "vectors", "apply_to", "return_activations"}
_VECTOR_KEYS = {"layer", "values", "base64", "scale", "mode", "target"}
_FEATURE_KEYS = {"strength", "mode"}
_JSON_NUMBERS = frozenset((int, float))  # exact types; bool is neither


class SteeringError(ValueError):
    """Invalid steering in a request; ``param`` names the offending field."""

    def __init__(self, message: str, param: str = "steering", code: str = "invalid_steering"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass
class CompiledSteering:
    """A validated request steering: the program, how it is applied, and what to echo."""

    program: SteeringProgram
    apply_to: str
    return_activations: bool
    applied: list[dict[str, Any]] = field(default_factory=list)
    capture: tuple[int, ...] = ()
    """Layers whose steered residual stream is read back too (feature inspection)."""
    entry_labels: dict[int, list[str]] = field(default_factory=dict)
    """Per layer, the feature/vector behind each clamp/scale/ablate entry, in table order."""
    probes: list[tuple[str, Feature]] = field(default_factory=list)
    """Add-mode named features whose act(h) is computed from the captured stream on readout."""
    salt: str | None = None
    """Overrides the prefix-cache salt (inspect requests use a unique one)."""

    def __post_init__(self) -> None:
        self._canonical = self.program.canonical()  # the program is complete: serialise it once
        self.table_hash = self.program.table_hash(self._canonical)
        h = hashlib.sha256(f"{self.table_hash}|{self.apply_to}".encode()).hexdigest()
        self.hash = h[:32]

    @property
    def cache_salt(self) -> str:
        """Prefix-cache salt: KV blocks are never shared across different steering."""
        return self.salt or f"steer-{self.hash}"

    def extra_args(self, readout_key: str | None = None) -> dict[str, Any]:
        """The ``SamplingParams.extra_args`` that carry this steering to the workers.

        ``readout_key`` names where the worker files post-steering activations when
        ``return_activations`` is on (the API server's request id)."""
        wire: dict[str, Any] = {
            "v": WIRE_VERSION,
            "hash": self.table_hash,
            "apply_to": APPLY_TO[self.apply_to],
            "readout": self.return_activations,
            "program": self.program.to_wire(self._canonical),
        }
        if self.return_activations and readout_key is not None:
            wire["readout_key"] = readout_key
            if self.capture:
                wire["capture"] = list(self.capture)
        return {EXTRA_ARGS_KEY: wire}

    def summary(self) -> dict[str, Any]:
        return {"hash": self.hash, "apply_to": self.apply_to, "applied": self.applied}


def _finite(x: Any, param: str, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SteeringError(f"{what} must be a number", param)
    x = float(x)
    if not math.isfinite(x):
        raise SteeringError(f"{what} must be finite", param)
    return x


def _bounded(x: Any, bound: float, param: str, what: str) -> float:
    x = _finite(x, param, what)
    if abs(x) > bound:
        raise SteeringError(f"|{what}| = {abs(x):g} exceeds the server maximum {bound:g}", param)
    return x


def _mode(x: Any, param: str) -> str:
    if x not in MODES:
        raise SteeringError(f"unknown mode {x!r}; expected one of {list(MODES)}", param)
    return x


class SteeringCompiler:
    """Turns request ``steering`` objects into programs for one model and engine config."""

    def __init__(
        self,
        cfg: SteeringConfig,
        hidden_size: int,
        num_layers: int,
        feature_source: FeatureSource | None = None,
    ) -> None:
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.layers_list = cfg.steered_layers(num_layers)
        self.layers = set(self.layers_list)
        self.features = feature_source

    # -- entry point --------------------------------------------------------------------
    def compile(self, payload: Any) -> CompiledSteering | None:
        """None when the payload asks for nothing; SteeringError on any invalid field."""
        if payload is None:
            return None
        if not isinstance(payload, dict):
            raise SteeringError("steering must be an object", "steering")
        for key in payload:
            if key not in _TOP_KEYS:
                raise SteeringError(f"unknown steering field {key!r}", f"steering.{key}")
        apply_to = payload.get("apply_to", "all")
        if apply_to not in APPLY_TO:
            raise SteeringError(
                f"apply_to must be one of {list(APPLY_TO)}", "steering.apply_to"
            )
        readout = payload.get("return_activations", False)
        if not isinstance(readout, bool):
            raise SteeringError("return_activations must be a boolean", "steering.return_activations")
        features = payload.get("features") or {}
        vectors = payload.get("vectors") or []
        if not isinstance(features, dict):
            raise SteeringError("features must be an object of name → strength", "steering.features")
        if not isinstance(vectors, list):
            raise SteeringError("vectors must be a list", "steering.vectors")
        if len(features) > self.cfg.max_features:
            raise SteeringError(
                f"{len(features)} features exceed the server maximum {self.cfg.max_features}",
                "steering.features",
            )
        if len(vectors) > self.cfg.max_vectors:
            raise SteeringError(
                f"{len(vectors)} vectors exceed the server maximum {self.cfg.max_vectors}",
                "steering.vectors",
            )
        if not features and not vectors:
            return None

        program = SteeringProgram(hidden_size=self.hidden_size)
        applied: list[dict[str, Any]] = []
        labels: dict[int, list[str]] = {}
        probes: list[tuple[str, Feature]] = []
        for name, spec in features.items():
            item, feat = self._feature(program, name, spec)
            applied.append(item)
            if item["mode"] == "add":
                probes.append((item["feature"], feat))
            else:
                labels.setdefault(item["layer"], []).append(item["feature"])
        for i, spec in enumerate(vectors):
            item = self._vector(program, i, spec)
            applied.append(item)
            if item["mode"] != "add":
                labels.setdefault(item["layer"], []).append(f"vectors[{i}]")
        for layer, lp in program.layers.items():
            if lp.num_entries > self.cfg.max_features:
                raise SteeringError(
                    f"{lp.num_entries} clamp/scale/ablate entries at layer {layer} exceed the "
                    f"server maximum {self.cfg.max_features} (--max-steered-features)",
                    "steering",
                )
        capture = tuple(sorted({f.layer for _, f in probes})) if readout else ()
        return CompiledSteering(program, apply_to, readout, applied, capture=capture,
                                entry_labels=labels, probes=probes)

    # -- pieces -------------------------------------------------------------------------
    def _check_layer(self, layer: Any, param: str) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SteeringError("layer must be an integer", param)
        if not 0 <= layer < self.num_layers:
            raise SteeringError(f"layer {layer} outside [0, {self.num_layers})", param)
        if layer not in self.layers:
            raise SteeringError(
                f"layer {layer} is not steerable on this server (--steer-layers)", param
            )
        return layer

    def _feature(self, program: SteeringProgram, name: Any, spec: Any) -> tuple[dict[str, Any], Feature]:
        param = f"steering.features.{name}"
        if self.features is None:
            raise SteeringError(f"unknown feature {name!r}: no feature packs are loaded", param,
                                "unknown_feature")
        try:
            feat = self.features.resolve(str(name))
        except UnknownFeature:
            raise SteeringError(f"unknown feature {name!r}", param, "unknown_feature") from None
        except AmbiguousFeature as e:
            raise SteeringError(str(e.args[0]), param, "ambiguous_feature") from None
        if isinstance(spec, dict):
            for key in spec:
                if key not in _FEATURE_KEYS:
                    raise SteeringError(f"unknown field {key!r}", f"{param}.{key}")
            mode = _mode(spec.get("mode", feat.default_mode), f"{param}.mode")
            raw_strength = spec.get("strength", 0.0 if mode == "ablate" else None)
            if raw_strength is None:
                raise SteeringError("strength is required", f"{param}.strength")
            s = _bounded(raw_strength, self.cfg.max_strength, f"{param}.strength", "strength")
        else:
            mode = feat.default_mode
            s = _bounded(spec, self.cfg.max_strength, param, "strength")
        layer = self._check_layer(feat.layer, param)
        if feat.direction.shape != (self.hidden_size,):
            raise SteeringError(f"feature {feat.name!r} does not fit this model", param)
        self._place(program.at(layer), feat, mode, s)
        return {"feature": feat.name, "layer": layer, "mode": mode, "strength": s}, feat

    @staticmethod
    def _place(lp, feat: Feature, mode: str, s: float) -> None:
        unit = feat.unit_direction()
        c = feat.scale
        if mode == "add":
            lp.add_vector(s * c * unit)
            return
        if feat.kind == "sae":
            enc, dec = feat.encoder, feat.direction
            kw = dict(bias=feat.bias, theta=feat.threshold, rectify=True)
        else:
            enc, dec, kw = unit, unit, {}
        alpha, beta = {"clamp": (-1.0, s * c), "scale": (s - 1.0, 0.0), "ablate": (-1.0, 0.0)}[mode]
        lp.add_entry(enc, dec, alpha=alpha, beta=beta, **kw)

    def _decode_values(self, spec: dict, param: str) -> np.ndarray:
        has_values, has_b64 = "values" in spec, "base64" in spec
        if has_values == has_b64:
            raise SteeringError("give exactly one of values or base64", param)
        d = self.hidden_size
        if has_values:
            vals = spec["values"]
            if not isinstance(vals, list) or not (
                _JSON_NUMBERS.issuperset(map(type, vals))  # what a JSON body holds: fast
                or all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)
            ):
                raise SteeringError("values must be a list of numbers", f"{param}.values")
            if len(vals) != d:
                raise SteeringError(
                    f"vector has {len(vals)} values; the model's hidden size is {d}",
                    f"{param}.values",
                )
            v = np.asarray(vals, dtype=np.float64)
            where = f"{param}.values"
        else:
            raw = spec["base64"]
            if not isinstance(raw, str):
                raise SteeringError("base64 must be a string", f"{param}.base64")
            try:
                buf = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise SteeringError("base64 is not valid base64", f"{param}.base64") from None
            if len(buf) != 4 * d:
                raise SteeringError(
                    f"base64 decodes to {len(buf)} bytes; expected {4 * d} "
                    f"(hidden size {d} × little-endian float32)",
                    f"{param}.base64",
                )
            v = np.frombuffer(buf, dtype="<f4").astype(np.float64)
            where = f"{param}.base64"
        if not np.all(np.isfinite(v)):
            raise SteeringError("vector contains NaN or inf", where)
        return v

    def _vector(self, program: SteeringProgram, i: int, spec: Any) -> dict[str, Any]:
        param = f"steering.vectors[{i}]"
        if not isinstance(spec, dict):
            raise SteeringError("each vector must be an object", param)
        for key in spec:
            if key not in _VECTOR_KEYS:
                raise SteeringError(f"unknown field {key!r}", f"{param}.{key}")
        if "layer" not in spec:
            raise SteeringError("layer is required", f"{param}.layer")
        layer = self._check_layer(spec["layer"], f"{param}.layer")
        mode = _mode(spec.get("mode", "add"), f"{param}.mode")
        v = self._decode_values(spec, param)
        scale = _bounded(spec.get("scale", 1.0), self.cfg.max_strength, f"{param}.scale", "scale")
        lp = program.at(layer)
        out: dict[str, Any] = {"vector": i, "layer": layer, "mode": mode}
        if mode == "add":
            lp.add_vector(scale * v)
            out["scale"] = scale
            return out
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            raise SteeringError(f"a zero vector has no direction to {mode}", param)
        unit = v / norm
        if mode == "clamp":
            if "target" not in spec:
                raise SteeringError("clamp needs a target activation", f"{param}.target")
            t = _bounded(spec["target"], self.cfg.max_target, f"{param}.target", "target")
            lp.add_entry(unit, unit, alpha=-1.0, beta=t)
            out["target"] = t
        elif mode == "scale":
            lp.add_entry(unit, unit, alpha=scale - 1.0, beta=0.0)
            out["scale"] = scale
        else:  # ablate
            lp.add_entry(unit, unit, alpha=-1.0, beta=0.0)
        return out
