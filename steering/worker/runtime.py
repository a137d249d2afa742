"""Worker-side steering state: tables allocated once, a per-token slot index filled each step,
and the batched op that reads them.

Per steered site (layer L), with S1 = S + 1 slots (slot 0 = no steering, all zeros) and a feature
bank of F columns (:mod:`steering.worker.bank`; column 0 = the null row):
    add   [S1, d]       summed additive vectors (per slot)
    bank: enc [F, d] readout directions e_f, dec [F, d] write directions d_f, bias [F],
          cut [F] (θ where the readout is JumpReLU/ReLU, -inf where it is linear)
    col   [S1, K]       the bank column of each of a slot's entries (0 = no entry)
    alpha, beta [S1, K]; cond [S1, K] the condition gating each entry (0 = none)
    ccol, cthr, csign [S1, C]   conditions read at L: the bank row of their readout (e, b, cut;
                                its dec is zero), threshold, sign (csign 0 = not here)
and one gate buffer [Tmax, 1 + C] (column 0 ≡ 1.0) that conditions fill and entries read.
Every distinct entry or condition row is stored once however many slots use it: a slot costs
O(K + C) scalars per layer plus its add row, not (K + C)·d. Per step only ``token_slots[:T]`` changes
(plus the rows of newly admitted slots and the bank columns they bring).

Semantics (token t, slot s = token_slots[t], stream x = hidden + residual, or hidden alone when
the layer returns one tensor and residual is None; see :mod:`steering.worker.sites`):
    x ← x + add[s]
    for each entry k of s, f = col[s, k]:
        pre = enc[f]·x + bias[f];  act = 0 if pre <= cut[f] else pre
        x ← x + (alpha[s,k]·act + beta[s,k])·gate[t, cond[s,k]]·dec[f]
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
from steering.worker.bank import BankFull, FeatureBank, row_key
from steering.worker.readouts import READOUT_DROPPED, Readout, ReadoutStore
from steering.worker.slots import SlotAllocator, SlotsExhausted
from steering.wire import ApplyTo, WireRecord

logger = logging.getLogger(__name__)

UNSEATED_TTL_S = 120.0
"""An unseated record the API server did not collect is forgotten after this long."""
MAX_UNSEATED = 4096
"""Unseated request ids kept for the API server to collect (older ones expire after the TTL)."""
__all__ = ["READOUT_DROPPED", "Readout", "SteeringRuntime", "get_runtime", "set_runtime"]
GATHER_COLUMNS_PER_ENTRY = 64
"""With host gating, entries are computed per token from gathered bank rows once the bank's used
columns exceed this many per entry a token reads (``hi > 64·k``); below it, two matmuls over the
used columns win. From ``python -m clients.bench.clamp_paths`` (2-core CPU, d = 576, bf16; there
as all-slots columns n_hi·K against K gathered rows per token): break-even near 65 columns per
gathered row (0.25–1.04× at 65 slots × K = 8), gathering 1.8–13× dearer at 17 × 8."""
GATHER_CHUNK = 256
"""Tokens per gathered block: bounds the [chunk, K, d] copies (and keeps them in cache)."""


@dataclass
class SiteTables:
    """The tables of one steered layer: each slot's own rows, and the feature bank its entries
    point into (see the module docstring)."""

    add: torch.Tensor  # [S1, d]
    enc: torch.Tensor  # [F, d] bank
    dec: torch.Tensor  # [F, d] bank
    bias: torch.Tensor  # [F] bank
    cut: torch.Tensor  # [F] bank: act = 0 where pre <= cut (θ rectified, -inf linear)
    col: torch.Tensor  # [S1, K] int64: the bank column of each entry (0 = none)
    alpha: torch.Tensor  # [S1, K]
    beta: torch.Tensor  # [S1, K]
    cond: torch.Tensor  # [S1, K] int64: gate column of each entry (0 = the constant 1.0)
    ccol: torch.Tensor  # [S1, C] int64: the bank row each condition read here reads (0 = none)
    cthr: torch.Tensor  # [S1, C] threshold
    csign: torch.Tensor  # [S1, C] +1 above, -1 below, 0 = condition not read at this layer

    BANK = ("enc", "dec", "bias", "cut")
    """The fields sized by the bank, not by the slots."""

    @classmethod
    def allocate(cls, s1: int, k: int, d: int, dtype, device, f: int,
                 c: int = MAX_CONDITIONS) -> "SiteTables":
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        i64 = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        return cls(
            add=z(s1, d), enc=z(f, d), dec=z(f, d), bias=z(f),
            cut=torch.full((f,), float("-inf"), dtype=dtype, device=device),
            col=i64(s1, k), alpha=z(s1, k), beta=z(s1, k), cond=i64(s1, k),
            ccol=i64(s1, c), cthr=z(s1, c), csign=z(s1, c),
        )

    @classmethod
    def nbytes(cls, k: int, d: int, dtype, f: int) -> tuple[int, int]:
        """(bytes one slot adds, bytes of the bank) at one layer, as :meth:`allocate` lays them out."""
        one = cls.allocate(1, k, d, dtype, torch.device("meta"), f)
        size = {n: t.numel() * t.element_size() for n, t in vars(one).items()}
        return (sum(v for n, v in size.items() if n not in cls.BANK),
                sum(v for n, v in size.items() if n in cls.BANK))

    def clear_entries(self, slot: int, start: int, stop: int) -> None:
        """Entries ``start:stop`` of ``slot`` back to "no entry" (the null column, zeros)."""
        for t in (self.col, self.alpha, self.beta, self.cond):
            t[slot, start:stop].zero_()

    def write_column(self, col: int, enc: np.ndarray, dec: np.ndarray, bias: float,
                     cut: float) -> None:
        self.enc[col].copy_(torch.from_numpy(enc))
        self.dec[col].copy_(torch.from_numpy(dec))
        self.bias[col] = float(bias)
        self.cut[col] = float(cut)

    def clear_column(self, col: int) -> None:
        """A freed bank column back to the null row (zeros; ``cut`` -inf)."""
        self.enc[col].zero_()
        self.dec[col].zero_()
        self.bias[col] = 0.0
        self.cut[col] = float("-inf")

    def clear_conditions(self, slot: int) -> None:
        """No condition of ``slot`` is read at this layer."""
        for t in (self.ccol, self.cthr, self.csign):
            t[slot].zero_()


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
        if cfg.max_slots is None:
            raise ValueError("the runtime needs a resolved slot count (SteeringConfig.for_batch)")
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dtype, self.device = dtype, device
        self.host_gating = host_gating
        self.s1 = cfg.max_slots + 1
        self.k = cfg.max_features
        self.layers = cfg.steered_layers(num_layers)
        self.f = cfg.bank_features + 1  # bank columns, the null column 0 included
        self.tables = {
            L: SiteTables.allocate(self.s1, self.k, hidden_size, dtype, device, self.f)
            for L in self.layers
        }
        self.banks = {L: FeatureBank(self.f) for L in self.layers}
        self.slot_cols = {L: np.zeros((self.s1, self.k), dtype=np.int64) for L in self.layers}
        """Host mirror of ``SiteTables.col``: the bank columns each slot's entries hold."""
        self.slot_ccols = {L: np.zeros((self.s1, MAX_CONDITIONS), dtype=np.int64) for L in self.layers}
        """Host mirror of ``SiteTables.ccol``: the bank columns each slot's conditions hold."""
        self.token_slots = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # [Tmax]
        self._host_slots = np.zeros(max_tokens, dtype=np.int64)
        # Host mirrors of what each slot does where (for gating and readout).
        self.slot_add = np.zeros((self.s1, num_layers), dtype=bool)
        self.slot_entries = np.zeros((self.s1, num_layers), dtype=np.int64)
        self.slot_conds = np.zeros((self.s1, num_layers), dtype=bool)  # reads a condition at L
        self.slot_gated = np.zeros((self.s1, num_layers), dtype=bool)  # has gated entries at L
        self.c = MAX_CONDITIONS
        self.gates = torch.zeros(max_tokens, 1 + self.c, dtype=dtype, device=device)  # [Tmax, 1+C]
        self.gates[:, 0] = 1.0  # unconditioned entries: × exactly 1.0
        self.entries: EntryPath = BankColumns() if not host_gating else ByOccupancy()
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
        self.site_k = np.full(num_layers, self.k, dtype=np.int64)  # entries per slot read at L
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
            old = self.slot_cols[L][slot, :had].copy()
            gated = False
            if k:
                e = lp.entries_f32()
                cols = self._bank_rows(L, tab, e)  # before the old rows are released: shared ones stay
                tab.col[slot, :k].copy_(torch.from_numpy(cols))
                tab.alpha[slot, :k].copy_(torch.from_numpy(e["alpha"]))
                tab.beta[slot, :k].copy_(torch.from_numpy(e["beta"]))
                tab.cond[slot, :k].copy_(torch.from_numpy(e["cond"].astype(np.int64)))
                self.slot_cols[L][slot, :k] = cols
                gated = bool(e["cond"].any())
            if had > k:  # entries beyond the new program's
                tab.clear_entries(slot, k, had)
                self.slot_cols[L][slot, k:had] = 0
            self.slot_entries[slot, L] = k
            self._release_cols(L, tab, old)
            self.slot_gated[slot, L] = gated
            here = [(c, x) for c, x in enumerate(program.conditions) if x.layer == L]
            old = self.slot_ccols[L][slot].copy()
            ccols = self._bank_rows(L, tab, _condition_rows([x for _, x in here], self.hidden_size))
            if here or self.slot_conds[slot, L]:
                tab.clear_conditions(slot)
                self.slot_ccols[L][slot] = 0
            for (c, x), col in zip(here, ccols):
                tab.ccol[slot, c] = int(col)
                tab.cthr[slot, c] = x.threshold
                tab.csign[slot, c] = x.sign
                self.slot_ccols[L][slot, c] = col
            self._release_cols(L, tab, old)
            self.slot_conds[slot, L] = bool(here)

    def _bank_rows(self, L: int, tab: SiteTables, e: dict[str, np.ndarray]) -> np.ndarray:
        """The bank columns of a program's entries at ``L`` (one reference each), writing the
        rows the bank did not hold; on :class:`BankFull` nothing stays taken."""
        cut = np.where(e["rectify"].astype(bool), e["theta"], -np.inf).astype(np.float32)
        bank, cols = self.banks[L], []
        try:
            for i in range(len(cut)):
                col, new = bank.acquire(row_key(e["enc"][i], e["dec"][i], e["bias"][i], cut[i]))
                cols.append(col)
                if new:
                    tab.write_column(col, e["enc"][i], e["dec"][i], e["bias"][i], cut[i])
        except BankFull:
            self._release_cols(L, tab, cols)
            raise
        return np.asarray(cols, dtype=np.int64)

    def _release_cols(self, L: int, tab: SiteTables, cols) -> None:
        for col in cols:
            if self.banks[L].release(int(col)):
                tab.clear_column(int(col))

    def _write_or_evict(self, slot: int, program: SteeringProgram) -> None:
        """:meth:`write_slot`; when a bank is full, first drop the rows only idle slots (free,
        holding a configuration kept for reuse) still hold, then write once more."""
        try:
            self.write_slot(slot, program)
        except BankFull:
            self._clear_slot(slot)
            for idle in self.allocator.idle_slots():
                self._clear_slot(idle)
                self.allocator.forget(idle)
            self.write_slot(slot, program)

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
                    self._write_or_evict(slot, SteeringProgram.from_wire(wire.program))
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
        """Every row of ``slot`` back to zeros and its bank rows released (after a failed write,
        or to free the bank rows of an idle slot)."""
        for L, tab in self.tables.items():
            tab.add[slot].zero_()
            self._release_cols(L, tab, self.slot_cols[L][slot, : self.slot_entries[slot, L]])
            self._release_cols(L, tab, self.slot_ccols[L][slot])
            self.slot_cols[L][slot] = 0
            self.slot_ccols[L][slot] = 0
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
            self.site_k = self.slot_entries[present].max(axis=0, initial=0)
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
        f = self.banks[layer].hi if self.host_gating else self.f  # used bank columns
        if do_conds:  # before this layer's steering: a condition reads the unsteered stream here
            self._conditions(_stream(hidden, residual), tab, idx, f)
        gates = self.gates[:T] if self.site_gated[layer] else None  # [T, 1 + C]
        if do_add:
            hidden.add_(tab.add.index_select(0, idx))  # [T, d]
        if do_entries:
            self.entries.apply(hidden, residual, tab, idx, gates, f, int(self.site_k[layer]))
        if self._readout_rows is not None:
            self._record_readout(_stream(hidden, residual), tab, layer)
        if self.site_monitor[layer]:
            self.monitor_step.observe(_stream(hidden, residual), layer)

    def _conditions(self, x: torch.Tensor, tab: SiteTables, idx: torch.Tensor, f: int) -> None:
        """Fill gate columns 1..C for the conditions read at this layer from ``x`` [T, d], the
        stream before this layer's steering; other columns keep what earlier layers wrote.

        Semantics: gate[t, c] = [csign·(act_c(x_t) − cthr) > 0] where csign[slot[t], c] != 0,
        act_c the readout of bank row ccol[slot[t], c]."""
        pre = torch.addmm(tab.bias[:f], x, tab.enc[:f].T)  # [T, f] every used row's readout
        ccol = tab.ccol.index_select(0, idx)  # [T, C]
        pre = pre.gather(1, ccol)  # [T, C]
        act = pre.masked_fill_(pre <= tab.cut[ccol], 0.0)  # [T, C]
        sign = tab.csign.index_select(0, idx)  # [T, C]
        fired = (act - tab.cthr.index_select(0, idx)).mul_(sign) > 0  # [T, C]
        g = self.gates[:x.shape[0], 1:]
        g.copy_(torch.where(sign != 0, fired.to(g.dtype), g))

    def _record_readout(self, x: torch.Tensor, tab: SiteTables, layer: int) -> None:
        """File act(h) after the op (and captured streams) for this step's readout tokens.

        Host sync: only steps that carry a ``return_activations`` request pay it."""
        rows = torch.from_numpy(self._readout_rows).to(x.device)
        slots = torch.tensor([m[2] for m in self._readout_meta], device=x.device)
        xs = x.index_select(0, rows)  # [R, d]
        cols = tab.col.index_select(0, slots)  # [R, K]
        pre = torch.einsum("rd,rkd->rk", xs, tab.enc[cols]) + tab.bias[cols]  # [R, K]
        act = torch.where(pre <= tab.cut[cols], torch.zeros_like(pre), pre)
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

    Semantics (every path): hidden[t] += Σ_{k<k_hi} coef(slot[t], k)·dec[col[slot[t], k]], with
    coef = (alpha·act + beta)·gate and act of bank row col[slot[t], k] as in the module docstring;
    ``f`` bounds the bank columns in use, ``k_hi`` the entries any token's slot has here."""

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, tab: SiteTables,
              idx: torch.Tensor, gates: torch.Tensor | None, f: int, k_hi: int) -> None:
        raise NotImplementedError


