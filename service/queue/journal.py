"""What every backend shares about a job row: its columns, how a row reads as a ``Job``, and
how its transitions are logged (each backend logs under its own logger, with these words)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from service.queue.base import Job, JobState

# The job columns, in ``row_to_job``'s order (each backend's table has these, and more).
COLUMNS = (
    "id, project, task, model_version, state, attempts, reason, created_at, updated_at,"
    " not_before, suspect"
)


def row_to_job(row: tuple[Any, ...] | Any) -> Job:
    """A row of ``COLUMNS`` as a ``Job`` (numbers as the driver gives them: REAL columns may
    read back whole numbers as int, booleans as 0/1)."""
    (
        job_id,
        project,
        task,
        model_version,
        state,
        attempts,
        reason,
        created_at,
        updated_at,
        not_before,
        suspect,
    ) = row
    assert reason is None or isinstance(reason, str)
    return Job(
        id=int(job_id),
        project=int(project),
        task=int(task),
        model_version=str(model_version),
        state=JobState(state),
        attempts=int(attempts),
        reason=reason,
        created_at=float(created_at),
        updated_at=float(updated_at),
        not_before=float(not_before),
        suspect=bool(suspect),
    )


def describe(job: Job) -> str:
    return f"job {job.id} project {job.project} task {job.task}"


def log_queued(log: logging.Logger, project: int, new: int, given: int, version: str) -> None:
    log.info(
        "project %d: %d job(s) queued, %d duplicate(s) (model_version %s)",
        project,
        new,
        given - new,
        version,
    )


def log_claimed(log: logging.Logger, jobs: Iterable[Job], alone: str) -> None:
    for job in jobs:
        log.debug(
            "%s: queued -> running (attempt %d%s)",
            describe(job),
            job.attempts,
            f", alone: {alone}" if job.suspect else "",
        )


def log_ended(log: logging.Logger, job: Job, reason: str | None) -> None:
    level = logging.WARNING if job.state is JobState.FAILED else logging.INFO
    log.log(
        level,
        "%s: running -> %s (attempt %d)%s",
        describe(job),
        job.state.value,
        job.attempts,
        f": {reason}" if reason else "",
    )


def log_retried(
    log: logging.Logger, job: Job, max_attempts: int, delay_s: float, reason: str
) -> None:
    if job.state is JobState.FAILED:
        log.warning("%s: running -> failed: %s", describe(job), job.reason)
    else:
        log.info(
            "%s: running -> queued (attempt %d of %d, retry in %.1f s): %s",
            describe(job),
            job.attempts,
            max_attempts,
            delay_s,
            reason,
        )


def log_recovered(log: logging.Logger, jobs: Iterable[Job], max_attempts: int, why: str) -> None:
    """Jobs a lost worker left running: failed out of attempts, or queued again to run alone."""
    for job in sorted(jobs, key=lambda job: job.id):
        if job.state is JobState.FAILED:
            log.warning("%s: running -> failed: %s", describe(job), job.reason)
        else:
            log.info(
                "%s: running -> queued (%s, attempt %d of %d; to run alone)",
                describe(job),
                why,
                job.attempts,
                max_attempts,
            )
