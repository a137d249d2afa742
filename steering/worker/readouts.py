"""A worker's readouts (``return_activations``, inspect), kept as float32 arrays and accounted in
bytes (:func:`steering.request.readout_record_bytes`, the unit the API server budgets in).

A readout leaves when the API server pops it (``steering_readout``) or drops it unread
(``steering_drop_readout``: its request failed, was aborted or its client went away), or
``READOUT_TTL_S`` after its request ended if neither came. Above ``max_bytes`` in all (the API
server's admission budget keeps readouts under it) the oldest readout is dropped with a warning,
and popping it returns :data:`READOUT_DROPPED`: a readout is never handed out short.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from steering.request import readout_record_bytes

logger = logging.getLogger(__name__)

MAX_READOUT_REQUESTS = 4096
"""Readouts held at once (and dropped keys remembered), whatever their size."""
READOUT_TTL_S = 120.0
"""A readout nobody popped or dropped is freed this long after its request ended."""
READOUT_DROPPED = "dropped"
"""What :meth:`ReadoutStore.pop` returns for a readout dropped under memory pressure."""

# A readout record: (kind, layer, position, values); kind "act" = act(h) of the slot's entries
# after the op, "resid" = the residual stream after the op (for inspect). Kept as float32 arrays,
# handed out (pop) as lists.
Readout = tuple[str, int, int, list[float]]
Record = tuple[str, int, int, np.ndarray]


class ReadoutStore:
    """Readouts by key (the API server's request id), bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._records: dict[str, list[Record]] = {}
        self._size: dict[str, int] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()  # key → when its request ended
        self._dropped: OrderedDict[str, None] = OrderedDict()  # dropped under pressure

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def open(self, key: str) -> None:
        """Start filing under ``key`` (no-op when it is open)."""
        if key in self._records:
            return
        self._records[key] = []
        self._size[key] = 0
        while len(self._records) > MAX_READOUT_REQUESTS:
            self._drop_under_pressure(next(iter(self._records)),
                                      f"more than {MAX_READOUT_REQUESTS} readouts are held")

    def file(self, key: str, record: Record) -> None:
        """Add one record to ``key``'s readout, within ``max_bytes`` in all."""
        size = readout_record_bytes(record[3].size)
        while self.nbytes + size > self.max_bytes and self._records:
            self._drop_under_pressure(next(iter(self._records)), f"readouts would exceed "
                                      f"{self.max_bytes} bytes in all (the API server's budget "
                                      "should have held this request back)")
        out = self._records.get(key)
        if out is None:
            return
        out.append(record)
        self._size[key] += size
        self.nbytes += size

    def ended(self, key: str, now: float) -> None:
        """``key``'s request ended: its TTL starts."""
        if key in self._records:
            self._ended[key] = now

    def expire(self, now: float) -> None:
        """Free readouts whose request ended more than ``READOUT_TTL_S`` ago."""
        while self._ended:
            key, ended = next(iter(self._ended.items()))
            if now - ended <= READOUT_TTL_S:
                break
            logger.warning("steering: readout %s was never collected; freed after %g s",
                           key, READOUT_TTL_S)
            self.drop(key)

    def pop(self, key: str) -> list[Readout] | str | None:
        """The records filed under ``key`` (see :data:`Readout`), None when there are none,
        :data:`READOUT_DROPPED` when they were dropped under memory pressure."""
        if key in self._dropped:
            del self._dropped[key]
            return READOUT_DROPPED
        records = self._records.get(key)
        if records is None:
            return None
        self.drop(key)
        return [(kind, layer, pos, values.tolist()) for kind, layer, pos, values in records]

    def drop(self, key: str) -> int:
        """Free the readout filed under ``key``; returns the bytes freed."""
        self._dropped.pop(key, None)
        self._ended.pop(key, None)
        if self._records.pop(key, None) is None:
            return 0
        size = self._size.pop(key, 0)
        self.nbytes -= size
        return size

    def _drop_under_pressure(self, key: str, why: str) -> None:
        logger.warning("steering: dropping the readout of %s (%d bytes): %s", key,
                       self._size.get(key, 0), why)
        self.drop(key)
        self._dropped[key] = None
        while len(self._dropped) > MAX_READOUT_REQUESTS:
            self._dropped.popitem(last=False)
