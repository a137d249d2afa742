"""Engine-wide steering configuration (fixed at engine start, like vLLM's LoRAConfig)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass
class SteeringConfig:
    """Sizes of the steering tables and the bounds requests are validated against."""

    max_slots: int | None = None
    """S: distinct steering configurations resident at once (slot 0, "no steering", is extra).
    None: as many as the engine batches sequences (its ``max_num_seqs``), so every request in a
    batch may carry its own equalizer; resolved by :meth:`for_batch` where the engine is known."""

    max_features: int = 32
    """K: clamp/scale/ablate entries one configuration may place at one layer."""

    bank_features: int = 512
    """F: distinct entry rows (feature directions, SAE encoder rows, rank-r rows, raw clamp
    vectors) the workers' feature bank holds per layer, shared by every slot that uses them
    (:mod:`steering.worker.bank`). Requests naming pack features share rows whatever their
    strengths; each distinct raw clamp/scale/ablate vector takes a row while it is in use."""

    layers: list[int] | None = None
    """Decoder layers whose output (``blocks.L.hook_resid_post``) can be steered; None = all."""

    max_strength: float = 32.0
    """Largest accepted |strength| (named features) and |scale| (raw vectors)."""

    max_target: float = 1.0e4
    """Largest accepted |target| of a raw-vector clamp, in activation units."""

    max_vectors: int = 32
    """Most raw vectors one request may carry."""

    max_readout_bytes: int = 512 * 2**20
    """A worker's hard cap on readout bytes held in all (``return_activations``, inspect); the
    API server's admission budget (``--max-readout-bytes-total``) keeps them under it, and past
    it the worker drops the oldest readout with a warning (its request then fails, never
    truncates)."""

    packs: list[str] = field(default_factory=list)
    """Feature packs the *workers* load to compile a request's steering themselves (stock ``vllm
    serve`` with our worker class, where a request carries its steering as a JSON string in
    ``vllm_xargs``; see :mod:`server.vllm_plugin`): pack folders (or folders of packs), and
    ``"bundled"`` for the bundled packs that fit the served model. Operator-supplied only, never
    from a request. Empty for ``steer serve``, which compiles in the API server and sends the
    workers compiled records."""

    def __post_init__(self) -> None:
        if self.max_slots is not None and self.max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if self.max_features < 0:
            raise ValueError("max_features must be >= 0")
        if self.bank_features < max(self.max_features, 1):
            raise ValueError("bank_features must be >= max_features (one configuration's entries "
                             "at a layer must fit) and >= 1")
        if self.layers is not None:
            self.layers = sorted(set(int(x) for x in self.layers))
        if isinstance(self.packs, str) or not all(isinstance(p, str) for p in self.packs):
            raise ValueError("packs must be a list of pack folders (or \"bundled\")")
        self.packs = list(self.packs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SteeringConfig":
        return cls(**d)

    def for_batch(self, max_num_seqs: int) -> "SteeringConfig":
        """This config with ``max_slots`` resolved: as set, or the engine's ``max_num_seqs``."""
        if self.max_slots is not None:
            return self
        return replace(self, max_slots=int(max_num_seqs))

    def steered_layers(self, num_layers: int) -> list[int]:
        """The concrete steerable layers of a model with ``num_layers`` decoder layers."""
        if self.layers is None:
            return list(range(num_layers))
        bad = [x for x in self.layers if not 0 <= x < num_layers]
        if bad:
            raise ValueError(f"--steer-layers {bad} outside [0, {num_layers})")
        return list(self.layers)
