"""A worker's side of a shared queue's leases: renewing them, and asking right before and
right after each post whether it still holds the job (``pipeline.py`` calls these).

A worker frozen (SIGSTOP) or cut off longer than ``queue.lease_s`` has lost its jobs to
another worker when it comes back: it must not post for them, nor record their outcome. On a
queue of one process every check passes without asking the queue.
"""

from __future__ import annotations

import asyncio
import logging

from service.errors import POST_UNANSWERED, RetryableError
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
        return job.id in await self.holding([job])

    async def holding(self, jobs: list[Job]) -> set[int]:
        """The ids of ``jobs`` this worker still holds, their leases renewed by the asking
        (one question to a shared queue; on a queue of one process, all of them)."""
        if not self.queue.shared:
            return {job.id for job in jobs}
        return set(await asyncio.to_thread(self.queue.confirm, [job.id for job in jobs]))

    def may_race(self, job: Job) -> bool:
        """Whether another post for ``job`` may land beside ours: on a shared queue, a job
        tried before (its last worker may have been lost with its post in flight); on any
        queue, a job whose last post got no answer (``PostUnanswered``: it may land late)."""
        if POST_UNANSWERED in (job.reason or ""):
            return True
        return self.queue.shared and job.attempts > 1

    async def keep_first(self, job: Job, created: int | None) -> None:
        """After our post of a job that may have raced (a late post of ours, or a job taken
        over from a lost worker): keep only the task's first prediction of this model_version.
        ``created`` is our post's prediction id (a single POST): deleted if an earlier one is
        there; None (a bulk post, which answers no ids): every one after the first is deleted.
        Every poster in a race applies the same rule after its own post landed, and ids grow
        with time, so exactly the first one stays."""
        try:
            task = await self.client.get_task(job.task)
            ours = sorted(
                p.id for p in task.predictions or () if p.model_version == self.model_version
            )
            if created is not None:
                later = [created] if ours and ours[0] < created else []
            else:
                later = ours[1:]
            for prediction in later:
                await self.client.delete_prediction(prediction)
            if later:
                log.warning(
                    "job %s task %s: prediction %s was there first; deleted %s",
                    job.id,
                    job.task,
                    ours[0],
                    later,
                )
        except Exception:
            log.exception("job %s task %s: checking for a raced post failed", job.id, job.task)
