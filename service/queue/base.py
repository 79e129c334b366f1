"""The durable job journal between the webhook and the workers.

Label Studio sends each TASKS_CREATED webhook once and never again, so the handler records one
job per (project, task, model_version) here, durably, before it answers. Workers then claim
jobs, run them and mark the outcome. The rules:

- ``enqueue`` is idempotent: a (project, task, model_version) that exists in any state is not
  added again, so a repeated or overlapping webhook cannot duplicate work.
- ``accept`` is the webhook's fast path: it makes a body's task ids durable at once, to be
  jobs, as ``enqueue`` would make them and dated when accepted, by the next ``claim`` at the
  latest, so a worker never misses an accepted id, also after a crash in between; until then
  the ids count as queued. (SQLite keeps a body as one inbox row, about 1 ms where inserting
  5000 jobs takes 10-15 ms behind its one writer, and ``claim`` expands the inbox first.)
- ``claim`` counts the attempt as it hands a job out, so a job that kills the worker still uses
  up its tries; ``recover`` at start-up re-queues what a crash left running and fails a job once
  it has crashed the worker ``max_attempts`` times.
- A job ``recover`` re-queues is *suspect*: any of those claimed together may have killed the
  worker (out of memory, a decoder's segfault). ``claim`` hands a due suspect job out alone,
  once no job is running, and nothing else while it runs, so only the job that kills the
  worker again spends another attempt, and its neighbours rejoin groups after one try alone.
  Ending it done, skipped or failed clears the mark; ``retry_later`` and ``release`` keep it.
- ``release`` gives back a claimed job that was never started (graceful shutdown) without
  counting the attempt.
- A *shared* store (``shared`` true: PostgreSQL) serves several processes on several
  machines. Each handle is one worker: ``claim`` leases what it takes to that handle for
  ``lease_s``, ``heartbeat`` renews the handle's leases, and a job whose lease runs out (its
  worker killed, frozen or cut off) is queued again by the next ``claim`` as ``recover`` would
  (suspect, the crash counted). ``confirm`` tells, right before a post, which jobs the handle
  still holds; ``mark_*``, ``retry_later`` and ``release`` raise ``LeaseLost`` for a job
  another worker took. "No job is running" in the suspect rule means none of this handle's.
  A store for one process (SQLite: ``shared`` false, ``lease_s`` None) holds every job it hands
  out until that process ends; ``confirm`` returns the running ones and ``heartbeat`` does
  nothing.

States::

    queued --claim--> running --mark_done------> done
      ^                  |    --mark_skipped---> skipped
      |                  |    --mark_failed----> failed
      +--retry_later-----+    (retry_later at max_attempts -> failed)
      +--release---------+
      +--recover---------+    (recover at max_attempts -> failed)

``JobQueue`` holds exactly what its users call: the webhook (``accept``), the worker
(``claim``, ``mark_*``, ``retry_later``, ``release``, ``next_due``, ``pending``,
``confirm``, ``heartbeat``, ``subscribe``), reconcile (``enqueue``, ``take_turn``),
``status``/``backfill`` (``counts``, ``recent_failures``, ``waiting_retries``, ``pending``,
``recover``, ``workers``), the metrics (``counts``) and the benchmarks (``span``), ``/ready``
(``check_writable``), plus ``get`` for the contract suite. Every implementation passes
``tests/test_queue_contract.py``. ``SQLiteJobQueue`` (``service/queue/sqlite.py``) keeps the
journal in one SQLite file; ``PostgresJobQueue`` (``service/queue/postgres.py``) in a shared
PostgreSQL database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self


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
    suspect: bool = False  # left running by a crash: ``claim`` hands it out alone


@dataclass(frozen=True)
class QueueSpan:
    """How far the journal reaches, for reports and benchmarks; times from the queue's clock.

    ``jobs`` counts job records; ``accepted`` the task ids accepted but not made jobs yet
    (repeats included; 0 for a store whose ``accept`` writes jobs at once), so that
    ``jobs + accepted`` is the sum of ``counts()``. The bounds cover the jobs only and are
    None while there are none; ``last_done`` is the latest ``updated_at`` of a done job.
    """

    jobs: int
    accepted: int
    first_task: int | None
    last_task: int | None
    first_created: float | None
    last_created: float | None
    last_done: float | None


@dataclass(frozen=True)
class WorkerSeen:
    """A worker of a shared store, as its heartbeats show it: times from the queue's clock."""

    id: str  # host:pid:random, unique per process start
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    running: int  # jobs it holds now