class BankColumns(EntryPath):
    """Every used bank row's activation for the whole batch at once (one [T, d] × [d, f] matmul),
    each token's coefficients gathered from and scattered onto its slot's columns, and one
    [T, f] × [f, d] matmul to write: work independent of the number of slots, graph-safe (the
    only path without host gating, where f is the whole bank)."""

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, tab: SiteTables,
              idx: torch.Tensor, gates: torch.Tensor | None, f: int, k_hi: int) -> None:
        x = _stream(hidden, residual)  # [T, d]
        pre = torch.addmm(tab.bias[:f], x, tab.enc[:f].T)  # [T, f]
        act = pre.masked_fill_(pre <= tab.cut[:f], 0.0)  # [T, f]
        cols = tab.col[:, :k_hi].index_select(0, idx)  # [T, k]
        coef = torch.addcmul(tab.beta[:, :k_hi].index_select(0, idx),
                             tab.alpha[:, :k_hi].index_select(0, idx), act.gather(1, cols))  # [T, k]
        if gates is not None:  # conditioned entries × their gate; the others × exactly 1.0
            coef.mul_(gates.gather(1, tab.cond[:, :k_hi].index_select(0, idx)))  # [T, k]
        w = act.zero_().scatter_add_(1, cols, coef)  # [T, f]: a slot's repeated rows sum
        hidden.addmm_(w, tab.dec[:f])  # [T, d]


