"""Deterministic sticky assignment: sha256(experiment, unit) → u ∈ [0, 1) → weighted bucket."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def unit_hash(unit: str) -> str:
    """What is stored for a unit: its sha256, never the raw id."""
    return hashlib.sha256(unit.encode()).hexdigest()


def uniform(experiment: str, unit: str) -> float:
    """A uniform number in [0, 1) fixed by the experiment name and the unit."""
    digest = hashlib.sha256(f"{experiment}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def bucket(u: float, weights: Sequence[float]) -> int:
    """The index of the weighted bucket that ``u`` falls in."""
    total = float(sum(weights))
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w / total
        if u < acc:
            return i
    return len(weights) - 1


def assign(experiment: str, unit: str, weights: Sequence[float]) -> int:
    return bucket(uniform(experiment, unit), weights)