class JobQueue(Protocol):
    """What the webhook handler, the workers, reconcile and the operator commands need from a
    job store. Methods that take a ``job_id`` accept only a running job (``ValueError``
    otherwise); every method of a closed queue raises ``RuntimeError``.

    Not here on purpose: turning accepted ids into jobs (``SQLiteJobQueue.expand``) is how
    SQLite keeps ``accept`` fast behind its one writer, an implementation's own business;
    ``claim`` does it first, so no user of the queue needs to.
    """

    # Several processes (machines) may work on the store at once; else one (``recover`` and
    # the state lock keep it so), and the roles ``intake``/``worker`` are refused.
    shared: bool
    # How long a handle keeps its jobs without a heartbeat; None: until its process ends.
    lease_s: float | None

    def enqueue(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        """Record one queued job per new task id, durably; return how many were new."""
        ...

    def accept(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        """Record the task ids durably, fast, to become jobs as ``enqueue`` would (dated now)
        by the next ``claim`` at the latest; return how many ids were given. Until they are
        jobs they count as queued (repeats perhaps too); a repeat never becomes a second job."""
        ...

    def claim(self, limit: int) -> list[Job]:
        """Take up to ``limit`` due queued jobs, oldest first, as running; count the attempt.

        A due suspect job comes first and alone, and only once no job is running; while a
        suspect job runs, nothing is handed out (``[]``, although jobs may be due)."""
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
        """Re-queue jobs a crash left running, as suspect (or fail them once out of attempts);
        return how many were re-queued.

        On a store of one process, call it at start-up, before any worker on this store claims,
        and only while no other process works on the store (``service/statelock.py``): it
        cannot tell a job left by a crash from one another live worker is running. A shared
        store re-queues only the jobs whose lease ran out, so any process may call it any time.
        """
        ...

    def confirm(self, job_ids: Sequence[int]) -> set[int]:
        """Which of these jobs this handle still holds (running, leased to it, the lease not
        run out), renewing their leases: the check right before posting a prediction."""
        ...

    def heartbeat(self) -> None:
        """Renew the leases of the jobs this handle holds (claimed, no conclude tried yet: one
        that failed, the store away, lapses) and show the handle as alive in ``workers``; a
        shared store's worker calls it well within ``lease_s``."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread; it must only signal) when another process may
        have made jobs claimable. A store for one process never calls it: its intake wakes
        the worker itself. Best effort: workers still poll (``worker.idle_poll_s``)."""
        ...

    def take_turn(self, name: str, interval_s: float) -> bool:
        """True for the one caller, across every process on the store, that may run the
        periodic pass ``name`` now: none has in the last ``interval_s`` (within a 10% margin
        for timers that fire a little early). Reconcile asks before each periodic pass."""
        ...

    def workers(self) -> list[WorkerSeen]:
        """The workers seen on a shared store, the most recently heard first (``[]`` for a
        store of one process)."""
        ...

    def counts(self) -> dict[JobState, int]:
        """Jobs by state, every state present; accepted ids not yet jobs count as queued."""
        ...

    def pending(self) -> int:
        """Jobs not finished yet: queued + running."""
        ...

    def next_due(self) -> float | None:
        """Earliest ``not_before`` among queued jobs, or None when nothing is queued."""
        ...

    def recent_failures(self, limit: int = 20) -> list[Job]:
        """Failed jobs, the most recently failed first."""
        ...

    def waiting_retries(self, limit: int = 20) -> list[Job]:
        """Queued jobs that were tried and wait for another attempt (``attempts`` > 0, a
        ``reason``), the most recently retried first: why work is stuck, before it fails."""
        ...

    def check_writable(self) -> None:
        """Raise what a write would raise now (``RetryableError``: locked by another process
        past the busy timeout, disk full, I/O error); change nothing that a reader sees.
        ``/ready``'s probe: the webhook cannot make ids durable while this raises."""
        ...

    def span(self) -> QueueSpan:
        """What the jobs span (count, task ids, times): the benchmarks' figures."""
        ...

    def get(self, project: int, task: int, model_version: str) -> Job | None:
        """The job of that key, or None (also, perhaps, for an id accepted since the last claim).

        No service path needs it (the worker holds the ``Job`` it claimed): it is here so that
        the contract suite, and tests of the queue's users, can look at one job without
        changing it, on any store. Its key is unique, so it is cheap everywhere.
        """
        ...

    def close(self) -> None:
        """Release the store; closing twice is fine."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
