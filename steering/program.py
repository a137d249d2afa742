"""A request's steering compiled to per-layer tables: the unit that occupies one slot.

A program is pure data (numpy float32): per steered layer an additive vector and up to K
"readout-dependent" entries. Each entry k acts on the residual stream x at that layer as

    pre_k = e_k·x + b_k
    act_k = 0 if (rectify_k and pre_k <= θ_k) else pre_k       # JumpReLU/ReLU or linear
    x    ← x + (α_k·act_k + β_k)·d_k

which expresses every mode: clamp (α=-1, β=t), scale (α=s-1, β=0), ablate (α=-1, β=0).
A rank-r (``lowrank``, LoReFT) feature is r linear entries per layer: with e_k = W_k − R_k,
b_k, d_k = R_k, α = s·c, β = 0 they sum to α·Rᵀ(W x + b − R x); its ablation is e_k = d_k = R_k,
α = -1 (x − RᵀR x). All entries of a layer read the same x, so the sum is exact.
The additive vector is applied first, so a clamp holds even when an add shares its layer.

An entry may be *conditioned*: ``cond_k`` = c > 0 names the program's condition c (1-based;
0 = unconditioned), and the entry's coefficient is multiplied by gate_c(t) ∈ {0, 1}, the
condition's test on token t's stream at the condition's layer (see :mod:`steering.monitors`).
A conditional add is an entry with e = 0, α = 0, β = 1 and d = the vector.

Programs travel to the workers inside a :class:`steering.wire.WireRecord` as raw little-endian
bytes (no pickles) and are shared between requests by content hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from steering.wire import WIRE_VERSION


@dataclass
class LayerProgram:
    """Everything one program does at one layer."""

    layer: int
    hidden_size: int
    add: np.ndarray | None = None  # [d]
    enc: list[np.ndarray] = field(default_factory=list)  # K × [d]
    dec: list[np.ndarray] = field(default_factory=list)  # K × [d]
    bias: list[float] = field(default_factory=list)
    theta: list[float] = field(default_factory=list)
    rectify: list[bool] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    cond: list[int] = field(default_factory=list)  # 0 = unconditioned, c = condition c

    @property
    def num_entries(self) -> int:
        return len(self.enc)

    def add_vector(self, v: np.ndarray) -> None:
        v = np.asarray(v, dtype=np.float64)
        self.add = v if self.add is None else self.add + v

    def add_entry(
        self,
        enc: np.ndarray,
        dec: np.ndarray,
        *,
        alpha: float,
        beta: float,
        bias: float = 0.0,
        theta: float = 0.0,
        rectify: bool = False,
        cond: int = 0,
    ) -> None:
        self.enc.append(np.asarray(enc, dtype=np.float32).reshape(self.hidden_size))
        self.dec.append(np.asarray(dec, dtype=np.float32).reshape(self.hidden_size))
        self.bias.append(float(bias))
        self.theta.append(float(theta))
        self.rectify.append(bool(rectify))
        self.alpha.append(float(alpha))
        self.beta.append(float(beta))
        self.cond.append(int(cond))

    # -- dense views ------------------------------------------------------------------
    def add_f32(self) -> np.ndarray | None:
        return None if self.add is None else np.ascontiguousarray(self.add, dtype=np.float32)

    def entries_f32(self) -> dict[str, np.ndarray]:
        k, d = self.num_entries, self.hidden_size
        return {
            "enc": np.stack(self.enc).astype(np.float32) if k else np.zeros((0, d), np.float32),
            "dec": np.stack(self.dec).astype(np.float32) if k else np.zeros((0, d), np.float32),
            "bias": np.asarray(self.bias, np.float32),
            "theta": np.asarray(self.theta, np.float32),
            "rectify": np.asarray(self.rectify, np.uint8),
            "alpha": np.asarray(self.alpha, np.float32),
            "beta": np.asarray(self.beta, np.float32),
            "cond": np.asarray(self.cond, np.uint8),
        }


@dataclass(frozen=True, eq=False)
class ConditionProgram:
    """One condition of a program: gate(t) = [sign·(act(x_t) − threshold) > 0] at ``layer``,
    act = e·x + b, zeroed where ``rectify`` and pre <= θ (a feature's own readout)."""

    layer: int
    enc: np.ndarray  # [d] float32
    bias: float
    theta: float
    rectify: bool
    threshold: float
    sign: float  # +1 above, -1 below

    def key(self) -> tuple:
        return (self.layer, self.enc.tobytes(), self.bias, self.theta, self.rectify,
                self.threshold, self.sign)


_ENTRY_FIELDS = ("enc", "dec", "bias", "theta", "rectify", "alpha", "beta", "cond")
_ENTRY_DTYPES = {"rectify": np.uint8, "cond": np.uint8}
_ENTRY_NAMES = "".join(_ENTRY_FIELDS).encode()
_COND_FIELDS = ("layer", "enc", "bias", "theta", "rectify", "threshold", "sign")
_COND_DTYPES = {"layer": "<i4", "rectify": np.uint8}


@dataclass
class SteeringProgram:
    """A compiled steering configuration: what one slot of the tables holds."""

    hidden_size: int
    layers: dict[int, LayerProgram] = field(default_factory=dict)
    conditions: list[ConditionProgram] = field(default_factory=list)
    """Condition c is ``conditions[c - 1]``."""

    def condition(self, cond: ConditionProgram) -> int:
        """The 1-based index of ``cond`` (an equal condition is stored once)."""
        for i, have in enumerate(self.conditions):
            if have.key() == cond.key():
                return i + 1
        self.conditions.append(cond)
        return len(self.conditions)

    def conditions_f32(self) -> dict[str, np.ndarray]:
        c = self.conditions
        return {
            "layer": np.asarray([x.layer for x in c], "<i4"),
            "enc": (np.stack([x.enc for x in c]).astype("<f4") if c
                    else np.zeros((0, self.hidden_size), "<f4")),
            "bias": np.asarray([x.bias for x in c], "<f4"),
            "theta": np.asarray([x.theta for x in c], "<f4"),
            "rectify": np.asarray([x.rectify for x in c], np.uint8),
            "threshold": np.asarray([x.threshold for x in c], "<f4"),
            "sign": np.asarray([x.sign for x in c], "<f4"),
        }

    def at(self, layer: int) -> LayerProgram:
        if layer not in self.layers:
            self.layers[layer] = LayerProgram(layer=layer, hidden_size=self.hidden_size)
        return self.layers[layer]

    # -- identity ---------------------------------------------------------------------
    def canonical(self) -> list[tuple[int, bytes | None, dict[str, bytes] | None]]:
        """Per steered layer in order: (layer, add as <f4 bytes or None, entry field bytes or
        None when the layer has no entries). Compute it once the program is complete and hand
        it to ``table_hash`` and ``to_wire``, which otherwise compute it each."""
        out = []
        for layer in sorted(self.layers):
            lp = self.layers[layer]
            add = lp.add_f32()
            ent = ({k: np.ascontiguousarray(v).tobytes() for k, v in lp.entries_f32().items()}
                   if lp.num_entries else None)
            out.append((layer, None if add is None else add.astype("<f4").tobytes(), ent))
        return out

    def table_hash(self, canonical: list | None = None) -> str:
        """Content hash of the tables: equal hashes share a slot."""
        h = hashlib.sha256(f"steering-program/v{WIRE_VERSION}/d={self.hidden_size}".encode())
        for layer, add, ent in canonical if canonical is not None else self.canonical():
            h.update(f"|L{layer}|".encode())
            h.update(b"-" if add is None else add)
            if ent is None:  # the same bytes as the loop below over empty fields
                h.update(_ENTRY_NAMES)
                continue
            for name in _ENTRY_FIELDS:
                h.update(name.encode())
                h.update(ent[name])
        if self.conditions:
            h.update(b"|conditions|")
            for name, arr in self.conditions_f32().items():
                h.update(name.encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    # -- wire -------------------------------------------------------------------------
    def to_wire(self, canonical: list | None = None) -> dict:
        layers = []
        for layer, add, ent in canonical if canonical is not None else self.canonical():
            item: dict = {"layer": layer, "k": self.layers[layer].num_entries}
            if add is not None:
                item["add"] = add
            if ent is not None:
                item.update(ent)
            layers.append(item)
        out: dict = {"d": self.hidden_size, "layers": layers}
        if self.conditions:
            out["conditions"] = {"n": len(self.conditions), **{
                k: np.ascontiguousarray(v).tobytes() for k, v in self.conditions_f32().items()}}
        return out

    @classmethod
    def from_wire(cls, wire: dict) -> "SteeringProgram":
        d = int(wire["d"])
        prog = cls(hidden_size=d)
        for item in wire["layers"]:
            lp = prog.at(int(item["layer"]))
            if "add" in item:
                lp.add = np.frombuffer(item["add"], dtype="<f4").copy()  # float32, as the tables take it
            k = int(item["k"])
            if k:
                arr = {
                    n: np.frombuffer(item[n], dtype=_ENTRY_DTYPES.get(n, "<f4")) for n in _ENTRY_FIELDS
                }
                enc, dec = arr["enc"].reshape(k, d), arr["dec"].reshape(k, d)
                for i in range(k):
                    lp.add_entry(
                        enc[i], dec[i],
                        alpha=arr["alpha"][i], beta=arr["beta"][i], bias=arr["bias"][i],
                        theta=arr["theta"][i], rectify=bool(arr["rectify"][i]),
                        cond=int(arr["cond"][i]),
                    )
        conds = wire.get("conditions")
        if conds:
            n = int(conds["n"])
            arr = {f: np.frombuffer(conds[f], dtype=_COND_DTYPES.get(f, "<f4")) for f in _COND_FIELDS}
            enc = arr["enc"].reshape(n, d)
            for i in range(n):
                prog.conditions.append(ConditionProgram(
                    layer=int(arr["layer"][i]), enc=enc[i].copy(), bias=float(arr["bias"][i]),
                    theta=float(arr["theta"][i]), rectify=bool(arr["rectify"][i]),
                    threshold=float(arr["threshold"][i]), sign=float(arr["sign"][i])))
        return prog
