"""The feature-source interface: how named features ("formality", "pack/golden_gate") resolve.

Feature packs implement :class:`FeatureSource`; the request compiler only sees :class:`Feature`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np

from steering.validation import echo

FeatureKind = Literal["direction", "sae", "lowrank"]
"""``direction``: act(h) = h·d̂; ``sae``: act(h) = JumpReLU_θ(e·h + b); ``lowrank``: a rank-r
intervention h ← h + α·Rᵀ(W h + b − R h) per layer (LoReFT), read out as act(h) = h·d̂."""
KINDS: tuple[str, ...] = get_args(FeatureKind)
MAX_RANK = 8
"""Largest r of a ``lowrank`` feature: each of its rows is one table entry per layer, out of the
K (``--max-steered-features``, 32 by default) a configuration may place there."""
Mode = Literal["add", "clamp", "scale", "ablate"]
"""What steering does with a feature: see :mod:`steering.request` for the algebra."""
MODES: tuple[str, ...] = get_args(Mode)


class UnknownFeature(KeyError):
    """No feature of that name."""


class AmbiguousFeature(KeyError):
    """A bare name that several packs define; the message lists the qualified names."""


@dataclass(frozen=True, eq=False)
class LowRank:
    """The rank-r weights of a ``lowrank`` feature, one block per layer it steers (LoReFT,
    Wu et al. 2024): at layer ``layers[i]``, h ← h + α·R_iᵀ(W_i h + b_i − R_i h)."""

    R: np.ndarray  # [n, r, d] rows orthonormal per layer (R_i R_iᵀ = I)
    W: np.ndarray  # [n, r, d]
    b: np.ndarray  # [n, r]

    @property
    def rank(self) -> int:
        return int(self.R.shape[1])


@dataclass(frozen=True, eq=False)
class FeaturePart:
    """What a feature writes at one of its layers (:meth:`Feature.parts`)."""

    layer: int
    unit: np.ndarray  # [d] unit write direction d̂_i (for ``lowrank``: the readout's, unused)
    gain: float = 1.0  # ‖directions[i]‖ / ‖direction‖: this layer's dose per unit of strength
    R: np.ndarray | None = None  # [r, d] ``lowrank`` only
    W: np.ndarray | None = None  # [r, d]
    b: np.ndarray | None = None  # [r]


@dataclass(frozen=True, eq=False)
class Feature:
    """One steerable feature, read out at one site (``blocks.{layer}.hook_resid_post``) and
    written at one or more (``layers``).

    act(h) = h·d̂ for ``direction`` and ``lowrank`` features; act(h) = JumpReLU_θ(e·h + b) for
    ``sae`` features (θ = 0 is a plain ReLU). ``layer`` is the readout layer (conditions,
    monitors, inspect, readouts); a multi-layer feature also writes at its other ``layers``, row
    i of ``directions`` at ``layers[i]``, all at one strength. ``scale`` is the calibration c:
    strength 1.0 means c activation units (for ``lowrank``, α = s·c, c = 1 as trained).
    """

    name: str
    layer: int
    kind: FeatureKind
    direction: np.ndarray  # [d] readout direction d (for ``direction`` features, any norm)
    encoder: np.ndarray | None = None  # [d] e, SAE features only
    bias: float = 0.0
    threshold: float = 0.0
    scale: float = 1.0
    default_mode: str = "add"
    description: str = ""
    layers: tuple[int, ...] = ()  # the layers it writes, sorted; () = (layer,)
    directions: np.ndarray | None = None  # [n, d] write direction per layer (multi-layer directions)
    lowrank: LowRank | None = None  # ``lowrank`` features only

    def unit_direction(self) -> np.ndarray:
        d = np.asarray(self.direction, dtype=np.float64)
        return d / np.linalg.norm(d)

    def steered_layers(self) -> tuple[int, ...]:
        """The layers the feature writes (its readout layer alone unless ``layers`` says more)."""
        return tuple(self.layers) or (self.layer,)

    def parts(self) -> list[FeaturePart]:
        """Per written layer, what is written there: the one place the compiler reads them.

        Semantics: with n0 = ‖direction‖, layer i gets d̂_i = directions[i]/‖directions[i]‖ and
        gain_i = ‖directions[i]‖/n0 (an add writes s·c·gain_i·d̂_i = s·c·directions[i]/n0); a
        feature without ``directions`` writes d̂ with gain exactly 1 at each of its layers.
        ``lowrank`` parts carry R_i, W_i, b_i."""
        layers = self.steered_layers()
        unit = self.unit_direction()
        if self.lowrank is not None:
            lr = self.lowrank
            return [FeaturePart(L, unit, R=lr.R[i], W=lr.W[i], b=lr.b[i])
                    for i, L in enumerate(layers)]
        if self.directions is None:
            return [FeaturePart(L, unit) for L in layers]
        n0 = float(np.linalg.norm(np.asarray(self.direction, dtype=np.float64)))
        out = []
        for L, v in zip(layers, np.asarray(self.directions, dtype=np.float64)):  # v [d]
            n = float(np.linalg.norm(v))
            out.append(FeaturePart(L, v / n, gain=n / n0))
        return out

    def activation(self, h: np.ndarray) -> np.ndarray:
        """act(h) for residual-stream rows h [..., d] (the readout the clamp pins)."""
        h = np.asarray(h, dtype=np.float64)
        if self.kind != "sae":
            return h @ self.unit_direction()
        pre = h @ np.asarray(self.encoder, dtype=np.float64) + self.bias
        return np.where(pre > self.threshold, pre, 0.0)


class FeatureSource(Protocol):
    """Resolves a feature name from a request; raises UnknownFeature / AmbiguousFeature."""

    def resolve(self, name: str) -> Feature: ...


class StaticFeatureSource:
    """A FeatureSource over an in-memory list (tests, directions built on the fly)."""

    def __init__(self, features: list[Feature] | None = None) -> None:
        self._by_name: dict[str, Feature] = {}
        for f in features or []:
            self.add(f)

    def add(self, feature: Feature) -> None:
        if feature.name in self._by_name:
            raise ValueError(f"duplicate feature name {feature.name!r}")
        self._by_name[feature.name] = feature

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def resolve(self, name: str) -> Feature:
        if name in self._by_name:
            return self._by_name[name]
        hits = [n for n in self._by_name if n.rsplit("/", 1)[-1] == name]
        if len(hits) == 1:
            return self._by_name[hits[0]]
        if hits:
            raise AmbiguousFeature(f"feature {name!r} is ambiguous: use one of {sorted(hits)}")
        raise UnknownFeature(f"unknown feature {echo(name)}")
