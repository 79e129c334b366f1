"""The durable job journal between the webhook and the workers.

Label Studio sends each TASKS_CREATED webhook once and never again, so the handler records one
job per (project, task, model_version) here, durably, before it answers. Workers then claim
jobs, run them and mark the outcome. The rules:

- ``enqueue`` is idempotent: a (project, task, model_version) that exists in any state is not
  added again, so a repeated or overlapping webhook cannot duplicate work.
- ``accept`` is the webhook's fast path: it makes a body's task ids durable as one row of an
  inbox (about 1 ms where inserting 5000 jobs takes 10-15 ms, and inserts queue behind
  SQLite's one writer), and ``expand`` turns inbox rows into jobs later, as ``enqueue``
  would, dated when they were accepted. ``claim`` expands first, so a worker never misses an
  accepted id, also after a crash between the two; until then the ids count as queued.
- ``claim`` counts the attempt as it hands a job out, so a job that kills the worker still uses
  up its tries; ``recover`` at start-up re-queues what a crash left running and fails a job once
  it has crashed the worker ``max_attempts`` times.
- ``release`` gives back a claimed job that was never started (graceful shutdown) without
  counting the attempt.

States::

    queued --claim--> running --mark_done------> done
      ^                  |    --mark_skipped---> skipped
      |                  |    --mark_failed----> failed
      +--retry_later-----+    (retry_later at max_attempts -> failed)
      +--release---------+
      +--recover---------+    (recover at max_attempts -> failed)

``JobQueue`` is the interface the webhook, the worker, reconcile and ``status`` use; every
implementation passes ``tests/test_queue_contract.py``. ``SQLiteJobQueue``
(``service/queue/sqlite.py``) keeps the journal in one SQLite file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class JobState(StrEnum):
    """A job's state; a ``str`` Enum (StrEnum, so f-strings and logs show the bare value)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    """One row of the journal; times are epoch seconds from the queue's clock."""

    id: int
    project: int
    task: int
    model_version: str
    state: JobState
    attempts: int
    reason: str | None
    created_at: float
    updated_at: float
    not_before: float


class JobQueue(Protocol):
    """What the webhook handler and the workers need from a job store."""

    def enqueue(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        """Record one queued job per new task id, durably; return how many were new."""
        ...

    def accept(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        """Record the task ids durably in the inbox, to become jobs on ``expand``; return how
        many ids were given (repeats are dropped when expanded)."""
        ...

    def expand(self, max_rows: int | None = None) -> int:
        """Turn inbox rows, oldest first (every one, or ``max_rows``), into jobs as ``enqueue``
        does; return how many jobs were new."""
        ...

    def claim(self, limit: int) -> list[Job]:
        """Take up to ``limit`` due queued jobs, oldest first, as running; count the attempt."""
        ...

    def mark_done(self, job_id: int, reason: str | None = None) -> Job: ...

    def mark_skipped(self, job_id: int, reason: str) -> Job: ...

    def mark_failed(self, job_id: int, reason: str) -> Job: ...

    def retry_later(self, job_id: int, reason: str, delay_s: float) -> Job:
        """Queue a running job again after ``delay_s``; fail it once out of attempts."""
        ...

    def release(self, job_id: int, reason: str | None = None) -> Job:
        """Give back a running job without counting the attempt (it was never started, or
        Label Studio as a whole was unavailable); ``reason``, if given, replaces the last."""
        ...

    def recover(self) -> int:
        """Re-queue jobs a crash left running (or fail them); return how many were re-queued.

        Call it at start-up, before any worker on this store claims: it cannot tell a job
        left by a crash from one another live worker is running.
        """
        ...

    def counts(self) -> dict[JobState, int]: ...

    def get(self, project: int, task: int, model_version: str) -> Job | None: ...

    def recent_failures(self, limit: int = 20) -> list[Job]: ...

    def next_due(self) -> float | None:
        """Earliest ``not_before`` among queued jobs, or None when nothing is queued."""
        ...

    def pending(self) -> int:
        """Jobs not finished yet: queued + running."""
        ...

    def close(self) -> None: ...
