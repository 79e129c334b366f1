"""A worker's side of a shared queue's leases: renewing them, and asking right before and
right after each post whether it still holds the job (``pipeline.py`` calls these).

A worker frozen (SIGSTOP) or cut off longer than ``queue.lease_s`` has lost its jobs to
another worker when it comes back: it must not post for them, nor record their outcome. On a
queue of one process every check passes without asking the queue.
"""

from __future__ import annotations

import asyncio
import logging

from service.labelstudio.client import LabelStudioClient
from service.queue import Job, JobQueue
from service.worker.supervise import Supervisor

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 4  # a heartbeat lost or late still leaves three before the lease ends


class Leases:
    def __init__(self, queue: JobQueue, client: LabelStudioClient, model_version: str) -> None:
        self.queue = queue
        self.client = client
        self.model_version = model_version

    async def renew(self, supervisor: Supervisor) -> None:
        """Forever: renew this worker's leases ``RENEWALS_PER_LEASE`` times per lease."""
        lease_s = self.queue.lease_s
        assert lease_s is not None
        while True:
            await asyncio.to_thread(self.queue.heartbeat)
            supervisor.ok("lease")
            await asyncio.sleep(lease_s / RENEWALS_PER_LEASE)

    async def holds(self, job: Job) -> bool:
        """Whether this worker still holds ``job``, its lease renewed by the asking."""
        if not self.queue.shared:
            return True
        return job.id in await asyncio.to_thread(self.queue.confirm, [job.id])

    async def undo_if_twice(self, job: Job, created: int) -> None:
        """Our post ``created`` landed after the job was taken over: if the new holder posted
        too, delete ours, so the task keeps one prediction of this model_version (if it has
        only ours, the new holder's re-check before its post finds it and skips)."""
        try:
            task = await self.client.get_task(job.task)
            others = [
                p.id
                for p in task.predictions or ()
                if p.model_version == self.model_version and p.id != created
            ]
            if others:
                await self.client.delete_prediction(created)
                log.warning(
                    "job %s task %s: posted after its lease ran out beside prediction %s;"
                    " deleted ours (%s)",
                    job.id,
                    job.task,
                    others[0],
                    created,
                )
        except Exception:
            log.exception("job %s task %s: checking a late post failed", job.id, job.task)
