"""Workshop job records in the experiment store, so that every replica sharing it answers for
every job (a load balancer sends a job's polls to any replica).

The server running a job writes its record (``Job.view()``) when it accepts the job, every
``HEARTBEAT_S`` while it is active and when it ends (:class:`JobRecords.save`); other replicas read
it (:meth:`JobRecords.get`, :meth:`JobRecords.listing`). A ``DELETE`` through another replica marks
the record (:meth:`JobRecords.ask_cancel`); the running server reads the mark with its next write
and cancels. A record that stays active with no write for ``STALE_S`` belongs to a server that
stopped (killed, or shut down mid-job): it reads ``failed``, naming that server. A store that does
not answer costs the other replicas the record (logged and counted by the manager's ``call``),
never the job.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

from server.errors import Conflict, StoreUnavailable
from server.workshop.models import Job

if TYPE_CHECKING:
    from server.state import AppState

KEEP_STORED = 1024
"""Finished job records the store keeps (the newest)."""
HEARTBEAT_S = 2.0
"""How often the server running a job writes its record to the store (and reads a cancel)."""
STALE_S = 30.0
"""An active record no server wrote for this long is reported ``failed``: its server stopped."""
OP = "workshop job"
"""The store operation's name in logs and ``steer_store_failures_total``."""


class JobRecords:
    """One server's reads and writes of the store's job records (see the module docstring)."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Names this server in the records it writes."""

    async def save(self, job: Job) -> bool:
        """Write ``job``'s record; True when another replica asked to cancel it."""
        mgr = self.state.experiments
        try:
            return bool(await mgr.call(OP, mgr.store.put_job, job.view(), job.active,
                                       self.server_id, KEEP_STORED))
        except StoreUnavailable:
            return False

    async def get(self, job_id: str) -> Job | None:
        """The store's record of a job, None if there is none (503 if the store does not answer)."""
        mgr = self.state.experiments
        row = await mgr.call(OP, mgr.store.get_job, job_id)
        return stored_job(row) if row is not None else None

    async def listing(self, limit: int) -> list[Job]:
        """The ``limit`` most recently written records; none when the store does not answer."""
        mgr = self.state.experiments
        try:
            rows = await mgr.call(OP, mgr.store.list_jobs, limit)
        except StoreUnavailable:
            return []
        return [stored_job(row) for row in rows]

    async def ask_cancel(self, job: Job) -> Job:
        """Ask the replica running ``job`` to cancel it and wait up to a few heartbeats for its
        record to say so; the record as it then stands (409 if it has finished)."""
        mgr = self.state.experiments
        if not job.active or not await mgr.call(OP, mgr.store.cancel_job, job.id):
            raise Conflict(f"job {job.id!r} has finished ({job.status})", "id")
        deadline = time.monotonic() + 3 * HEARTBEAT_S
        while job.active and time.monotonic() < deadline:
            await asyncio.sleep(HEARTBEAT_S / 4)
            job = await self.get(job.id) or job
        return job


def stored_job(row: dict) -> Job:
    """A job from the store's record (``ExperimentStore.get_job``); an active one whose server
    stopped writing it ``STALE_S`` ago reads as failed."""
    job = Job.model_validate({k: v for k, v in row["record"].items() if k != "object"})
    age = time.time() - row["updated"]
    if job.active and age > STALE_S:
        job.status, job.finished = "failed", row["updated"]
        job.error = (f"the server running this job ({row['server']}) stopped: it last wrote the "
                     f"job's record {age:.0f} s ago")
    return job
