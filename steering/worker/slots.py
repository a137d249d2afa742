"""Slot bookkeeping on both sides of the engine.

* :class:`SlotGate` (API server): at most S distinct steering configurations in flight. A request
  whose configuration is not resident waits, first come first served, in a bounded queue: at most
  ``max_waiters`` wait at once and each at most ``queue_timeout`` seconds; beyond either,
  :meth:`SlotGate.acquire` raises :class:`SlotsBusy` (the server answers 429 before any stream
  starts). A request never runs unsteered because no slot was free.
* :class:`SlotAllocator` (worker): maps configuration hash → slot 1..S with reference counts per
  request id; slot 0 is "no steering". A freed slot keeps its tables, so a configuration that
  returns before the slot is reused is not rewritten.

Ordering argument (why the worker never overflows): the gate releases a configuration only after
the engine reported the request finished or the abort was sent; vLLM's engine core handles
aborts and new requests in arrival order and tells the worker about finished requests
(``finished_req_ids``) no later than the step that schedules the next new request, and the worker
releases before it admits.

If gate and worker disagree anyway (a bug, or a client other than our API server), the worker
fails that one request, never the engine: vLLM's V1 model runner has no way to finish a single
request from inside a step (a request ends only by the scheduler's stop checks or an abort), so
:class:`SlotAllocator` raises :class:`SlotsExhausted`, the runtime seats the request on slot 0
and records it as *unseated* (``SteeringRuntime.unseated``), and the API server, which knows which
of its requests are steered, asks the workers once after each steered generation
(``steering_take_unseated``) and turns that response into an error (503
``steering_unavailable``; in a stream, an error event before ``[DONE]``). Unsteered text is never
returned as if it were steered.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

WAITERS_PER_SLOT = 4
"""Default queue bound: ``max_waiters`` = 4 × slots (64 with the default 16 slots). A waiter for a
new configuration needs a whole slot to drain; four per slot keeps the worst-case wait to about
four generations while absorbing a burst of distinct configurations."""
RETRY_AFTER_BOUNDS = (1, 60)
"""``Retry-After`` (seconds) is the mean recent slot hold time, clamped to these bounds."""

BusyReason = Literal["queue_full", "timeout"]


class SlotsBusy(Exception):
    """No slot could be had: the wait queue is full, or the wait timed out."""

    def __init__(self, reason: BusyReason, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.message = message


class SlotLease:
    """One request's hold on the slot of its configuration; :meth:`release` is idempotent and
    synchronous, so it is safe in any ``finally`` (even of a cancelled task)."""

    def __init__(self, gate: SlotGate, key: str) -> None:
        self.gate = gate
        self.key = key
        self.since = time.monotonic()
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate._release(self.key, time.monotonic() - self.since)


class SlotGate:
    """Admission control for distinct steering configurations (keyed by table hash)."""

    def __init__(self, capacity: int, *, queue_timeout: float | None = None,
                 max_waiters: int | None = None) -> None:
        self.capacity = capacity
        self.queue_timeout = queue_timeout
        """Seconds a request waits for a slot (None: forever; <= 0: never waits)."""
        self.max_waiters = WAITERS_PER_SLOT * capacity if max_waiters is None else max_waiters
        """Requests that may wait at once; one more is refused at once."""
        self._refs: dict[str, int] = {}
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._hold_s = 1.0  # moving mean of how long a configuration's request holds its slot
        self.rejected: dict[str, int] = {"queue_full": 0, "timeout": 0}

    @property
    def resident(self) -> int:
        return len(self._refs)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def retry_after(self) -> int:
        """Seconds a refused client should wait before trying again."""
        lo, hi = RETRY_AFTER_BOUNDS
        return int(min(max(math.ceil(self._hold_s), lo), hi))

    def _admissible(self, key: str) -> bool:
        return key in self._refs or len(self._refs) < self.capacity

    def _take(self, key: str) -> None:
        self._refs[key] = self._refs.get(key, 0) + 1

    def _busy(self, reason: BusyReason, message: str) -> SlotsBusy:
        self.rejected[reason] += 1
        return SlotsBusy(reason, self.retry_after, message)

    async def acquire(self, key: str) -> SlotLease:
        """A lease on ``key``'s slot; :class:`SlotsBusy` when none can be had in time."""
        if self._admissible(key) and (key in self._refs or not self._waiters):
            self._take(key)
            return SlotLease(self, key)
        if len(self._waiters) >= self.max_waiters or (
                self.queue_timeout is not None and self.queue_timeout <= 0):
            raise self._busy("queue_full", f"all {self.capacity} steering slots are busy and "
                             f"{len(self._waiters)} requests are already waiting for one")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (key, fut)
        self._waiters.append(entry)
        try:
            if self.queue_timeout is None:
                await fut
            else:
                async with asyncio.timeout(self.queue_timeout):
                    await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return SlotLease(self, key)  # admitted as the time ran out: keep it
            self._drop_waiter(entry)
            raise self._busy("timeout", f"no steering slot became free within "
                             f"{self.queue_timeout:g} s (all {self.capacity} are busy)") from None
        except BaseException:  # cancelled (client gone): give back what we may have been given
            if fut.done() and not fut.cancelled():
                self._release(key, 0.0, sample=False)
            else:
                self._drop_waiter(entry)
            raise
        return SlotLease(self, key)

    def _drop_waiter(self, entry: tuple[str, asyncio.Future[None]]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        self._wake()  # a waiter behind this one may be admissible now (same key as a resident)

    def _release(self, key: str, held_s: float, sample: bool = True) -> None:
        if sample:
            self._hold_s = 0.8 * self._hold_s + 0.2 * held_s
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self._wake()

    def _wake(self) -> None:
        """Hand slots to waiters in arrival order (the releaser admits them: no stampede)."""
        for entry in list(self._waiters):
            key, fut = entry
            if fut.done():
                self._waiters.remove(entry)
            elif self._admissible(key):
                self._waiters.remove(entry)
                self._take(key)
                fut.set_result(None)

    @asynccontextmanager
    async def hold(self, key: str | None) -> AsyncIterator[None]:
        """Hold a slot for ``key`` for the duration of the block; None holds nothing."""
        if key is None:
            yield
            return
        lease = await self.acquire(key)
        try:
            yield
        finally:
            lease.release()


class SlotsExhausted(RuntimeError):
    """More distinct configurations than slots reached a worker (a gate bug, never expected);
    the runtime turns it into a failed request (see the module docstring), never an engine crash."""


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

    def evict(self, req_id: str) -> None:
        """Release ``req_id`` and forget its slot's configuration (its tables could not be
        written): the next request with that hash rewrites them."""
        slot = self._slot_of_req.get(req_id)
        self.release(req_id)
        if slot is not None and slot not in self._refs:
            key = self._hash_of_slot.pop(slot, None)
            if key is not None:
                self._slot_of_hash.pop(key, None)

    def idle_slots(self) -> list[int]:
        """Free slots that still hold a configuration kept for reuse (least recently freed first)."""
        return [s for s in self._free if s in self._hash_of_slot]

    def forget(self, slot: int) -> None:
        """Forget the configuration a free ``slot`` holds (its tables were cleared): the next
        request with that hash takes a slot and writes them again."""
        if slot in self._free:
            key = self._hash_of_slot.pop(slot, None)
            if key is not None:
                del self._slot_of_hash[key]

    @property
    def busy(self) -> int:
        return len(self._refs)

    @property
    def active_requests(self) -> int:
        return len(self._slot_of_req)
