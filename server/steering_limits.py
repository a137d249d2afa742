"""The API server's bounds on steered requests, decided before anything is sent to the engine.

* Slots: a request whose steering changes the model holds a :class:`steering.worker.slots.SlotGate`
  lease from admission (before any response or stream starts) until its generation ends; no slot
  in time (``--max-steering-waiters`` already waiting, or ``--steering-queue-timeout`` passed) is
  a 429 ``steering_capacity_exceeded`` with ``Retry-After``.
* Readouts (``return_activations``, inspect): a request's worst-case readout
  (:meth:`steering.request.CompiledSteering.readout_bytes`) above ``--max-readout-bytes`` is a 400
  naming the field; while the readouts in flight would exceed ``--max-readout-bytes-total`` it is
  a 429. The bytes are reserved until the readout is popped, or dropped in the workers
  (``steering_drop_readout``) when the request ends without popping it (error, abort, client gone).
* Seating: after each steered generation the workers are asked, once for every request that
  ended meanwhile, which of them they could not seat (``steering_take_unseated``; see
  :mod:`steering.worker.slots`); such a request fails with 503 ``steering_unavailable``.
* Raw-vector norms: :func:`server.steering_setup.measure_layer_norms` reads each steerable layer's
  median residual norm once at start (one prefill with a capture readout); the compiler bounds
  raw vectors by it (``SteeringCompiler.layer_norms``, see steering/request.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from server.errors import CapacityExceeded, InvalidRequest
from server.metrics import Metrics
from steering.request import CompiledSteering
from steering.worker.slots import SlotGate, SlotLease, SlotsBusy

logger = logging.getLogger(__name__)

MiB = 2**20
Rpc = Callable[..., Awaitable[list[Any]]]


class Held:
    """What one request holds while it runs: its slot lease and its reserved readout bytes.
    Every method is idempotent and synchronous (safe in any ``finally``)."""

    def __init__(self, limits: SteeringLimits, request_id: str, lease: SlotLease | None,
                 readout_bytes: int, readout: bool = False) -> None:
        self.limits = limits
        self.request_id = request_id
        self.lease = lease
        self.readout_bytes = readout_bytes
        self.readout = readout or readout_bytes > 0
        """The workers open a readout for this request (``return_activations``), even one of
        0 budgeted bytes (raw vectors only): it must be dropped if never popped."""
        self.popped = False
        self.closed = False

    @property
    def steered(self) -> bool:
        """The request holds a slot (its program changes the model)."""
        return self.lease is not None

    def end_generation(self) -> None:
        """The engine finished the request or its abort was sent: free the slot."""
        if self.lease is not None:
            self.lease.release()

    def close(self) -> None:
        """The request is over: free the slot and the readout (dropping it in the workers unless
        it was popped)."""
        self.end_generation()
        if self.closed:
            return
        self.closed = True
        if self.readout:
            if self.popped:
                self.limits._free(self.readout_bytes)
            else:
                self.limits._drop(self.request_id, self.readout_bytes)


class SteeringLimits:
    """Slot leases, the readout byte budget and the unseated-request audit of one server."""

    def __init__(self, gate: SlotGate | None, metrics: Metrics, rpc: Callable[[], Rpc], *,
                 max_readout_bytes: int, max_readout_bytes_total: int) -> None:
        self.gate = gate
        self.metrics = metrics
        self._rpc = rpc  # → the engine's collective_rpc (looked up when needed)
        self.max_readout_bytes = max_readout_bytes
        self.max_readout_bytes_total = max_readout_bytes_total
        self.readout_in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._batch: dict[str, asyncio.Future[bool]] | None = None
        metrics.readout_bytes.set_function(lambda: self.readout_in_flight)

    # -- admission ------------------------------------------------------------------------
    async def admit(self, compiled: CompiledSteering | None, request_id: str, positions: int,
                    readout_param: str) -> Held:
        """Reserve the request's readout bytes and its slot; 400 when the readout can never fit,
        429 (``Retry-After``) when the readout budget or the slots are busy."""
        need = compiled.readout_bytes(positions) if compiled is not None else 0
        if need > self.max_readout_bytes:
            raise InvalidRequest(
                f"the activations this request asks for could take {need / MiB:.1f} MiB "
                f"({positions} token positions); this server returns at most "
                f"{self.max_readout_bytes / MiB:.1f} MiB per request (--max-readout-bytes). "
                "Read fewer layers or features, or shorten the prompt or max_tokens",
                readout_param, "readout_too_large")
        if need and self.readout_in_flight + need > self.max_readout_bytes_total:
            self.metrics.steering_rejected.labels("readout_budget").inc()
            raise CapacityExceeded(
                f"activation readouts in flight are at this server's limit "
                f"({self.max_readout_bytes_total / MiB:.0f} MiB, --max-readout-bytes-total); "
                "retry shortly", None, headers={"Retry-After": "1"})
        self.readout_in_flight += need
        lease = None
        try:
            if self.gate is not None and compiled is not None and compiled.program.layers:
                lease = await self.gate.acquire(compiled.table_hash)
        except SlotsBusy as busy:
            self.metrics.steering_rejected.labels(busy.reason).inc()
            raise CapacityExceeded(f"{busy.message}; retry later", None,
                                   headers={"Retry-After": str(busy.retry_after)}) from None
        finally:
            if lease is None and (self.gate is not None and compiled is not None
                                  and compiled.program.layers):
                self.readout_in_flight -= need  # refused or cancelled while waiting
        return Held(self, request_id, lease, need,
                    readout=compiled is not None and compiled.return_activations)

    # -- readouts -------------------------------------------------------------------------
    def _free(self, nbytes: int) -> None:
        self.readout_in_flight -= nbytes

    def _drop(self, key: str, nbytes: int) -> None:
        """Drop ``key``'s readout in the workers, then free its bytes (in the background: the
        caller may be a cancelled task)."""
        async def drop() -> None:
            try:
                await self._rpc()("steering_drop_readout", args=(key,))
            except Exception:  # noqa: BLE001  (engine gone: the workers' TTL frees it)
                logger.debug("dropping readout %s failed", key, exc_info=True)
            finally:
                self._free(nbytes)

        task = asyncio.get_running_loop().create_task(drop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- seating audit --------------------------------------------------------------------
    async def unseated(self, request_id: str) -> bool:
        """Whether a worker ran ``request_id`` unsteered because it could not seat it. Requests
        that ask in the same event-loop turn share one collective RPC."""
        loop = asyncio.get_running_loop()
        if self._batch is None:
            self._batch = {}
            loop.call_soon(self._flush)
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch[request_id] = fut
        return await fut

    def _flush(self) -> None:
        batch, self._batch = self._batch or {}, None

        async def ask() -> None:
            try:
                per_rank = await self._rpc()("steering_take_unseated", args=(list(batch),))
                failed = set().union(*(set(r or ()) for r in per_rank))
            except Exception as exc:  # noqa: BLE001  (each waiter sees it)
                for fut in batch.values():
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for rid, fut in batch.items():
                if not fut.done():
                    fut.set_result(rid in failed)

        task = asyncio.get_running_loop().create_task(ask())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

