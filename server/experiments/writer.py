"""The store's writer: one thread runs every store call, in order, from a bounded queue.

The event loop never waits on the database. Requests hand their exposure to the writer and go on
(fire and forget); admin calls wait for their answer at most :attr:`WriteLimits.call_timeout_s`.
When :attr:`WriteLimits.max_pending` calls are already waiting, :meth:`StoreWriter.submit` refuses
at once (:class:`QueueFull`) rather than queueing without bound: the caller counts the exposure
as lost, or answers 503.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class WriteLimits:
    """Bounds of the experiment store's writer."""

    max_pending: int = 1024
    """Store calls that may wait for the writer thread; beyond: exposures lost, admin calls 503."""
    call_timeout_s: float = 5.0
    """How long an admin call (create, delete, feedback, results) waits before a 503."""
    exposure_attempts: int = 3
    """Tries of one exposure write before it is counted as lost (``store_error``)."""
    retry_backoff_s: float = 0.1
    """Wait before the second try of an exposure write; doubled before each later one."""
    close_timeout_s: float = 10.0
    """How long closing the server waits for the pending writes."""


class QueueFull(RuntimeError):
    """The writer has :attr:`WriteLimits.max_pending` calls waiting already."""


class WriterClosed(RuntimeError):
    """The writer was closed (the server is shutting down)."""


_STOP = object()


class StoreWriter:
    """A single worker thread and a bounded queue of calls; :meth:`submit` never blocks."""

    def __init__(self, max_pending: int = WriteLimits.max_pending,
                 name: str = "steer-ab-store") -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Calls waiting for the thread (not counting the one it runs)."""
        return self._queue.qsize()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn(*args)``; its future. QueueFull when the queue is full, WriterClosed after
        :meth:`close`."""
        if self._closed:
            raise WriterClosed("the experiment store writer is closed")
        fut: Future[Any] = Future()
        try:
            self._queue.put_nowait((fut, fn, args))
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} experiment-store writes are pending") from None
        return fut

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every call queued so far has run (waiting for room in a full queue)."""
        if self._closed:
            raise WriterClosed("the experiment store writer is closed")
        fut: Future[Any] = Future()
        try:
            self._queue.put((fut, lambda: None, ()), timeout=timeout)
        except queue.Full:
            raise TimeoutError(f"the experiment store writer did not drain within {timeout} s") from None
        fut.result(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while it waited (an admin call that timed out)
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def close(self, timeout: float = WriteLimits.close_timeout_s) -> int:
        """Stop taking calls, let the pending ones run for up to ``timeout`` seconds; the number
        of calls still pending when it gave up (0 when all ran)."""
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return 0
        left = self._queue.qsize()
        logger.warning("experiment store writer: %d writes still pending at shutdown", left)
        return left
