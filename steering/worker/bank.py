"""The feature bank of one steered layer: every distinct entry row stored once, shared by slots.

A program's entries at a layer (see :mod:`steering.program`) are rows (e, d, b, θ, rectify) with
per-slot coefficients (α, β, condition). Many requests name the same pack features at different
strengths, so their rows are equal and only the coefficients differ. The bank keeps each distinct
row once, as a column of the layer's bank tensors (``enc``/``dec`` [F, d], ``bias``/``cut`` [F] in
:class:`steering.worker.runtime.SiteTables`), keyed by the row's bytes and reference-counted by
the slots whose programs use it; a slot holds only the column of each of its entries and their
coefficients (as vLLM's punica keeps each LoRA's weights once and routes tokens by index).

Column 0 is the null row (zeros, never handed out): a slot's unused entries point at it.
Free columns are handed out lowest first, so the used columns stay packed under :attr:`hi` and
the op's matmuls cover ``[:hi]`` only.

This class is host bookkeeping only; the runtime writes and clears the tensors it names.
"""

from __future__ import annotations

import hashlib
import heapq

import numpy as np


class BankFull(Exception):
    """Every column of a layer's bank holds a row some slot uses."""


def row_key(enc: np.ndarray, dec: np.ndarray, bias: float, cut: float) -> bytes:
    """The identity of one entry row: its float32 bytes (equal keys share a column)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(enc, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(dec, dtype="<f4").tobytes())
    h.update(np.asarray([bias, cut], dtype="<f4").tobytes())
    return h.digest()


class FeatureBank:
    """Columns 1..capacity-1 of one layer's bank: row key → column, with reference counts."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError("a feature bank needs at least 2 columns (column 0 is the null row)")
        self.capacity = capacity
        self._col: dict[bytes, int] = {}
        self._key: dict[int, bytes] = {}
        self._refs = np.zeros(capacity, dtype=np.int64)
        self._free = list(range(1, capacity))  # a min-heap: lowest free column first
        self.hi = 1
        """Columns ``[hi:]`` are all free (and zero): the op reads ``[:hi]``."""

    @property
    def used(self) -> int:
        return len(self._col)

    def acquire(self, key: bytes) -> tuple[int, bool]:
        """The column holding ``key``, one more reference to it; the flag says it is new (the
        caller writes the row). :class:`BankFull` when a new row finds no free column."""
        col = self._col.get(key)
        if col is not None:
            self._refs[col] += 1
            return col, False
        if not self._free:
            raise BankFull(f"all {self.capacity - 1} feature-bank columns of a layer hold rows "
                           "in use (raise --steering-bank-features)")
        col = heapq.heappop(self._free)
        self._col[key], self._key[col] = col, key
        self._refs[col] = 1
        self.hi = max(self.hi, col + 1)
        return col, True

    def release(self, col: int) -> bool:
        """One reference less to ``col``; True when it is now free (the caller zeroes the row)."""
        if col == 0:
            return False
        self._refs[col] -= 1
        if self._refs[col] > 0:
            return False
        del self._col[self._key.pop(col)]
        heapq.heappush(self._free, col)
        while self.hi > 1 and self._refs[self.hi - 1] == 0:
            self.hi -= 1
        return True
