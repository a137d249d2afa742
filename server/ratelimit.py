"""Per-key admission in the API server: token buckets for requests and tokens per minute, and the
count of distinct steering configurations a key has in flight (a policy's ``max_slots``).

Both answer 429 with ``Retry-After`` (seconds) and never wait: a refused request took nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import CapacityExceeded, RateLimited

SLOT_RETRY_AFTER_S = 1
"""Retry-After of a refusal by ``max_slots``: the key's own requests free a slot as they end."""


@dataclass
class TokenBucket:
    """``capacity`` units, refilled continuously at ``capacity`` per minute."""

    capacity: float
    level: float
    updated: float

    def take(self, amount: float, now: float) -> float:
        """Take ``amount`` and return 0, or take nothing and return the seconds until it could."""
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now
        if amount <= self.level:
            self.level -= amount
            return 0.0
        return (amount - self.level) / rate


class RateLimiter:
    """Token buckets per (key, kind); ``kind`` is ``requests`` or ``tokens``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def take(self, key: str, kind: str, per_minute: int, amount: int = 1) -> None:
        """Charge ``amount`` to ``key``'s ``kind`` bucket; RateLimited (429) when it is empty."""
        now = self.clock()
        bucket = self._buckets.get((key, kind))
        if bucket is None or bucket.capacity != per_minute:
            bucket = self._buckets[(key, kind)] = TokenBucket(per_minute, per_minute, now)
        if amount > per_minute:
            raise RateLimited(f"This request needs {amount} {kind}, more than this key may use in "
                              f"a minute ({per_minute} {kind} per minute); ask for fewer "
                              "(max_tokens).", None, headers={"Retry-After": "60"})
        wait = bucket.take(amount, now)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise RateLimited(f"Rate limit reached for this key: {per_minute} {kind} per minute. "
                              f"Please try again in {seconds}s.", None,
                              headers={"Retry-After": str(seconds)})


class KeySlots:
    """Distinct steering configurations each key has in flight, reference-counted."""

    def __init__(self) -> None:
        self._held: dict[str, dict[str, int]] = {}

    def held(self, key: str) -> int:
        return len(self._held.get(key, {}))

    def acquire(self, key: str, config: str, limit: int) -> Callable[[], None]:
        """Hold ``config`` for ``key``; 429 ``steering_capacity_exceeded`` when ``key`` already holds
        ``limit`` others. Returns the (idempotent) release."""
        held = self._held.setdefault(key, {})
        if config not in held and len(held) >= limit:
            raise CapacityExceeded(f"This key already has {len(held)} distinct steering "
                                   f"configurations in flight, its maximum (max_slots: {limit}); "
                                   "retry when one has finished.", "steering",
                                   "steering_capacity_exceeded",
                                   headers={"Retry-After": str(SLOT_RETRY_AFTER_S)})
        held[config] = held.get(config, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            held[config] -= 1
            if held[config] == 0:
                del held[config]
                if not held:
                    self._held.pop(key, None)
        return release