class GatheredEntries(EntryPath):
    """Each token's own k_hi bank rows, gathered, in blocks of ``GATHER_CHUNK`` tokens: work per
    token independent of how many rows the bank holds. Unused entries point at the null column
    (zeros, cut -inf) with zero coefficients, so they add 0."""

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, tab: SiteTables,
              idx: torch.Tensor, gates: torch.Tensor | None, f: int, k_hi: int) -> None:
        for a in range(0, hidden.shape[0], GATHER_CHUNK):
            b = a + GATHER_CHUNK
            self._block(hidden[a:b], None if residual is None else residual[a:b], tab, idx[a:b],
                        None if gates is None else gates[a:b], k_hi)

    @staticmethod
    def _block(hidden: torch.Tensor, residual: torch.Tensor | None, tab: SiteTables,
               idx: torch.Tensor, gates: torch.Tensor | None, k_hi: int) -> None:
        x = _stream(hidden, residual)  # [t, d]
        t, d = x.shape
        cols = tab.col[:, :k_hi].index_select(0, idx)  # [t, k]
        flat = cols.reshape(-1)
        enc = tab.enc.index_select(0, flat).view(t, k_hi, d)  # [t, k, d]
        pre = torch.bmm(enc, x.unsqueeze(-1)).squeeze(-1).add_(tab.bias[cols])  # [t, k]
        act = pre.masked_fill_(pre <= tab.cut[cols], 0.0)  # [t, k]
        coef = torch.addcmul(tab.beta[:, :k_hi].index_select(0, idx),
                             tab.alpha[:, :k_hi].index_select(0, idx), act)  # [t, k]
        if gates is not None:
            coef.mul_(gates.gather(1, tab.cond[:, :k_hi].index_select(0, idx)))  # [t, k]
        dec = tab.dec.index_select(0, flat).view(t, k_hi, d)  # [t, k, d]
        hidden.add_(torch.bmm(coef.unsqueeze(1), dec).squeeze(1))  # [t, d]


class ByOccupancy(EntryPath):
    """With host gating: the bank-columns path while the bank's used columns are at most
    ``GATHER_COLUMNS_PER_ENTRY`` per entry a token reads, the gathered path above."""

    def __init__(self) -> None:
        self.columns, self.gathered = BankColumns(), GatheredEntries()

    def apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, tab: SiteTables,
              idx: torch.Tensor, gates: torch.Tensor | None, f: int, k_hi: int) -> None:
        path = self.gathered if f > GATHER_COLUMNS_PER_ENTRY * k_hi else self.columns
        path.apply(hidden, residual, tab, idx, gates, f, k_hi)


def _condition_rows(conds: list, d: int) -> dict[str, np.ndarray]:
    """Conditions as bank rows: their readout (e, b, θ, rectify) and a zero write direction."""
    return {"enc": np.stack([x.enc for x in conds]).astype(np.float32) if conds else np.zeros((0, d), np.float32),
            "dec": np.zeros((len(conds), d), np.float32),
            "bias": np.asarray([x.bias for x in conds], np.float32),
            "theta": np.asarray([x.theta for x in conds], np.float32),
            "rectify": np.asarray([x.rectify for x in conds], np.uint8)}


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
