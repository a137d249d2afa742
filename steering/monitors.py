"""Conditional steering and feature monitors: a named feature's activation, read per token inside
the batched op, either gates steering entries (conditions) or is reported and may end the
generation (monitors).

Both compare act(x) — the feature's own readout (:meth:`steering.features.Feature.activation`:
h·d̂ for directions, JumpReLU_θ(e·h + b) for SAE latents; the units ``/v1/features/inspect``
reports) — with a threshold: ``above`` x holds where act > x, ``below`` x where act < x.

Conditions. Semantics (token t, condition c of the token's program at layer Lc):
    gate_c(t) = [sign_c·(act_c(x_t) − threshold_c) > 0]          # 0.0 or 1.0
    an entry k with cond_k = c adds gate_c(t)·(α_k·act_k + β_k)·d_k  (cond_k = 0: gate ≡ 1.0)
x_t is the stream at Lc *before* any steering at Lc (after the steering of earlier layers), so
a condition at the layer it steers reads the unsteered activation there, and a condition on the
feature an entry clamps reads that feature's pre-clamp activation: "clamp X where X > 2"
pins exactly the tokens whose own X exceeds 2. Lc must be at or before the steered layer (the
gate is computed at Lc in the same forward pass, into a [Tmax, 1 + C] buffer allocated once;
column 0 is the constant 1.0). Per token, no host sync, no Python branch on data; an
unconditioned entry's coefficient is multiplied by exactly 1.0, so unconditioned requests'
tokens follow bitwise the same values as before. Per token only: a latched mode (steer the rest
of the sequence after the first trigger) would need per-request state on the device that
survives steps, is reset on preemption and is replayed by chunked prefill — not offered.

Monitors. Watch the *generated* tokens of one request (the prompt's are not read: a cached
prefix is never recomputed, so a prompt reading would depend on the cache). The monitor reads
act at its feature's layer *after* that layer's steering (the stream the next layer sees), when
the token is fed back to the model, i.e. one step after it was sampled; the last token of a
generation is never read. Each step that carries a monitored request copies that request's
activations to the host (one sync per monitored layer); other steps pay nothing. ``flag``
records fired / first token (0-based index among generated tokens) / peak activation; ``stop``
also makes the worker sample EOS for that request at this very step (its logits row masked), so
the generation ends right after the triggering token and vLLM finishes it as an ordinary stop;
the API server reports ``finish_reason: "content_filter"``. The other requests of the batch are
untouched.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steering.program import ConditionProgram

MAX_CONDITIONS = 4
"""C: distinct conditions one program may carry (the width of the gate buffer, beyond column 0)."""
MONITOR_REPORT_TTL_S = 120.0
"""A monitor report the API server did not collect is forgotten this long after its request ended."""
MAX_MONITOR_REPORTS = 4096
"""Monitor reports a worker keeps at once (the oldest are dropped beyond)."""
_FIELDS = ("layer", "enc", "bias", "theta", "rectify", "threshold", "sign", "stop")
_DTYPES = {"layer": "<i4", "rectify": np.uint8, "stop": np.uint8}


@dataclass(frozen=True, eq=False)
class MonitorProgram:
    """One compiled monitor: its feature's readout test and its action."""

    feature: str
    """Canonical ``pack/feature`` name."""
    test: ConditionProgram
    action: str  # flag | stop

    def summary(self) -> dict[str, Any]:
        return {"feature": self.feature, "layer": self.test.layer,
                "above" if self.test.sign > 0 else "below": self.test.threshold,
                "action": self.action}


