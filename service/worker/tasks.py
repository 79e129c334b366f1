"""Re-reading a group of jobs' tasks from Label Studio, and the checks a task must pass.

The webhook body is never trusted for URLs: every job's task is read again before its image is
fetched, and once more just before its prediction is posted. Label Studio's own CPU is the
bottleneck of this service (it answers from one process): per task, ``GET /api/tasks/{id}/``
costs it ~60 ms, a list read of a group 3-8 ms, so tasks are read in groups; a task missing
from a list read is read on its own (404 grace, another project), and a list read that fails
while Label Studio answers falls back to single reads, so one bad task fails alone.
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

    async def read(self, project: int, jobs: list[Job]) -> list[tuple[Job, Task | BaseException]]:
        """Each job's task, re-read from Label Studio and checked (see ``checked``), or why not.

        One list request for the group; a task missing from its answer, or every task when the
        request fails while Label Studio itself answers, is read on its own, so one bad task
        fails alone. When Label Studio as a whole is unusable every job gets that error.
        """
        found: dict[int, Task] | None = None
        try:
            found = await self.client.get_tasks(project, [job.task for job in jobs])
        except AutosegError as exc:
            if await self.outage.explains(exc):
                return [(job, exc) for job in jobs]
            log.warning(
                "project %s: group read of %d tasks failed, reading one by one: %s",
                project,
                len(jobs),
                exc,
            )
        outcomes: list[tuple[Job, Task | BaseException]] = []
        for job in jobs:
            try:
                task = found.get(job.task) if found is not None else None
                if task is None:
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
