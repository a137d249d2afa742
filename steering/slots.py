"""Slot bookkeeping on both sides of the engine.

* :class:`SlotGate` (API server): at most S distinct steering configurations in flight; a request
  whose configuration is not resident waits for one to finish. It never runs unsteered.
* :class:`SlotAllocator` (worker): maps configuration hash → slot 1..S with reference counts per
  request id; slot 0 is "no steering". A freed slot keeps its tables, so a configuration that
  returns before the slot is reused is not rewritten.

Ordering argument (why the worker never overflows): the gate releases a configuration only after
the engine reported the request finished or the abort was sent; vLLM's engine core handles
aborts and new requests in arrival order and tells the worker about finished requests
(``finished_req_ids``) no later than the step that schedules the next new request, and the worker
releases before it admits.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import AsyncIterator


class SlotGate:
    """Admission control for distinct steering configurations (keyed by table hash)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._refs: dict[str, int] = {}
        self._cond: asyncio.Condition | None = None
        self.waiting = 0

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    @property
    def resident(self) -> int:
        return len(self._refs)

    @asynccontextmanager
    async def hold(self, key: str | None) -> AsyncIterator[None]:
        """Hold a slot for ``key`` for the duration of the block; None holds nothing."""
        if key is None:
            yield
            return
        cond = self._condition()
        async with cond:
            if key not in self._refs and len(self._refs) >= self.capacity:
                self.waiting += 1
                try:
                    await cond.wait_for(
                        lambda: key in self._refs or len(self._refs) < self.capacity
                    )
                finally:
                    self.waiting -= 1
            self._refs[key] = self._refs.get(key, 0) + 1
        try:
            yield
        finally:
            async with cond:
                self._refs[key] -= 1
                if self._refs[key] == 0:
                    del self._refs[key]
                    cond.notify_all()


class SlotsExhausted(RuntimeError):
    """More distinct configurations than slots reached a worker (a gate bug, never expected)."""


class SlotAllocator:
    """Worker-side: configuration hash → slot, reference-counted by request id."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_of_hash: dict[str, int] = {}
        self._hash_of_slot: dict[int, str] = {}
        self._refs: dict[int, set[str]] = {}
        self._slot_of_req: dict[str, int] = {}
        # Free slots, least recently freed first; never-used slots come first.
        self._free: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, num_slots + 1))

    def acquire(self, req_id: str, key: str) -> tuple[int, bool]:
        """Slot for ``key`` held by ``req_id``; the flag says the tables must be (re)written."""
        if req_id in self._slot_of_req:
            return self._slot_of_req[req_id], False
        slot = self._slot_of_hash.get(key)
        needs_write = False
        if slot is None:
            if not self._free:
                raise SlotsExhausted(
                    f"all {self.num_slots} steering slots are busy; the API server's gate should "
                    "have held this request back"
                )
            slot, _ = self._free.popitem(last=False)
            old = self._hash_of_slot.pop(slot, None)
            if old is not None:
                del self._slot_of_hash[old]
            self._slot_of_hash[key] = slot
            self._hash_of_slot[slot] = key
            needs_write = True
        else:
            self._free.pop(slot, None)  # revived before reuse: tables still valid
        self._refs.setdefault(slot, set()).add(req_id)
        self._slot_of_req[req_id] = slot
        return slot, needs_write

    def release(self, req_id: str) -> None:
        slot = self._slot_of_req.pop(req_id, None)
        if slot is None:
            return
        holders = self._refs[slot]
        holders.discard(req_id)
        if not holders:
            del self._refs[slot]
            self._free[slot] = None

    @property
    def busy(self) -> int:
        return len(self._refs)

    @property
    def active_requests(self) -> int:
        return len(self._slot_of_req)
