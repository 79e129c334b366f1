"""A worker's side of a shared queue's leases: renewing them, and asking right before and
right after each post whether it still holds the job (``pipeline.py`` calls these).

A worker frozen (SIGSTOP) or cut off longer than ``queue.lease_s`` has lost its jobs to
another worker when it comes back: it must not post for them, nor record their outcome. On a
queue of one process every check passes without asking the queue.
"""

from __future__ import annotations

import asyncio
import logging

from service.errors import RetryableError
from service.labelstudio.client import LabelStudioClient
from service.queue import Job, JobQueue
from service.worker.supervise import Supervisor

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 4  # a heartbeat lost or late still leaves three before the lease ends
RENEW_RETRY_S = 1.0  # while the queue is away


class Leases:
    def __init__(self, queue: JobQueue, client: LabelStudioClient, model_version: str) -> None:
        self.queue = queue
        self.client = client
        self.model_version = model_version

    async def renew(self, supervisor: Supervisor) -> None:
        """Forever: renew this worker's leases ``RENEWALS_PER_LEASE`` times per lease. While
        the queue is away, ask again every second (not the supervisor's growing backoff): the
        leases must be renewed as soon as it is back, or a healthy worker loses its jobs."""
        lease_s = self.queue.lease_s
        assert lease_s is not None
        failing = False
        while True:
            try:
                await asyncio.to_thread(self.queue.heartbeat)
            except RetryableError as exc:
                if not failing:
                    log.warning("cannot renew this worker's leases (trying every second): %s", exc)
                failing = True
                await asyncio.sleep(min(RENEW_RETRY_S, lease_s / RENEWALS_PER_LEASE))
                continue
            if failing:
                log.info("this worker's leases are renewed again")
            failing = False
            supervisor.ok("lease")
            await asyncio.sleep(lease_s / RENEWALS_PER_LEASE)

    async def holds(self, job: Job) -> bool:
        """Whether this worker still holds ``job``, its lease renewed by the asking."""
        if not self.queue.shared:
            return True
        return job.id in await asyncio.to_thread(self.queue.confirm, [job.id])

    def may_race(self, job: Job) -> bool:
        """Whether another worker may have posted for ``job`` too: on a shared queue, a job
        tried before (its last worker may have been lost with its post in flight)."""
        return self.queue.shared and job.attempts > 1

    async def keep_first(self, job: Job, created: int) -> None:
        """After our post ``created`` of a job that may have raced (a late post of ours, or a
        job taken over from a lost worker): if the task holds an earlier prediction of this
        model_version, delete ours. Every poster in a race applies the same rule after its
        own post landed, and ids grow with time, so exactly the first one stays."""
        try:
            task = await self.client.get_task(job.task)
            earlier = [
                p.id
                for p in task.predictions or ()
                if p.model_version == self.model_version and p.id < created
            ]
            if earlier:
                await self.client.delete_prediction(created)
                log.warning(
                    "job %s task %s: another worker's prediction %s was there first;"
                    " deleted ours (%s)",
                    job.id,
                    job.task,
                    earlier[0],
                    created,
                )
        except Exception:
            log.exception("job %s task %s: checking for a raced post failed", job.id, job.task)
