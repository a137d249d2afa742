"""Compiling a request's steering (:class:`steering.spec.SteeringSpec`) to a program for one
model and engine configuration.

Semantics at site L (the residual stream after decoder block L), with d̂ the unit direction,
act(h) the feature's activation and c its calibration scale (1 for raw vectors):
    add:    h ← h + s·c·d̂            (raw vector v: h ← h + scale·v)
    clamp:  h ← h + (t − act(h))·d   (t = s·c, or `target` for raw vectors)
    scale:  h ← h + (s − 1)·act(h)·d
    ablate: clamp to 0
A multi-layer feature (``Feature.layers``) does this at each of its layers L_i with one strength:
d̂_i = directions[i]/‖directions[i]‖ and the dose scaled by g_i = ‖directions[i]‖/‖direction‖
(add: h ← h + s·c·directions[i]/‖direction‖; clamp target t_i = s·c·g_i). A ``lowrank`` feature
(LoReFT) does at each of its layers
    add:    h ← h + α·Rᵀ(W h + b − R h),  α = s·c     (r linear entries: enc W_k − R_k, bias b_k,
                                                        dec R_k, α, β = 0)
    ablate: h ← h − RᵀR h                              (r entries: enc = dec = R_k, α = −1, β = 0)
and has no clamp or scale (a 400). Strength 0 adds exactly nothing (α = 0, β = 0).
With ``when`` (a condition on a named feature at a layer at or before L, or before a multi-layer
feature's first layer) an entry steers only the tokens where the condition holds; a conditional
add becomes an entry (α = 0, β = 1, d = the vector) so it can be gated. Monitors compile to
readout tests carried beside the program. See :mod:`steering.monitors` for both. Conditions,
monitors and readouts read a feature at its readout layer ``Feature.layer``.
Only the delta is added: an SAE's reconstruction error never enters the stream.
The spec's shape is checked by pydantic (:mod:`steering.spec`); here the checks that need the
engine (layers, hidden size, bounds, feature names, the fields a mode needs). Any invalid field
raises SteeringError with an OpenAI-style ``param`` path; nothing is applied.

Raw vectors are bounded twice. Every value must be finite *after* the float32 cast the workers
apply (1e39 is a finite JSON number but inf in float32), and so must ``scale·v``. And when the
server measured its layers' residual-stream norms (``SteeringCompiler.layer_norms``: the median
‖h‖ at each steerable layer, position 0 excluded — the calibration the packs use), an added
``scale·v`` may be at most F × that norm and a clamp target at most F × that norm, with
F = min(``max_vector_norm``, ``max_strength`` × DOSE_FRACTION): ``--max-steering-strength`` bounds
a raw vector's dose exactly as it bounds a named feature's (strength s adds s/4 of the stream's
norm). ``DEFAULT_MAX_VECTOR_NORM`` = 4: the bundled features degrade at ≈ 0.5 × ‖h‖ and collapse
into gibberish by ≈ 2 × ‖h‖, so 4 × admits every useful dose (and experiments well past the
collapse) while refusing pushes that only blow up the stream; a key's policy may pass a smaller
F for the request's own vectors (``compile(..., key_bound=KeyBound(F_key, first))``: a vector the
server accepts but the key's F refuses raises :class:`KeyBoundExceeded` once the rest compiled,
so a request the server refuses anyway gets that 400). Without measured norms (unit tests) only the float32
checks and an absolute bound (‖scale·v‖² finite in float32, what RMSNorm squares) apply.

Over 400 lines because the compiler is one class whose methods share the semantics above:
features, raw vectors, conditions and monitors all place entries in the same program under the
same bounds; the program's tables are :mod:`steering.program`, the wire record :mod:`steering.wire`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from steering.config import SteeringConfig
from steering.features import AmbiguousFeature, Feature, FeatureSource, Mode, UnknownFeature
from steering.packs.manifest import DOSE_FRACTION
from steering.monitors import MAX_CONDITIONS, MonitorProgram, monitors_to_wire
from steering.program import ConditionProgram, SteeringProgram
from steering.spec import (
    MAX_MONITORS,
    Condition,
    FeatureSetting,
    MonitorSpec,
    SteeringError,
    SteeringSpec,
    Threshold,
    VectorSpec,
)
from steering.validation import echo
from steering.wire import ApplyTo, WireRecord

__all__ = ["CompiledSteering", "KeyBound", "KeyBoundExceeded", "SteeringCompiler", "SteeringError"]

DEFAULT_MAX_VECTOR_NORM = 8.0
"""F: the largest ‖scale·v‖ (and |clamp target|) of a raw vector, in units of its layer's median
residual norm (see the module docstring). 8 = the dose bound of the default --max-steering-strength
(32 × 0.25): coherence already collapses near 2 (hotwire's dose guard, our packs), but a deliberate
push that forces a token (the engine tests push 5.8× at the last layer) stays possible; a key's
policy lowers it (max_vector_norm)."""
FLOAT32_SAFE_NORM = float(np.sqrt(np.finfo(np.float32).max))
"""‖scale·v‖ above this squares to inf in float32 (RMSNorm's mean of squares): refused always."""
READOUT_RECORD_OVERHEAD = 224
"""Bytes a worker spends per readout record beyond its float32 values (tuple, array header,
position): measured with ``sys.getsizeof`` on CPython 3.11."""


def readout_record_bytes(values: int) -> int:
    """What one readout record of ``values`` float32 numbers costs a worker (its accounting unit)."""
    return 4 * int(values) + READOUT_RECORD_OVERHEAD


@dataclass
class CompiledSteering:
    """A validated request steering: the program, how it is applied, and what to echo."""

    program: SteeringProgram
    apply_to: str
    return_activations: bool
    applied: list[dict[str, Any]] = field(default_factory=list)
    capture: tuple[int, ...] = ()
    """Layers whose steered residual stream is read back too (feature inspection)."""
    entry_labels: dict[int, list[str | None]] = field(default_factory=dict)
    """Per layer, the feature/vector behind each entry, in table order; None for an entry whose
    act is no feature's activation (the rows of a lowrank feature)."""
    probes: list[tuple[str, Feature]] = field(default_factory=list)
    """Named features whose act(h) is computed from the captured stream at their readout layer on
    readout: unconditioned adds (they place no entry) and lowrank features."""
    salt: str | None = None
    """Overrides the prefix-cache salt (inspect requests use a unique one)."""
    monitors: list[MonitorProgram] = field(default_factory=list)
    """Features watched on the generated tokens (:mod:`steering.monitors`)."""

    def __post_init__(self) -> None:
        self._canonical = self.program.canonical()  # the program is complete: serialise it once
        self.table_hash = self.program.table_hash(self._canonical)
        h = hashlib.sha256(f"{self.table_hash}|{self.apply_to}".encode()).hexdigest()
        self.hash = h[:32]

    @property
    def cache_salt(self) -> str | None:
        """Prefix-cache salt: KV blocks are never shared across different steering. None for a
        request that only monitors (it changes no KV block: it shares the unsteered cache)."""
        if self.salt is None and not self.program.layers:
            return None
        return self.salt or f"steer-{self.hash}"

    @property
    def stops(self) -> bool:
        """Some monitor may end the generation (``action: stop``)."""
        return any(m.action == "stop" for m in self.monitors)

    def wire(self, readout_key: str | None = None) -> WireRecord:
        """The record that carries this steering to the workers.

        ``readout_key`` names where the worker files post-steering activations when
        ``return_activations`` is on (the API server's request id)."""
        readout = self.return_activations and readout_key is not None
        return WireRecord(
            hash=self.table_hash, apply_to=ApplyTo.named(self.apply_to),
            readout=self.return_activations, program=self.program.to_wire(self._canonical),
            readout_key=readout_key if readout else None,
            capture=self.capture if readout else (),
            monitors=monitors_to_wire(self.monitors, readout_key) if self.monitors else None)

    def extra_args(self, readout_key: str | None = None) -> dict[str, Any]:
        """The ``SamplingParams.extra_args`` that carry this steering to the workers."""
        return self.wire(readout_key).to_extra_args()

    def summary(self) -> dict[str, Any]:
        return {"hash": self.hash, "apply_to": self.apply_to, "applied": self.applied}

    def monitor_report(self, results: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """``steering.monitors`` of a response: each monitor with a worker's results (fired,
        first_token, peak); not fired when the worker reported nothing."""
        results = results or []
        out = []
        for i, m in enumerate(self.monitors):
            r = results[i] if i < len(results) else {}
            out.append({**m.summary(), "fired": bool(r.get("fired", False)),
                        "first_token": r.get("first_token"), "peak": r.get("peak")})
        return out

    def readout_bytes(self, positions: int) -> int:
        """Upper bound of what a worker holds for this request's readout over ``positions`` token
        positions: per position one record per layer with clamp/scale/ablate entries (their
        act values) and one per captured layer (its residual stream); 0 without a readout."""
        if not self.return_activations:
            return 0
        per_position = sum(readout_record_bytes(lp.num_entries)
                           for lp in self.program.layers.values() if lp.num_entries)
        per_position += len(self.capture) * readout_record_bytes(self.program.hidden_size)
        return int(positions) * per_position


@dataclass(frozen=True)
class KeyBound:
    """A stricter F for the request's own raw vectors (a key's policy ``max_vector_norm``)."""

    factor: float
    """The key's F, in units of the layer's median residual norm."""
    first: int = 0
    """The request's own vectors are ``spec.vectors[first:]`` (a preset's and a variant's come
    first and are exempt); the error's param counts from here, as the request wrote them."""


class KeyBoundExceeded(SteeringError):
    """A request's own raw vector that the server's bound admits and the key's refuses."""

    def __init__(self, message: str, param: str, factor: float) -> None:
        super().__init__(message, param)
        self.factor = factor


def _bounded(x: float, bound: float, param: str, what: str) -> float:
    if abs(x) > bound:
        raise SteeringError(f"|{what}| = {abs(x):g} exceeds the server maximum {bound:g}", param)
    return float(x)


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
        self.layer_norms: dict[int, float] | None = None
        """Median residual-stream norm per steerable layer, measured by the server at start;
        None: raw vectors get no norm bound relative to the stream."""
        self.max_vector_norm = DEFAULT_MAX_VECTOR_NORM
        """The server's F (see the module docstring); a policy may pass a smaller one."""

    # -- entry point --------------------------------------------------------------------
    def compile(self, payload: SteeringSpec | dict[str, Any] | None, *,
                max_vector_norm: float | None = None,
                key_bound: KeyBound | None = None) -> CompiledSteering | None:
        """None when the payload asks for nothing; SteeringError on any invalid field.

        ``max_vector_norm``: a stricter F for every vector of this request; the server's
        ``self.max_vector_norm`` still applies when it is smaller. ``key_bound``: a stricter F
        for the request's own vectors only, checked after everything else compiled
        (:class:`KeyBoundExceeded`)."""
        if payload is None:
            return None
        factor = min(self.max_vector_norm, self.cfg.max_strength * DOSE_FRACTION)
        if max_vector_norm is not None:
            factor = min(factor, float(max_vector_norm))
        spec = SteeringSpec.parse(payload)
        if len(spec.features) > self.cfg.max_features:
            raise SteeringError(
                f"{len(spec.features)} features exceed the server maximum {self.cfg.max_features}",
                "steering.features",
            )
        if len(spec.vectors) > self.cfg.max_vectors:
            raise SteeringError(
                f"{len(spec.vectors)} vectors exceed the server maximum {self.cfg.max_vectors}",
                "steering.vectors",
            )
        if len(spec.monitors) > MAX_MONITORS:
            raise SteeringError(
                f"{len(spec.monitors)} monitors (the request's, its preset's, its variant's and "
                f"its key's together) exceed the server maximum {MAX_MONITORS}", "steering.monitors")
        if spec.empty:
            return None

        program = SteeringProgram(hidden_size=self.hidden_size)
        applied: list[dict[str, Any]] = []
        labels: dict[int, list[str | None]] = {}
        probes: list[tuple[str, Feature]] = []
        for name, setting in spec.features.items():
            placed = _entry_counts(program)
            item, feat = self._feature(program, name, setting)
            applied.append(item)
            # a lowrank feature's rows read no activation of it: its readout is a probe's
            label = None if feat.kind == "lowrank" else item["feature"]
            if not _label_entries(program, placed, label, labels) or label is None:
                probes.append((item["feature"], feat))
        key_errors: list[KeyBoundExceeded] = []
        for i, vector in enumerate(spec.vectors):
            placed = _entry_counts(program)
            key = None
            if key_bound is not None and i >= key_bound.first:
                key = (min(factor, float(key_bound.factor)), f"steering.vectors[{i - key_bound.first}]")
            applied.append(self._vector(program, i, vector, factor, key, key_errors))
            _label_entries(program, placed, f"vectors[{i}]", labels)
        for layer, lp in program.layers.items():
            if lp.num_entries > self.cfg.max_features:
                raise SteeringError(
                    f"{lp.num_entries} clamp/scale/ablate entries at layer {layer} (a conditioned "
                    f"add and each row of a lowrank feature count as one) exceed the "
                    f"server maximum {self.cfg.max_features} (--max-steered-features)",
                    "steering",
                )
        if len(program.conditions) > MAX_CONDITIONS:
            raise SteeringError(f"{len(program.conditions)} distinct conditions exceed the server "
                                f"maximum {MAX_CONDITIONS}", "steering")
        monitors = [self._monitor(i, m) for i, m in enumerate(spec.monitors)]
        if key_errors:  # the server admits it all: the key's bound is what refuses it
            raise KeyBoundExceeded(key_errors[0].message, key_errors[0].param, float(key_bound.factor))
        readout = spec.return_activations
        capture = tuple(sorted({f.layer for _, f in probes})) if readout else ()
        return CompiledSteering(program, spec.apply_to, readout, applied, capture=capture,
                                entry_labels=labels, probes=probes, monitors=monitors)

    # -- pieces -------------------------------------------------------------------------
    def _check_layer(self, layer: int, param: str) -> int:
        if not 0 <= layer < self.num_layers:
            raise SteeringError(f"layer {layer} outside [0, {self.num_layers})", param)
        if layer not in self.layers:
            raise SteeringError(
                f"layer {layer} is not steerable on this server (--steer-layers)", param
            )
        return layer

    def _feature(self, program: SteeringProgram, name: str,
                 setting: FeatureSetting) -> tuple[dict[str, Any], Feature]:
        param = f"steering.features.{name}"
        feat = self._resolve(name, param)
        mode = setting.mode or feat.default_mode
        strength = setting.strength
        if strength is None:
            if mode != "ablate":
                raise SteeringError("strength is required", f"{param}.strength")
            strength = 0.0
        where = param if setting.bare else f"{param}.strength"
        s = _bounded(strength, self.cfg.max_strength, where, "strength")
        if feat.kind == "lowrank" and mode in ("clamp", "scale"):
            raise SteeringError(
                f"feature {feat.name!r} is a rank-{feat.lowrank.rank} lowrank intervention: it has "
                f"no single activation to {mode}; use add (its trained edit at strength s) or "
                f"ablate (remove its subspace)", f"{param}.mode")
        layers = [self._check_layer(L, param) for L in feat.steered_layers()]
        item: dict[str, Any] = {"feature": feat.name, "layer": feat.layer}
        if len(layers) > 1:
            item["layers"] = layers
        item.update(mode=mode, strength=s)
        cond = 0
        if setting.when is not None:  # read before the feature's first write
            cond = self._condition(program, setting.when, layers[0], f"{param}.when")
            item["when"] = self._threshold_summary(setting.when)
        self._place(program, feat, mode, s, cond)
        return item, feat

    @staticmethod
    def _place(program: SteeringProgram, feat: Feature, mode: Mode, s: float, cond: int = 0) -> None:
        """Write ``feat`` at strength ``s`` into ``program``, one :class:`FeaturePart` per layer.

        Semantics (c = feat.scale; per part: d̂_i, gain g_i, or R_i, W_i, b_i [r, d]):
            add:    x ← x + s·c·g_i·d̂_i                (an entry 0·act + 1 when conditioned)
            clamp:  x ← x + (s·c·g_i − act_i(x))·d̂_i    scale: x ← x + (s − 1)·act_i(x)·d̂_i
            ablate: clamp to 0
            lowrank add:    x ← x + α·R_iᵀ(W_i x + b_i − R_i x), α = s·c: per row k an entry
                            enc = W_ik − R_ik, bias = b_ik, linear, dec = R_ik, α, β = 0
            lowrank ablate: x ← x − R_iᵀR_i x: per row k enc = dec = R_ik, α = −1, β = 0
        act_i is the feature's readout (:meth:`Feature.activation`) with d̂_i in place of d̂.
        A single-layer feature has g = 1 and d̂_0 = d̂: its entries are those of one direction."""
        c = feat.scale
        for part in feat.parts():
            lp = program.at(part.layer)
            if part.R is not None:
                R, W, b = (np.asarray(a, dtype=np.float64) for a in (part.R, part.W, part.b))  # [r, d], [r, d], [r]
                for k in range(R.shape[0]):
                    if mode == "add":
                        lp.add_entry(W[k] - R[k], R[k], alpha=s * c, beta=0.0, bias=b[k], cond=cond)
                    else:  # ablate (clamp and scale are refused by _feature)
                        lp.add_entry(R[k], R[k], alpha=-1.0, beta=0.0, cond=cond)
                continue
            unit, g = part.unit, part.gain  # [d], dose of this layer per unit of strength
            if mode == "add" and not cond:
                lp.add_vector(s * c * g * unit)
                continue
            if feat.kind == "sae":
                enc, bias, theta, rectify = _readout(feat)
            else:
                enc, bias, theta, rectify = unit, 0.0, 0.0, False
            kw = dict(bias=bias, theta=theta, rectify=rectify, cond=cond)
            if mode == "add":  # gated: an entry whose coefficient is 0·act + 1 (its readout is act)
                lp.add_entry(enc, s * c * g * unit, alpha=0.0, beta=1.0, **kw)
                continue
            dec = feat.direction if feat.kind == "sae" else unit
            alpha, beta = {"clamp": (-1.0, s * c * g), "scale": (s - 1.0, 0.0),
                           "ablate": (-1.0, 0.0)}[mode]
            lp.add_entry(enc, dec, alpha=alpha, beta=beta, **kw)

    def _resolve(self, name: str, param: str) -> Feature:
        if self.features is None:
            raise SteeringError(f"unknown feature {echo(name)}: no feature packs are loaded", param,
                                "unknown_feature")
        try:
            feat = self.features.resolve(name)
        except UnknownFeature:
            raise SteeringError(f"unknown feature {echo(name)}", param, "unknown_feature") from None
        except AmbiguousFeature as e:
            raise SteeringError(str(e.args[0]), param, "ambiguous_feature") from None
        if feat.direction.shape != (self.hidden_size,):
            raise SteeringError(f"feature {feat.name!r} does not fit this model", param)
        return feat

    def _test(self, spec: Threshold, param: str) -> tuple[Feature, ConditionProgram]:
        """The readout test of a condition or monitor: its feature resolved, its layer readable,
        its threshold bounded (by ``max_target``, the bound of any activation a request names)."""
        feat = self._resolve(spec.feature, f"{param}.feature")
        self._check_layer(feat.layer, f"{param}.feature")
        bound = "above" if spec.above is not None else "below"
        threshold = _bounded(spec.threshold, self.cfg.max_target, f"{param}.{bound}", "threshold")
        enc, bias, theta, rectify = _readout(feat)
        f32 = lambda x: float(np.float32(x))  # noqa: E731  (as the workers hold it)
        return feat, ConditionProgram(layer=feat.layer, enc=enc.astype(np.float32), bias=f32(bias),
                                      theta=f32(theta), rectify=rectify,
                                      threshold=f32(threshold), sign=spec.sign)

    def _condition(self, program: SteeringProgram, when: Condition, layer: int, param: str) -> int:
        """The condition's index in ``program``; ``layer`` is the first layer it gates."""
        feat, test = self._test(when, param)
        if feat.layer > layer:
            raise SteeringError(
                f"the condition's feature {feat.name!r} is read at layer {feat.layer}, after the "
                f"steered layer {layer}: a condition must be read at or before the (first) layer "
                f"it steers", f"{param}.feature")
        return program.condition(test)

    @staticmethod
    def _threshold_summary(spec: Threshold) -> dict[str, Any]:
        return {"feature": spec.feature,
                "above" if spec.above is not None else "below": spec.threshold}

    def _monitor(self, i: int, spec: MonitorSpec) -> MonitorProgram:
        feat, test = self._test(spec, f"steering.monitors[{i}]")
        return MonitorProgram(feature=feat.name, test=test, action=spec.action)

    def _decode_values(self, vector: VectorSpec, param: str) -> np.ndarray:
        if (vector.values is None) == (vector.base64 is None):
            raise SteeringError("give exactly one of values or base64", param)
        d = self.hidden_size
        if vector.values is not None:
            if len(vector.values) != d:
                raise SteeringError(
                    f"vector has {len(vector.values)} values; the model's hidden size is {d}",
                    f"{param}.values",
                )
            with np.errstate(over="ignore"):
                v32 = np.asarray(vector.values, dtype=np.float32)
            if not np.all(np.isfinite(v32)):
                raise SteeringError(
                    f"vector values must be finite in float32 (|x| <= {np.finfo(np.float32).max:.4g})",
                    f"{param}.values")
            return v32.astype(np.float64)
        try:
            buf = base64.b64decode(vector.base64, validate=True)
        except (binascii.Error, ValueError):
            raise SteeringError("base64 is not valid base64", f"{param}.base64") from None
        if len(buf) != 4 * d:
            raise SteeringError(
                f"base64 decodes to {len(buf)} bytes; expected {4 * d} "
                f"(hidden size {d} × little-endian float32)",
                f"{param}.base64",
            )
        v = np.frombuffer(buf, dtype="<f4").astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise SteeringError("vector contains NaN or inf", f"{param}.base64")
        return v

    def _norm_bound(self, layer: int, factor: float) -> tuple[float, str]:
        """The largest ‖scale·v‖ at ``layer`` and how to explain it."""
        norm = (self.layer_norms or {}).get(layer)
        if norm is None:
            return FLOAT32_SAFE_NORM, "the float32 limit"
        return factor * norm, (f"{factor:g} × the median residual norm at layer {layer} "
                               f"({norm:.4g})")

    def _within_key(self, key: tuple[float, str] | None, errors: list[KeyBoundExceeded],
                    layer: int, value: float, v_norm: float, what: str) -> None:
        """Record (in ``errors``) where ``value`` (‖scale·v‖ or |target|) exceeds the key's
        stricter bound ``key = (F, own param)``, worded as the bound's own 400 would be."""
        if key is None:
            return
        bound, why = self._norm_bound(layer, key[0])
        if value <= bound:
            return
        own = key[1]
        if what == "target":
            message, param = f"|target| = {value:.4g} exceeds {bound:.4g} ({why})", f"{own}.target"
        else:
            message = f"‖scale·v‖ = {value:.4g} exceeds {bound:.4g} ({why})"
            param = f"{own}.{what}" if v_norm > bound else f"{own}.scale"
        errors.append(KeyBoundExceeded(message, param, key[0]))

    def _vector(self, program: SteeringProgram, i: int, vector: VectorSpec,
                factor: float = DEFAULT_MAX_VECTOR_NORM, key: tuple[float, str] | None = None,
                key_errors: list[KeyBoundExceeded] | None = None) -> dict[str, Any]:
        param = f"steering.vectors[{i}]"
        key_errors = key_errors if key_errors is not None else []
        layer = self._check_layer(vector.layer, f"{param}.layer")
        mode = vector.mode
        v = self._decode_values(vector, param)
        scale = _bounded(vector.scale, self.cfg.max_strength, f"{param}.scale", "scale")
        values_param = f"{param}.values" if vector.values is not None else f"{param}.base64"
        lp = program.at(layer)
        out: dict[str, Any] = {"vector": i, "layer": layer, "mode": mode}
        cond = 0
        if vector.when is not None:
            cond = self._condition(program, vector.when, layer, f"{param}.when")
            out["when"] = self._threshold_summary(vector.when)
        if mode == "add":
            bound, why = self._norm_bound(layer, factor)
            v_norm = float(np.linalg.norm(v))
            norm = abs(scale) * v_norm
            if not norm <= bound:
                raise SteeringError(
                    f"‖scale·v‖ = {norm:.4g} exceeds {bound:.4g} ({why})",
                    values_param if v_norm > bound else f"{param}.scale")
            self._within_key(key, key_errors, layer, norm, v_norm, values_param.rsplit(".", 1)[1])
            if cond:  # gated: an entry 0·act + 1 (its readout: the projection on v̂)
                unit = v / v_norm if v_norm > 0 else np.zeros_like(v)
                lp.add_entry(unit, scale * v, alpha=0.0, beta=1.0, cond=cond)
            else:
                lp.add_vector(scale * v)
            out["scale"] = scale
            return out
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            raise SteeringError(f"a zero vector has no direction to {mode}", param)
        unit = v / norm
        if mode == "clamp":
            if vector.target is None:
                raise SteeringError("clamp needs a target activation", f"{param}.target")
            t = _bounded(vector.target, self.cfg.max_target, f"{param}.target", "target")
            bound, why = self._norm_bound(layer, factor)
            if abs(t) > bound:
                raise SteeringError(f"|target| = {abs(t):.4g} exceeds {bound:.4g} ({why})",
                                    f"{param}.target")
            self._within_key(key, key_errors, layer, abs(t), norm, "target")
            lp.add_entry(unit, unit, alpha=-1.0, beta=t, cond=cond)
            out["target"] = t
        elif mode == "scale":
            lp.add_entry(unit, unit, alpha=scale - 1.0, beta=0.0, cond=cond)
            out["scale"] = scale
        else:  # ablate
            lp.add_entry(unit, unit, alpha=-1.0, beta=0.0, cond=cond)
        return out


def _entry_counts(program: SteeringProgram) -> dict[int, int]:
    """Entries per layer so far (before a feature or vector is placed)."""
    return {layer: lp.num_entries for layer, lp in program.layers.items()}


def _label_entries(program: SteeringProgram, before: dict[int, int], label: str | None,
                   labels: dict[int, list[str | None]]) -> int:
    """Label the entries placed since ``before`` (table order per layer); how many there were."""
    n = 0
    for layer, lp in program.layers.items():
        new = lp.num_entries - before.get(layer, 0)
        if new:
            labels.setdefault(layer, []).extend([label] * new)
            n += new
    return n


def _readout(feat: Feature) -> tuple[np.ndarray, float, float, bool]:
    """(e, b, θ, rectify) of a feature's act(h) (:meth:`Feature.activation`)."""
    if feat.kind == "sae":
        return np.asarray(feat.encoder, dtype=np.float64), float(feat.bias), float(feat.threshold), True
    return feat.unit_direction(), 0.0, 0.0, False


def build_compiler(cfg: SteeringConfig, hidden_size: int, num_layers: int,
                   model_dir: str | None = None, *, packs: FeatureSource | None = None,
                   max_vector_norm: float = DEFAULT_MAX_VECTOR_NORM) -> SteeringCompiler:
    """The compiler of ``steer serve``, of the stock-vLLM plugin and of its workers, built one
    way so the same spec compiles to the same program everywhere: over ``packs`` when given
    (``steer serve`` loads its packs before the engine starts), else over ``cfg.packs`` loaded for
    the model in ``model_dir`` (:func:`steering.packs.registry.load_config_packs`; none: no
    packs). ``max_vector_norm`` is the server's F (the workers measure no norms: it bounds
    nothing there)."""
    if packs is None:
        from steering.packs.registry import load_config_packs

        packs = load_config_packs(cfg.packs, model_dir)
    compiler = SteeringCompiler(cfg, hidden_size=hidden_size, num_layers=num_layers,
                                feature_source=packs)
    compiler.max_vector_norm = max_vector_norm
    return compiler
