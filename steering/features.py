"""The feature-source interface: how named features ("formality", "pack/golden_gate") resolve.

Feature packs implement :class:`FeatureSource`; the request compiler only sees :class:`Feature`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np

FeatureKind = Literal["direction", "sae"]
"""``direction``: act(h) = h·d̂; ``sae``: act(h) = JumpReLU_θ(e·h + b)."""
KINDS: tuple[str, ...] = get_args(FeatureKind)
Mode = Literal["add", "clamp", "scale", "ablate"]
"""What steering does with a feature: see :mod:`steering.request` for the algebra."""
MODES: tuple[str, ...] = get_args(Mode)


class UnknownFeature(KeyError):
    """No feature of that name."""


class AmbiguousFeature(KeyError):
    """A bare name that several packs define; the message lists the qualified names."""


@dataclass(frozen=True, eq=False)
class Feature:
    """One steerable feature at one site (``blocks.{layer}.hook_resid_post``).

    act(h) = h·d̂ for ``direction`` features; act(h) = JumpReLU_θ(e·h + b) for ``sae`` features
    (θ = 0 is a plain ReLU). ``scale`` is the calibration c: strength 1.0 means c activation units.
    """

    name: str
    layer: int
    kind: FeatureKind
    direction: np.ndarray  # [d] decoder direction d (for ``direction`` features, any norm)
    encoder: np.ndarray | None = None  # [d] e, SAE features only
    bias: float = 0.0
    threshold: float = 0.0
    scale: float = 1.0
    default_mode: str = "add"
    description: str = ""

    def unit_direction(self) -> np.ndarray:
        d = np.asarray(self.direction, dtype=np.float64)
        return d / np.linalg.norm(d)

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
        raise UnknownFeature(f"unknown feature {name!r}")
