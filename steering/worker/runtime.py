"""Worker-side steering state: tables allocated once, a per-token slot index filled each step,
and the batched op that reads them.

Per steered site (layer L), with S1 = S + 1 slots (slot 0 = no steering, all zeros):
    add   [S1, d]       summed additive vectors
    enc   [S1, K, d]    readout directions e_k        dec [S1, K, d]  write directions d_k
    bias, theta, alpha, beta [S1, K];  rect [S1, K] (1 = JumpReLU/ReLU readout, 0 = linear)
    cond  [S1, K]       the condition gating each entry (0 = none)
    cenc [S1, C, d], cbias, ccut, cthr, csign [S1, C]   conditions read at L (csign 0 = not here)
and one gate buffer [Tmax, 1 + C] (column 0 ≡ 1.0) that conditions fill and entries read.
Per step only ``token_slots[:T]`` changes (plus the rows of newly admitted slots).

Semantics (token t, slot s = token_slots[t], stream x = hidden + residual, or hidden alone when
the layer returns one tensor and residual is None; see :mod:`steering.worker.sites`):
    x ← x + add[s]
    pre = enc[s]·x + bias[s];  act = where(rect[s] & (pre <= theta[s]), 0, pre)     # [K]
    x ← x + Σ_k (alpha[s,k]·act_k + beta[s,k])·gate[t, cond[s,k]]·dec[s,k]
with gate[t, c] = [csign·(act_c(x) − cthr) > 0] computed at the condition's layer from x before
that layer's steering (:mod:`steering.monitors`). Monitors read act after the op, on the host.
The op adds the delta to ``hidden`` in place; vLLM's next layer (or final norm) sums it with
``residual`` (if any), so the stream is steered exactly once.

Requests the worker cannot seat (no free slot although the API server's gate admitted them, or a
program that cannot be written) run on slot 0 and are recorded in :attr:`SteeringRuntime.unseated`
for the API server to fail (see :mod:`steering.worker.slots`); nothing a request carries can stop the
engine.

Readouts (``return_activations``, inspect) are filed in a :class:`steering.worker.readouts.ReadoutStore`,
bounded in bytes by ``SteeringConfig.max_readout_bytes``.

Over 400 lines because the op, its slot-stacked tables and the per-step bookkeeping that
fills them are one unit: ``apply`` reads exactly what ``write_slot`` and ``begin_step`` wrote,
and the two entry paths must stay in step with each other.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from steering.config import SteeringConfig
from steering.monitors import MAX_CONDITIONS, MonitorBook, MonitorState, MonitorStep
from steering.program import SteeringProgram
from steering.worker.readouts import READOUT_DROPPED, Readout, ReadoutStore
from steering.worker.slots import SlotAllocator, SlotsExhausted
from steering.wire import ApplyTo, WireRecord

logger = logging.getLogger(__name__)

UNSEATED_TTL_S = 120.0
"""An unseated record the API server did not collect is forgotten after this long."""
MAX_UNSEATED = 4096
"""Unseated request ids kept for the API server to collect (older ones expire after the TTL)."""
__all__ = ["READOUT_DROPPED", "Readout", "SteeringRuntime", "get_runtime", "set_runtime"]
GATHER_ABOVE_SLOTS = 64
"""With host gating, clamp entries are computed per token from gathered rows once more than this
many slots (n_hi, slot 0 included) are in play; below it, matmuls over all their columns win.
Placed by ``python -m clients.bench.clamp_paths`` (2-core CPU, d = 576, bf16): at n_hi = 65 gathering
costs 0.25–1.04× the matmuls for T = 1…2048 and K = 8, 32; at n_hi = 257, 0.07–0.29×; at
n_hi <= 17 and T >= 256 it costs 1.8–13×."""
GATHER_CHUNK = 256
"""Tokens per gathered block: bounds the [chunk, K, d] copies (and keeps them in cache)."""


@dataclass
class SiteTables:
    """The tables of one steered layer."""

    add: torch.Tensor  # [S1, d]
    enc: torch.Tensor  # [S1, K, d]
    dec: torch.Tensor  # [S1, K, d]
    bias: torch.Tensor  # [S1, K]
    theta: torch.Tensor  # [S1, K]
    rect: torch.Tensor  # [S1, K] bool
    alpha: torch.Tensor  # [S1, K]
    beta: torch.Tensor  # [S1, K]
    cut: torch.Tensor  # [S1, K] where(rect, theta, -inf): act = 0 where pre <= cut (derived)
    cond: torch.Tensor  # [S1, K] int64: gate column of each entry (0 = the constant 1.0)
    cenc: torch.Tensor  # [S1, C, d] conditions read at this layer
    cbias: torch.Tensor  # [S1, C]
    ccut: torch.Tensor  # [S1, C] as ``cut``
    cthr: torch.Tensor  # [S1, C] threshold
    csign: torch.Tensor  # [S1, C] +1 above, -1 below, 0 = condition not read at this layer

    @classmethod
    def allocate(cls, s1: int, k: int, d: int, dtype, device, c: int = MAX_CONDITIONS) -> "SiteTables":
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return cls(
            add=z(s1, d), enc=z(s1, k, d), dec=z(s1, k, d), bias=z(s1, k), theta=z(s1, k),
            rect=torch.zeros(s1, k, dtype=torch.bool, device=device),
            alpha=z(s1, k), beta=z(s1, k),
            cut=torch.full((s1, k), float("-inf"), dtype=dtype, device=device),
            cond=torch.zeros(s1, k, dtype=torch.int64, device=device),
            cenc=z(s1, c, d), cbias=z(s1, c), cthr=z(s1, c), csign=z(s1, c),
            ccut=torch.full((s1, c), float("-inf"), dtype=dtype, device=device),
        )

    def clear_entries(self, slot: int, start: int, stop: int) -> None:
        """Entries ``start:stop`` of ``slot`` back to "no entry" (zeros; ``cut`` = -inf)."""
        for t in (self.enc, self.dec, self.bias, self.theta, self.rect, self.alpha, self.beta,
                  self.cond):
            t[slot, start:stop].zero_()
        self.cut[slot, start:stop].fill_(float("-inf"))

    def clear_conditions(self, slot: int) -> None:
        """No condition of ``slot`` is read at this layer."""
        for t in (self.cenc, self.cbias, self.cthr, self.csign):
            t[slot].zero_()
        self.ccut[slot].fill_(float("-inf"))


@dataclass
class _ReqSteering:
    slot: int
    apply_to: int
    readout_key: str | None  # where post-steering activations are filed; None = not asked
    capture: frozenset[int] = frozenset()  # layers whose steered stream is filed too
    unseated: bool = False  # steered, but runs on slot 0: the API server fails it
    monitor: MonitorState | None = None  # the request's monitors (None: not monitored)


class SteeringRuntime:
    """Everything the op needs inside one worker process."""

    def __init__(
        self,
        cfg: SteeringConfig,
        *,
        num_layers: int,
        hidden_size: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        host_gating: bool,
    ) -> None:
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dtype, self.device = dtype, device
        self.host_gating = host_gating
        self.s1 = cfg.max_slots + 1
        self.k = cfg.max_features
        self.layers = cfg.steered_layers(num_layers)
        self.tables = {
            L: SiteTables.allocate(self.s1, self.k, hidden_size, dtype, device) for L in self.layers
        }
        self.token_slots = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # [Tmax]
        self._host_slots = np.zeros(max_tokens, dtype=np.int64)
        self.col_slot = torch.arange(self.s1, device=device).repeat_interleave(self.k)  # [S1·K] slot of each entry column
        # Host mirrors of what each slot does where (for gating and readout).
        self.slot_add = np.zeros((self.s1, num_layers), dtype=bool)
        self.slot_entries = np.zeros((self.s1, num_layers), dtype=np.int64)
        self.slot_conds = np.zeros((self.s1, num_layers), dtype=bool)  # reads a condition at L
        self.slot_gated = np.zeros((self.s1, num_layers), dtype=bool)  # has gated entries at L
        self.c = MAX_CONDITIONS
        self.gates = torch.zeros(max_tokens, 1 + self.c, dtype=dtype, device=device)  # [Tmax, 1+C]
        self.gates[:, 0] = 1.0  # unconditioned entries: × exactly 1.0
        self.entries: EntryPath = AllSlotsEntries() if not host_gating else ByOccupancy()
        """How entries are computed at a site, chosen once (see :class:`EntryPath`)."""
        self.monitors = MonitorBook()
        self.allocator = SlotAllocator(cfg.max_slots)
        self.requests: dict[str, _ReqSteering] = {}
        self.readouts = ReadoutStore(cfg.max_readout_bytes)
        self.unseated: OrderedDict[str, float] = OrderedDict()  # request id → when it was refused
        self.unseated_total = 0
        # Per-step host state.
        self.num_tokens = 0
        self.site_add = np.zeros(num_layers, dtype=bool)
        self.site_entries = np.zeros(num_layers, dtype=bool)
        self.site_capture = np.zeros(num_layers, dtype=bool)
        self.site_conds = np.zeros(num_layers, dtype=bool)
        self.site_gated = np.zeros(num_layers, dtype=bool)
        self.site_monitor = np.zeros(num_layers, dtype=bool)
        self.monitor_step = MonitorStep(device)
        self.n_hi = self.s1
        self._readout_rows: np.ndarray | None = None  # token rows wanting readout
        self._readout_meta: list[tuple[str, int, int, frozenset[int]]] = []  # (key, pos, slot, capture)
        if not host_gating:
            self.site_add[self.layers] = True
            self.site_entries[self.layers] = self.k > 0
            self.site_conds[self.layers] = True
            self.site_gated[self.layers] = self.k > 0

    # -- slot contents ----------------------------------------------------------------------
    def write_slot(self, slot: int, program: SteeringProgram) -> None:
        """Put ``program`` in ``slot``, touching only the rows it or the slot's last program uses
        (a slot row the op reads must be zero where the program has nothing)."""
        for L, tab in self.tables.items():
            lp = program.layers.get(L)
            add = lp.add_f32() if lp is not None else None
            if add is not None:
                tab.add[slot].copy_(torch.from_numpy(add))
            elif self.slot_add[slot, L]:
                tab.add[slot].zero_()
            self.slot_add[slot, L] = add is not None
            k = lp.num_entries if lp is not None else 0
            had = int(self.slot_entries[slot, L])
            if had > k:  # entries beyond the new program's
                tab.clear_entries(slot, k, had)
            if k:
                e = lp.entries_f32()
                tab.enc[slot, :k].copy_(torch.from_numpy(e["enc"]))
                tab.dec[slot, :k].copy_(torch.from_numpy(e["dec"]))
                for name in ("bias", "theta", "alpha", "beta"):
                    getattr(tab, name)[slot, :k].copy_(torch.from_numpy(e[name]))
                rect = e["rectify"].astype(bool)
                tab.rect[slot, :k].copy_(torch.from_numpy(rect))
                tab.cut[slot, :k].copy_(torch.from_numpy(np.where(rect, e["theta"], -np.inf)))
                tab.cond[slot, :k].copy_(torch.from_numpy(e["cond"].astype(np.int64)))
            self.slot_entries[slot, L] = k
            self.slot_gated[slot, L] = bool(k) and bool(e["cond"].any())
            here = [(c, x) for c, x in enumerate(program.conditions) if x.layer == L]
            if here or self.slot_conds[slot, L]:
                tab.clear_conditions(slot)
            for c, x in here:
                tab.cenc[slot, c].copy_(torch.from_numpy(x.enc))
                tab.cbias[slot, c] = x.bias
                tab.ccut[slot, c] = x.theta if x.rectify else float("-inf")
                tab.cthr[slot, c] = x.threshold
                tab.csign[slot, c] = x.sign
            self.slot_conds[slot, L] = bool(here)

    # -- requests ---------------------------------------------------------------------------
    def admit(self, req_id: str, wire: WireRecord) -> _ReqSteering:
        """Seat ``req_id`` (a slot for its program, its readout); a request that cannot be seated
        is refused (:meth:`refuse`), never raised."""
        slot = 0  # a capture-only request (empty program) needs no slot
        if wire.steers:
            try:
                slot, needs_write = self.allocator.acquire(req_id, wire.hash)
            except SlotsExhausted as exc:
                return self.refuse(req_id, str(exc), wire)
            if needs_write:
                try:
                    self.write_slot(slot, SteeringProgram.from_wire(wire.program))
                except Exception as exc:  # noqa: BLE001  (a bad program fails its request only)
                    self._clear_slot(slot)
                    self.allocator.evict(req_id)
                    return self.refuse(req_id, f"its program could not be written: {exc}", wire)
        key = (wire.readout_key or req_id) if wire.readout else None
        capture = frozenset(x for x in wire.capture if x in self.tables)
        rs = _ReqSteering(slot=slot, apply_to=int(wire.apply_to), readout_key=key,
                          capture=capture if key is not None else frozenset())
        if wire.monitors is not None and not self.host_gating:
            # Under CUDA-graph replay the op's Python (the monitors' host read) does not run: no
            # report is kept, and the API server fails the request instead of reporting "quiet".
            logger.error("steering: request %s has monitors, which need the op's Python on every "
                         "step (start with --enforce-eager on GPU); not monitored", req_id)
        elif wire.monitors is not None:
            rs.monitor = MonitorState(wire.monitors.get("key") or req_id, wire.monitors,
                                      self.hidden_size, self.dtype, self.device)
            self.monitors.open(rs.monitor)
        self.requests[req_id] = rs
        if key is not None:
            self.readouts.open(key)
        return rs

    def refuse(self, req_id: str, reason: str, wire: WireRecord | None = None) -> _ReqSteering:
        """Run ``req_id`` unsteered on slot 0 and record it as unseated, for the API server to
        fail (``steering_take_unseated``): one failed request instead of a dead engine."""
        logger.error("steering: request %s cannot be steered (%s); it runs on slot 0 and its API "
                     "request is failed", req_id, reason)
        self.unseated[req_id] = time.monotonic()
        self.unseated_total += 1
        while len(self.unseated) > MAX_UNSEATED:
            self.unseated.popitem(last=False)
        rs = _ReqSteering(slot=0, apply_to=int(wire.apply_to) if wire is not None else 0,
                          readout_key=None, unseated=True)
        self.requests[req_id] = rs
        return rs

    def take_unseated(self, keys) -> list[str]:
        """Those of ``keys`` (API request ids) whose worker request (``key``, ``key-<suffix>``, or
        an ``n > 1`` child ``i_key…``) was refused; their records are forgotten."""
        hits = []
        for key in keys:
            found = [rid for rid in self.unseated if key in rid]
            for rid in found:
                del self.unseated[rid]
            if found:
                hits.append(key)
        return hits

    def _clear_slot(self, slot: int) -> None:
        """Every row of ``slot`` back to zeros (after a failed write)."""
        for L, tab in self.tables.items():
            tab.add[slot].zero_()
            tab.clear_entries(slot, 0, self.k)
            tab.clear_conditions(slot)
            self.slot_add[slot, L] = False
            self.slot_entries[slot, L] = 0
            self.slot_conds[slot, L] = self.slot_gated[slot, L] = False

    def release(self, req_ids) -> None:
        now = time.monotonic()
        for rid in req_ids:
            rs = self.requests.pop(rid, None)
            if rs is not None:
                self.allocator.release(rid)
                if rs.readout_key is not None:
                    self.readouts.ended(rs.readout_key, now)
                if rs.monitor is not None:
                    self.monitors.ended(rs.monitor, now)
        self.readouts.expire(now)
        self.monitors.expire(now)
        while self.unseated:
            rid, when = next(iter(self.unseated.items()))
            if now - when <= UNSEATED_TTL_S:
                break
            del self.unseated[rid]

    @property
    def readout_bytes(self) -> int:
        return self.readouts.nbytes

    def pop_readout(self, key: str) -> list[Readout] | str | None:
        """See :meth:`steering.worker.readouts.ReadoutStore.pop`."""
        return self.readouts.pop(key)

    def drop_readout(self, key: str) -> int:
        """Free the readout filed under ``key`` unread; returns the bytes freed."""
        return self.readouts.drop(key)

    # -- per step ---------------------------------------------------------------------------
    def begin_step(
        self,
        req_slots: np.ndarray,  # [R] slot per request (0 = none)
        apply_to: np.ndarray,  # [R]
        num_scheduled: np.ndarray,  # [R]
        num_computed: np.ndarray,  # [R]
        num_prompt: np.ndarray,  # [R]
        readout_reqs: list[tuple[int, _ReqSteering]],  # (batch row, state) of readout requests
        monitor_reqs: list[tuple[int, MonitorState]] = (),  # (batch row, state) of monitored ones
    ) -> None:
        """Fill the token → slot index for a step of sum(num_scheduled) tokens."""
        T = int(num_scheduled.sum())
        host = self._host_slots
        tok = np.repeat(req_slots, num_scheduled)  # [T]
        if np.any(apply_to[req_slots > 0] != ApplyTo.ALL):
            starts = np.repeat(np.cumsum(num_scheduled) - num_scheduled, num_scheduled)
            pos = np.repeat(num_computed, num_scheduled) + (np.arange(T) - starts)
            is_prompt = pos < np.repeat(num_prompt, num_scheduled)
            mode = np.repeat(apply_to, num_scheduled)
            keep = (mode == ApplyTo.ALL) | ((mode == ApplyTo.PROMPT) & is_prompt) | (
                (mode == ApplyTo.GENERATED) & ~is_prompt
            )
            tok = np.where(keep, tok, 0)
        host[:T] = tok
        stale = max(self.num_tokens - T, 0)
        if stale:
            host[T : T + stale] = 0
        n = T + stale
        self.token_slots[:n].copy_(torch.from_numpy(host[:n]), non_blocking=True)
        self.num_tokens = T
        if self.host_gating:
            present = np.unique(tok)
            present = present[present > 0]
            self.site_add = self.slot_add[present].any(axis=0)
            self.site_entries = (self.slot_entries[present] > 0).any(axis=0)
            self.site_conds = self.slot_conds[present].any(axis=0)
            self.site_gated = self.slot_gated[present].any(axis=0)
            self.n_hi = int(present.max()) + 1 if present.size else 1
        self._readout_rows = None
        self._readout_meta = []
        if readout_reqs:
            ends = np.cumsum(num_scheduled)
            rows, meta = [], []
            for r, rs in readout_reqs:
                self.site_capture[list(rs.capture)] = True
                for j in range(int(num_scheduled[r])):
                    row = int(ends[r] - num_scheduled[r] + j)
                    if tok[row] > 0 or rs.capture:
                        rows.append(row)
                        meta.append((rs.readout_key, int(num_computed[r]) + j, int(tok[row]), rs.capture))
            if rows:
                self._readout_rows = np.asarray(rows)
                self._readout_meta = meta
        self.monitor_step.plan(monitor_reqs, num_scheduled, num_computed, num_prompt)
        self.site_monitor[list(self.monitor_step.layers)] = True


    def end_step(self) -> None:
        if self.host_gating:
            self.site_add[:] = False
            self.site_entries[:] = False
            self.site_conds[:] = False
            self.site_gated[:] = False
        self.site_capture[:] = False
        self.site_monitor[:] = False
        self._readout_rows = None
        self._readout_meta = []
        self.monitor_step.clear()

    # -- the op body ------------------------------------------------------------------------
    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
        """Steer ``hidden`` [T, d] in place at ``layer`` (see the module docstring)."""
        do_add, do_entries = self.site_add[layer], self.site_entries[layer]
        do_conds = self.site_conds[layer]
        if not (do_add or do_entries or do_conds or self.site_capture[layer]
                or self.site_monitor[layer]):
            return
        T = hidden.shape[0]
        tab = self.tables[layer]
        idx = self.token_slots[:T]  # [T]
        if do_conds:  # before this layer's steering: a condition reads the unsteered stream here
            self._conditions(_stream(hidden, residual), tab, idx)
        gates = self.gates[:T] if self.site_gated[layer] else None  # [T, 1 + C]
        if do_add:
            hidden.add_(tab.add.index_select(0, idx))  # [T, d]
        if do_entries:
            self.entries.apply(self, hidden, residual, tab, idx, gates)
        if self._readout_rows is not None:
            self._record_readout(_stream(hidden, residual), tab, layer)
        if self.site_monitor[layer]:
            self.monitor_step.observe(_stream(hidden, residual), layer)

    def _conditions(self, x: torch.Tensor, tab: SiteTables, idx: torch.Tensor) -> None:
        """Fill gate columns 1..C for the conditions read at this layer from ``x`` [T, d], the
        stream before this layer's steering; other columns keep what earlier layers wrote.

        Semantics: gate[t, c] = [csign·(act_c(x_t) − cthr) > 0] where csign[slot[t], c] != 0."""
        T, C, d = x.shape[0], self.c, self.hidden_size
        nc = self.n_hi * C  # condition columns of the first n_hi slots
        pre = torch.addmm(tab.cbias.view(-1)[:nc], x, tab.cenc.view(-1, d)[:nc].T)  # [T, n_hi·C]
        pre = pre.view(T, self.n_hi, C).gather(1, idx.view(T, 1, 1).expand(T, 1, C)).squeeze(1)  # [T, C]
        act = pre.masked_fill_(pre <= tab.ccut.index_select(0, idx), 0.0)  # [T, C]
        sign = tab.csign.index_select(0, idx)  # [T, C]
        fired = (act - tab.cthr.index_select(0, idx)).mul_(sign) > 0  # [T, C]
        g = self.gates[:T, 1:]
        g.copy_(torch.where(sign != 0, fired.to(g.dtype), g))

    def _record_readout(self, x: torch.Tensor, tab: SiteTables, layer: int) -> None:
        """File act(h) after the op (and captured streams) for this step's readout tokens.

        Host sync: only steps that carry a ``return_activations`` request pay it."""
        rows = torch.from_numpy(self._readout_rows).to(x.device)
        slots = torch.tensor([m[2] for m in self._readout_meta], device=x.device)
        xs = x.index_select(0, rows)  # [R, d]
        pre = torch.einsum("rd,rkd->rk", xs, tab.enc[slots]) + tab.bias[slots]  # [R, K]
        act = torch.where(tab.rect[slots] & (pre <= tab.theta[slots]), torch.zeros_like(pre), pre)
        vals = act.float().cpu().numpy()
        streams = xs.float().cpu().numpy() if self.site_capture[layer] else None
        for i, (key, pos, slot, capture) in enumerate(self._readout_meta):
            if key not in self.readouts:
                continue
            k = int(self.slot_entries[slot, layer])
            if k:
                self.readouts.file(key, ("act", layer, pos, vals[i, :k].copy()))
            if streams is not None and layer in capture:
                self.readouts.file(key, ("resid", layer, pos, streams[i].copy()))


# -- the entries' kernel seam -------------------------------------------------------------------
class EntryPath:
    """How a site's entries are computed: one small interface, one subclass per way of computing
    them, chosen once per runtime (as vLLM's punica selects its LoRA kernels).

    Semantics (every path): hidden[t] += Σ_k coef(slot[t], k)·dec[slot[t], k], with coef =
    (alpha·act + beta)·gate and act as in the module docstring."""

    def apply(self, rt: SteeringRuntime, hidden: torch.Tensor, residual: torch.Tensor | None,
              tab: SiteTables, idx: torch.Tensor, gates: torch.Tensor | None) -> None:
        raise NotImplementedError


class AllSlotsEntries(EntryPath):
    """Two matmuls over the entry columns of the first n_hi slots, other slots' columns zeroed per
    token: graph-safe (the only path without host gating), and cheapest while few slots are in use."""

    def apply(self, rt: SteeringRuntime, hidden: torch.Tensor, residual: torch.Tensor | None,
              tab: SiteTables, idx: torch.Tensor, gates: torch.Tensor | None) -> None:
        nk, d = rt.n_hi * rt.k, rt.hidden_size  # entry columns of the first n_hi slots
        x = _stream(hidden, residual)  # [T, d]
        pre = torch.addmm(tab.bias.view(-1)[:nk], x, tab.enc.view(-1, d)[:nk].T)  # [T, nK]
        act = pre.masked_fill_(pre <= tab.cut.view(-1)[:nk], 0.0)  # [T, nK]
        coef = torch.addcmul(tab.beta.view(-1)[:nk], tab.alpha.view(-1)[:nk], act)  # [T, nK]
        coef.masked_fill_(idx[:, None] != rt.col_slot[None, :nk], 0.0)  # other slots' entries
        if gates is not None:  # conditioned entries × their gate; the others × exactly 1.0
            coef.mul_(gates.index_select(1, tab.cond.view(-1)[:nk]))  # [T, nK]
        hidden.addmm_(coef, tab.dec.view(-1, d)[:nk])  # [T, d]


class GatheredEntries(EntryPath):
    """Each token's own K entries, gathered, in blocks of ``GATHER_CHUNK`` tokens: work per token
    independent of how many slots are in use. Slot 0 and unused entries hold zeros (cut -inf), so
    they add 0."""

    def apply(self, rt: SteeringRuntime, hidden: torch.Tensor, residual: torch.Tensor | None,
              tab: SiteTables, idx: torch.Tensor, gates: torch.Tensor | None) -> None:
        for a in range(0, hidden.shape[0], GATHER_CHUNK):
            b = a + GATHER_CHUNK
            self._block(hidden[a:b], None if residual is None else residual[a:b], tab, idx[a:b],
                        None if gates is None else gates[a:b])

    @staticmethod
    def _block(hidden: torch.Tensor, residual: torch.Tensor | None, tab: SiteTables,
               idx: torch.Tensor, gates: torch.Tensor | None) -> None:
        x = _stream(hidden, residual)  # [t, d]
        enc = tab.enc.index_select(0, idx)  # [t, K, d]
        pre = torch.bmm(enc, x.unsqueeze(-1)).squeeze(-1).add_(tab.bias.index_select(0, idx))  # [t, K]
        act = pre.masked_fill_(pre <= tab.cut.index_select(0, idx), 0.0)  # [t, K]
        coef = torch.addcmul(tab.beta.index_select(0, idx), tab.alpha.index_select(0, idx), act)  # [t, K]
        if gates is not None:
            coef.mul_(gates.gather(1, tab.cond.index_select(0, idx)))  # [t, K]
        hidden.add_(torch.bmm(coef.unsqueeze(1), tab.dec.index_select(0, idx)).squeeze(1))  # [t, d]


class ByOccupancy(EntryPath):
    """With host gating: the all-slots path while at most ``GATHER_ABOVE_SLOTS`` slots (n_hi,
    slot 0 included) are in play this step, the gathered path above (placed by
    ``python -m clients.bench.clamp_paths``)."""

    def __init__(self) -> None:
        self.all_slots, self.gathered = AllSlotsEntries(), GatheredEntries()

    def apply(self, rt: SteeringRuntime, hidden: torch.Tensor, residual: torch.Tensor | None,
              tab: SiteTables, idx: torch.Tensor, gates: torch.Tensor | None) -> None:
        path = self.gathered if rt.n_hi > GATHER_ABOVE_SLOTS else self.all_slots
        path.apply(rt, hidden, residual, tab, idx, gates)


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream at a site: ``hidden + residual``, or ``hidden`` itself (read before
    it is written) for a layer that returns one tensor."""
    return hidden if residual is None else hidden + residual


_RUNTIME: SteeringRuntime | None = None


def set_runtime(rt: SteeringRuntime | None) -> None:
    global _RUNTIME
    _RUNTIME = rt


def get_runtime() -> SteeringRuntime | None:
    return _RUNTIME


def _steer_impl(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    """Semantics: hidden[t] += delta(slot[t], hidden[t] + residual[t]) at ``layer`` (residual
    None: the stream is hidden)."""
    rt = _RUNTIME
    if rt is not None:
        rt.apply(hidden, residual, layer)


# A plain dispatcher registration rather than ``torch.library.custom_op``: the latter's Python
# wrapper costs ~30 µs per call on the CPU (measured), paid at every steered layer of every step
# even when nothing is steered; a direct kernel registration costs ~4 µs. The schema's ``(a!)``
# tells torch.compile that ``hidden`` is mutated in place.
_LIB = torch.library.Library("steering", "DEF")
_LIB.define("steer_(Tensor(a!) hidden, Tensor? residual, int layer) -> ()")
_LIB.impl("steer_", _steer_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("steering::steer_")
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> None:
    return None
