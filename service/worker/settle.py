"""How a held job ends: the one code path that records its outcome and frees its slot.

:meth:`Settler.settle` takes a job and what became of it: a string is ``done`` with that
reason; an exception is sorted by the tree in ``service/errors.py``, in this order:

- ``SkipJob``: ``skipped`` with its reason;
- ``NotYetVisible``: queued again after a backoff from 1 s (a 404 within the grace period);
- a ``RetryableError`` or ``AuthError`` that is an outage (``service/worker/outage.py``):
  given back to the queue without spending the attempt;
- any other ``RetryableError``: queued again with exponential backoff, until the queue's
  attempt limit fails it;
- any other ``AutosegError``: ``failed`` with its message;
- any other ``Exception``: ``failed`` as an internal error (logged with its traceback);
- a cancel (shutdown): given back without counting the attempt;
- ``LeaseLost`` (a shared queue gave the job to another worker): dropped, nothing recorded.

Every path goes through :meth:`Held.settling`, so a job settles once, and gives back the
decoded pixels it held (``budget.py``); a journal write that fails is logged and touches no
other job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from service.config import WorkerConfig
from service.errors import AutosegError, LeaseLost, NotYetVisible, RetryableError, SkipJob
from service.metrics import WorkerMetrics
from service.queue import Job, JobQueue, JobState
from service.worker.budget import PixelBudget
from service.worker.held import Held
from service.worker.outage import OutageWatch

log = logging.getLogger(__name__)

# A task not visible yet (its import not committed) is asked for again soon, then less often.
NOT_YET_RETRY_BASE_S = 1.0
# A journal write the queue refused for a moment (PostgreSQL restarting, SQLite locked past
# its busy timeout) is tried again after these pauses (~15 s, well within a lease), then the
# failure is logged: the job stays running there until a restart (SQLite) or its lease lapses
# (PostgreSQL), and its task's re-read then finds the prediction that was posted.
RECORD_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Settler:
    """Records held jobs' outcomes in ``queue`` and frees their slots in ``held``."""

    queue: JobQueue
    held: Held
    outage: OutageWatch
    metrics: WorkerMetrics
    settings: WorkerConfig
    clock: Callable[[], float] = time.time
    budget: PixelBudget | None = None  # the job's decoded pixels, given back as it ends

    async def settle(
        self, job: Job, outcome: BaseException | str, started: float, *, reraise: bool = True
    ) -> None:
        """Settle a held job: ``done`` with the reason a string gives, else by the exception.

        A cancel releases the job (re-raised unless ``reraise`` is false). Recording the outcome
        may itself fail (the journal): that is logged and touches no other job; the job stays
        running in the journal until the next start re-queues it (its re-check finds a
        prediction that was posted).
        """
        with self.held.settling(job) as held:
            if not held:
                return
            if self.budget is not None:  # its image and results are used no more
                self.budget.release(job.id)
            try:
                if isinstance(outcome, str):
                    await self._finish(job, JobState.DONE, outcome, started)
                elif isinstance(outcome, LeaseLost):
                    raise outcome
                else:
                    await self._sort(job, outcome, started)
            except asyncio.CancelledError:
                if reraise:
                    raise
            except LeaseLost as exc:
                # Another worker holds it now and records its outcome; ours is not to record.
                log.warning("job %s task %s: dropped by this worker: %s", job.id, job.task, exc)
                self.metrics.job_lost()
            except Exception:
                log.exception(
                    "job %s project %s task %s: recording its outcome failed",
                    job.id,
                    job.project,
                    job.task,
                )

    async def give_back(self, jobs: Iterable[Job]) -> None:
        """Held jobs never worked on (shutdown): back to the queue, the attempt not counted."""
        for job in jobs:
            await self.settle(job, asyncio.CancelledError(), 0.0, reraise=False)

    async def _sort(self, job: Job, exc: BaseException, started: float) -> None:
        """Turn an exception into the job's next state (re-raises a cancel)."""
        if isinstance(exc, asyncio.CancelledError):
            await self._release(job)
            raise exc
        if isinstance(exc, SkipJob):
            await self._finish(job, JobState.SKIPPED, str(exc), started)
        elif isinstance(exc, NotYetVisible):
            await self._retry(job, str(exc), base=NOT_YET_RETRY_BASE_S)
        elif await self.outage.explains(exc):
            await self._release(job, f"waiting for Label Studio: {exc}")
            self.metrics.job_retried()
        elif isinstance(exc, RetryableError):
            await self._retry(job, str(exc), base=self.settings.retry_base_s)
        elif isinstance(exc, AutosegError):
            await self._finish(job, JobState.FAILED, str(exc), started)
        elif isinstance(exc, Exception):
            log.exception(
                "job %s project %s task %s: internal error", job.id, job.project, job.task
            )
            reason = f"internal error: {type(exc).__name__}: {exc}"
            await self._finish(job, JobState.FAILED, reason, started)
        else:
            await self._release(job)
            raise exc

    async def _retry(self, job: Job, reason: str, base: float) -> None:
        delay = min(self.settings.retry_max_s, base * 2 ** max(0, job.attempts - 1))
        after = await self._write(self.queue.retry_later, job.id, reason, delay)
        self.metrics.job_retried()
        if after.state is JobState.FAILED:  # out of attempts
            self.metrics.job_finished(JobState.FAILED, self.clock() - job.created_at)

    async def _finish(self, job: Job, state: JobState, reason: str, started: float) -> None:
        mark = {
            JobState.DONE: self.queue.mark_done,
            JobState.SKIPPED: self.queue.mark_skipped,
            JobState.FAILED: self.queue.mark_failed,
        }[state]
        await self._write(mark, job.id, reason)
        self.metrics.job_finished(state, self.clock() - started)

    async def _release(self, job: Job, reason: str | None = None) -> None:
        with contextlib.suppress(Exception):
            # Not retried: releases come in bulk at shutdown, and one that fails costs little
            # (the job stays running until a restart, or its lease lapses).
            await asyncio.shield(asyncio.to_thread(self.queue.release, job.id, reason))

    async def _write(self, call: Callable[..., Job], *args: object) -> Job:
        """One journal write, in a thread; tried again while the queue refuses it for a
        moment (``RetryableError``), up to ``RECORD_RETRY_S``."""
        for pause in (*RECORD_RETRY_S, None):
            try:
                return await asyncio.to_thread(call, *args)
            except RetryableError as exc:
                if pause is None:
                    raise
                log.warning("a journal write failed, again in %.1f s: %s", pause, exc)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")