def monitors_to_wire(monitors: list[MonitorProgram], key: str | None) -> dict[str, Any]:
    """The ``monitors`` entry of a wire record: little-endian arrays, one row per monitor."""
    t = [m.test for m in monitors]
    cols = {
        "layer": np.asarray([x.layer for x in t], "<i4"),
        "enc": np.stack([x.enc for x in t]).astype("<f4"),
        "bias": np.asarray([x.bias for x in t], "<f4"),
        "theta": np.asarray([x.theta for x in t], "<f4"),
        "rectify": np.asarray([x.rectify for x in t], np.uint8),
        "threshold": np.asarray([x.threshold for x in t], "<f4"),
        "sign": np.asarray([x.sign for x in t], "<f4"),
        "stop": np.asarray([m.action == "stop" for m in monitors], np.uint8),
    }
    return {"key": key, "n": len(monitors), **{k: v.tobytes() for k, v in cols.items()}}


class MonitorState:
    """One request's monitors inside a worker: device readouts per layer, host results."""

    def __init__(self, key: str, wire: dict[str, Any], hidden_size: int, dtype, device) -> None:
        n = int(wire["n"])
        a = {f: np.frombuffer(wire[f], dtype=_DTYPES.get(f, "<f4")) for f in _FIELDS}
        enc = a["enc"].reshape(n, hidden_size)
        self.key = key
        self.threshold = a["threshold"].astype(np.float64)  # [M]
        self.sign = a["sign"].astype(np.float64)  # [M]
        self.stop = a["stop"].astype(bool)  # [M]
        self.by_layer: dict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer in sorted(set(a["layer"].tolist())):
            idx = np.flatnonzero(a["layer"] == layer)
            cut = np.where(a["rectify"][idx] > 0, a["theta"][idx], -np.inf).astype(np.float32)
            t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)  # noqa: E731
            self.by_layer[layer] = (idx, t(enc[idx]), t(a["bias"][idx]), t(cut))  # [m], [m, d], [m], [m]
        self.fired = np.zeros(n, dtype=bool)
        self.first = np.full(n, -1, dtype=np.int64)  # generated-token index of the first trigger
        self.peak = np.full(n, -np.inf)
        self.stopped = False  # a stop monitor fired: this request samples EOS from now on
        self.eos: int | None = None  # set when seated (the request's own EOS token)
        self.ended: float | None = None

    def read(self, layer: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """act of this layer's monitors on ``x[rows]`` [n, m] (on the device), None if none here."""
        here = self.by_layer.get(layer)
        if here is None:
            return None
        _, enc, bias, cut = here
        pre = torch.addmm(bias, x.index_select(0, rows), enc.T)  # [n, m]
        return pre.masked_fill_(pre <= cut, 0.0)

    def observe(self, layer: int, generated: np.ndarray, acts: np.ndarray) -> bool:
        """Fold ``acts`` [n, m] of generated tokens ``generated`` [n] into the results; True when
        a stop monitor fired now."""
        idx = self.by_layer[layer][0]
        acts = acts.astype(np.float64)
        self.peak[idx] = np.maximum(self.peak[idx], acts.max(axis=0))
        hits = self.sign[idx] * (acts - self.threshold[idx]) > 0  # [n, m]
        newly_stopped = False
        for j, m in enumerate(idx):
            if not hits[:, j].any():
                continue
            first = int(generated[hits[:, j]].min())
            if not self.fired[m] or first < self.first[m]:
                self.first[m] = first
            self.fired[m] = True
            if self.stop[m] and not self.stopped:
                self.stopped = newly_stopped = True
        return newly_stopped

    def report(self) -> list[dict[str, Any]]:
        """Per monitor, in request order: fired, first_token (None if not fired), peak (None when
        no generated token was read)."""
        return [{"fired": bool(self.fired[i]),
                 "first_token": int(self.first[i]) if self.fired[i] else None,
                 "peak": float(self.peak[i]) if np.isfinite(self.peak[i]) else None}
                for i in range(len(self.fired))]


class MonitorStep:
    """One engine step's monitor work: which token rows each monitored request has, and the EOS
    each stopped request must sample when the step's logits are sampled."""

    def __init__(self, device) -> None:
        self.device = device
        self.meta: list[tuple[MonitorState, torch.Tensor, np.ndarray, int]] = []  # state, rows, generated, batch row
        self.layers: set[int] = set()  # layers read this step
        self.stop_rows: dict[int, int] = {}  # batch row → the EOS it samples this step

    def plan(self, monitor_reqs, num_scheduled: np.ndarray, num_computed: np.ndarray,
             num_prompt: np.ndarray) -> None:
        """This step's generated-token rows of each monitored (batch row, state) (prompt rows are
        not read); a request already stopped samples EOS again (it may be scheduled once more
        before the scheduler sees its stop)."""
        self.meta, self.layers, self.stop_rows = [], set(), {}
        ends = np.cumsum(num_scheduled)
        for r, st in monitor_reqs:
            if st.stopped and st.eos is not None:
                self.stop_rows[r] = st.eos
                continue
            n = int(num_scheduled[r])
            generated = int(num_computed[r]) + np.arange(n) - int(num_prompt[r])  # [n]
            keep = generated >= 0
            if not keep.any():
                continue
            rows = (int(ends[r]) - n + np.arange(n))[keep]
            self.meta.append((st, torch.from_numpy(rows).to(self.device), generated[keep], r))
            self.layers.update(st.by_layer)

    def observe(self, x: torch.Tensor, layer: int) -> None:
        """Read this layer's monitors on their requests' generated tokens of ``x`` [T, d] (the
        stream after the op).

        Host sync: one per monitored layer, only on steps that carry a monitored request."""
        parts, metas = [], []
        for st, rows, generated, r in self.meta:
            act = st.read(layer, x, rows)  # [n, m]
            if act is not None:
                parts.append(act.reshape(-1))
                metas.append((st, generated, r, act.shape))
        if not parts:
            return
        vals = torch.cat(parts).float().cpu().numpy()
        off = 0
        for st, generated, r, shape in metas:
            n = shape[0] * shape[1]
            if st.observe(layer, generated, vals[off : off + n].reshape(shape)) and st.eos is not None:
                self.stop_rows[r] = st.eos
            off += n

    def force_stops(self, logits: torch.Tensor | None) -> None:
        """Each stopped request samples its EOS: its logits row [V] is -inf but there (rows are
        the batch's requests in order, as vLLM samples them without speculative decoding)."""
        if not self.stop_rows or logits is None:
            return
        for r, eos in self.stop_rows.items():
            if r < logits.shape[0]:
                logits[r].fill_(float("-inf"))
                logits[r, eos] = 0.0
        self.stop_rows = {}

    def clear(self) -> None:
        """After the forward pass: nothing left to read (stop rows wait for the sampler)."""
        self.meta, self.layers = [], set()


class MonitorBook:
    """A worker's monitor states by API request id (kept after the request ended, for the API
    server to collect), bounded in count and time."""

    def __init__(self) -> None:
        self._by_key: OrderedDict[str, MonitorState] = OrderedDict()

    def open(self, state: MonitorState) -> None:
        self._by_key[state.key] = state
        while len(self._by_key) > MAX_MONITOR_REPORTS:
            self._by_key.popitem(last=False)

    def ended(self, state: MonitorState, now: float) -> None:
        """Its request ended: only the host results stay (until collected or expired)."""
        state.ended = now
        state.by_layer = {}

    def expire(self, now: float) -> None:
        for key in [k for k, s in self._by_key.items()
                    if s.ended is not None and now - s.ended > MONITOR_REPORT_TTL_S]:
            del self._by_key[key]

    def events(self, keys: list[str], final: bool) -> dict[str, list[dict[str, Any]]]:
        """Reports of ``keys`` (those known here); ``final`` forgets them."""
        out = {}
        for key in keys:
            state = self._by_key.pop(key, None) if final else self._by_key.get(key)
            if state is not None:
                out[key] = state.report()
        return out

    def __len__(self) -> int:
        return len(self._by_key)
