"""Re-reading a group of jobs' tasks from Label Studio, and the checks a task must pass.

The webhook body is never trusted for URLs: every job's task is read again before its image is
fetched, and once more just before its prediction is posted. Label Studio's own CPU is the
bottleneck of this service (it answers from one process): per task, ``GET /api/tasks/{id}/``
costs it ~60 ms, a full list read of a group ~6 ms, a lean filtered one ~2 ms. So a group is
read lean, filtered to the tasks that still need work (``queries.untouched_query``); the
tasks missing from that answer (annotated, predicted, or only a version containing ours) are
read again in full and checked exactly; a task missing from both is read on its own (404
grace, another project); a list read that fails while Label Studio answers falls back to the
next, down to single reads, so one bad task fails alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import AutosegError, NotFoundError, NotYetVisible, PermanentError, SkipJob
from service.labelstudio import Task
from service.labelstudio.client import LabelStudioClient
from service.queue import Job
from service.worker.outage import OutageWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskReader:
    """Reads jobs' tasks for ``model_version``; a 404 within ``not_found_grace_s`` of a job's
    queueing is ``NotYetVisible`` (retried), not the job's failure."""

    client: LabelStudioClient
    outage: OutageWatch
    model_version: str
    not_found_grace_s: float
    clock: Callable[[], float] = time.time

    async def read(
        self, project: int, jobs: list[Job], *, singles: bool = True
    ) -> list[tuple[Job, Task | BaseException]]:
        """Each job's task, re-read from Label Studio and checked (see ``checked``), or why not.

        One lean filtered list request for the group; the tasks missing from its answer in one
        full list request; a task missing from both, or every task when the requests fail
        while Label Studio itself answers, is read on its own, so one bad task fails alone.
        When Label Studio as a whole is unusable every job gets that error. ``singles=False``:
        no reads on their own; a job whose task neither list read returned is left out of the
        answer (a task imported a moment ago may not be committed yet: read it later).
        """
        found: dict[int, Task] = {}
        for full in (False, True):
            missing = [job.task for job in jobs if job.task not in found]
            if not missing:
                break
            try:
                if full:
                    found.update(await self.client.get_tasks(project, missing))
                else:
                    found.update(
                        await self.client.untouched_tasks(project, missing, self.model_version)
                    )
            except AutosegError as exc:
                if await self.outage.explains(exc):
                    return [(job, exc) for job in jobs]
                log.warning(
                    "project %s: %s group read of %d tasks failed: %s",
                    project,
                    "full" if full else "lean",
                    len(missing),
                    exc,
                )
        outcomes: list[tuple[Job, Task | BaseException]] = []
        for job in jobs:
            try:
                task = found.get(job.task)
                if task is None:
                    if not singles:
                        continue
                    task = await self._one(job)
                outcomes.append((job, self.checked(job, task)))
            except Exception as exc:
                outcomes.append((job, exc))
        return outcomes

    async def _one(self, job: Job) -> Task:
        try:
            return await self.client.get_task(job.task)
        except NotFoundError as exc:
            if self.clock() - job.created_at < self.not_found_grace_s:
                raise NotYetVisible(
                    f"task {job.task} not found yet (import not committed?)"
                ) from exc
            raise

    def checked(self, job: Job, task: Task) -> Task:
        """The task, unless it belongs elsewhere, a person annotated it or this version
        predicted it."""
        if task.project is not None and task.project != job.project:
            raise PermanentError(f"task {job.task} belongs to project {task.project}")
        if task.is_annotated:
            raise SkipJob("annotated")
        if task.has_prediction_of(self.model_version):
            raise SkipJob("exists")
        return task
