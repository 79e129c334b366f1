"""The job journal in one SQLite file (WAL, ``synchronous=FULL``): safe for the threads of one
process and for several processes on the same file. The rules it keeps are in ``base.py``,
its tables in ``sqlite_schema.py``, the argument checks every queue shares in ``checks.py``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn, Self

from service.errors import ConfigError, RetryableError
from service.queue import checks
from service.queue.base import Job, JobQueue, JobState, QueueSpan, WorkerSeen
from service.queue.journal import (
    COLUMNS,
    describe,
    log_claimed,
    log_ended,
    log_queued,
    log_recovered,
    log_retried,
    row_to_job,
)
from service.queue.prune import Pruner
from service.queue.sqlite_rows import (
    INBOX_ROW_IDS,
    inbox_ids,
    inbox_rows,
    insert_inbox,
    insert_jobs,
    json_ids,
    prune_jobs,
    running_ids,
    state_counts,
    take_turn,
)
from service.queue.sqlite_schema import (
    CONFIG_CODES,
    MIN_SQLITE,
    RETRYABLE_CODES,
    SCHEMA_VERSION,
    UPGRADES,
    claim_rows,
    schema_statements,
)

log = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_S = 5.0
_EXPAND_PER_CLAIM = 4


@dataclass(frozen=True)
class _Change:
    """Where a transition out of ``running`` takes a job."""

    state: JobState
    reason: str | None
    not_before: float
    attempts: int
    suspect: bool


class SQLiteJobQueue(JobQueue):
    """The job journal in one SQLite file.

    One connection, used under a lock, serves every thread of the process; writes run in
    ``BEGIN IMMEDIATE`` transactions so that other processes on the same file wait (up to
    ``busy_timeout_s``) instead of interleaving. ``max_attempts`` has no default here: the
    service's attempt limit is ``WorkerConfig.max_attempts``, passed in by ``open_queue``.

    ``retention_days`` (``QueueConfig``'s, from ``open_queue``; None: keep all) prunes done
    and skipped jobs at open, then from ``claim`` hourly, in bounded batches (``Pruner``).

    A store for one process (``serve`` holds the state lock): no leases, no worker registry.
    """

    shared = False
    lease_s = None

    def __init__(
        self,
        path: Path,
        *,
        max_attempts: int,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        retention_days: float | None = None,
    ) -> None:
        checks.max_attempts(max_attempts)
        self._pruner = Pruner(retention_days)
        if not (math.isfinite(busy_timeout_s) and busy_timeout_s >= 0):
            raise ValueError(f"busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the folder of the job database {self.path}: {exc}"
            ) from exc
        try:
            # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE.
            self._conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            self._reraise(exc, "open")
        self._closed = False
        try:
            self._setup(busy_timeout_s)
            self.prune()
        except BaseException:
            self._conn.close()
            self._closed = True
            raise

    def _setup(self, busy_timeout_s: float) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise ConfigError(
                f"the job queue needs SQLite >= {'.'.join(map(str, MIN_SQLITE))} (RETURNING,"
                f" JSON); this Python has {sqlite3.sqlite_version}"
            )
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(
                    f"the job database {self.path} cannot use WAL journaling (got {mode!r}); "
                    "put state_dir on a local disk"
                )
            self._conn.execute("PRAGMA synchronous = FULL")
            try:
                self._conn.execute("SELECT json_valid('[]')")
            except sqlite3.OperationalError as exc:
                raise ConfigError(f"this Python's SQLite lacks JSON support: {exc}") from exc
            with self._write():
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise ConfigError(
                        f"the job database {self.path} has schema version {version}, newer than "
                        f"this program's {SCHEMA_VERSION}; upgrade ls-autoseg"
                    )
                if version < SCHEMA_VERSION:
                    for old in range(version, SCHEMA_VERSION) if version else ():
                        for statement in UPGRADES[old]:
                            self._conn.execute(statement)
                    for statement in schema_statements():
                        self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._reraise(exc, "open")

    # -- plumbing ---------------------------------------------------------------------------

    def _reraise(self, exc: sqlite3.Error, action: str) -> NoReturn:
        """Raise ``exc`` as the project's retryable/config error where it is one of those."""
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        where = f"job database {self.path}"
        if primary in RETRYABLE_CODES:
            raise RetryableError(f"{where} is busy or out of space ({action}): {exc}") from exc
        if primary in CONFIG_CODES:
            raise ConfigError(f"{where} cannot be used ({action}): {exc}; check state_dir") from exc
        if primary == sqlite3.SQLITE_IOERR:
            raise RetryableError(f"disk I/O error on the {where} ({action}): {exc}") from exc
        raise exc

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction; the caller holds ``self._lock``."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT: the connection must not stay inside a transaction.
            if self._conn.in_transaction:
                self._conn.rollback()
            raise

    @contextmanager
    def _locked(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the job queue on {self.path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                self._reraise(exc, action)

    # -- writes -----------------------------------------------------------------------------

    def enqueue(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        ids = json_ids(project, task_ids, model_version)
        if not ids:
            return 0
        with self._locked("enqueue") as conn:
            now = self._clock()
            with self._write():
                new = insert_jobs(conn, project, ids, model_version, now)
        log_queued(log, project, new, len(task_ids), model_version)
        return new

    def accept(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        rows = inbox_rows(project, task_ids, model_version)
        if not rows:
            return 0
        with self._locked("accept") as conn:
            now = self._clock()
            # A big body becomes many rows, in one transaction: durable all at once, and
            # expanded a bounded row at a time.
            with self._write():
                insert_inbox(conn, project, model_version, rows, now)
        log.debug("project %d: %d task id(s) accepted", project, len(task_ids))
        return len(task_ids)

    def expand(self, max_rows: int | None = None) -> int:
        """Turn inbox rows, oldest first (every one, or ``max_rows``), into jobs as ``enqueue``
        does, dated when accepted; return how many jobs were new. ``claim`` calls it first;
        SQLite's own (not ``JobQueue``'s), for tests and the intake benchmark."""
        new = 0
        for _ in itertools.count() if max_rows is None else range(max_rows):
            # One inbox row per transaction: accept() waits for one row's insert at most.
            with self._locked("expand") as conn:
                if conn.execute("SELECT 1 FROM inbox LIMIT 1").fetchone() is None:
                    return new  # the usual case: no write transaction
                with self._write():
                    row = conn.execute(
                        "SELECT id, project, model_version, task_ids, received_at,"
                        " json_array_length(task_ids) FROM inbox ORDER BY id LIMIT 1"
                    ).fetchone()
                    if row is None:  # another process expanded it meanwhile
                        continue
                    row_id, project, model_version, ids, received_at, given = row
                    conn.execute("DELETE FROM inbox WHERE id = ?", (row_id,))
                    if given > INBOX_ROW_IDS:
                        # Written whole by an older version: split it, and expand the parts
                        # in later transactions (behind the rows accepted since).
                        rows = inbox_rows(project, json.loads(ids), model_version)
                        insert_inbox(conn, project, model_version, rows, received_at)
                        continue
                    added = insert_jobs(conn, project, ids, model_version, received_at)
            new += added
            log_queued(log, project, added, given, model_version)
            # Let a thread waiting for the lock (an accept: a webhook's answer) in before the
            # next row: threading.Lock is not fair, and this loop would take it straight back.
            time.sleep(0)
        return new

    def prune(self) -> int:
        """Delete done and skipped jobs older than the retention if a prune is due (see
        ``Pruner``); return how many went. SQLite's own, called at open and by ``claim``."""
        return self._pruner.run(self._clock, self._prune_batch)

    def _prune_batch(self, before: float, limit: int) -> int:
        with self._locked("prune") as conn, self._write():
            return prune_jobs(conn, before, limit)

    def claim(self, limit: int) -> list[Job]:
        if checks.limit(limit) == 0:
            return []
        # A few rows per claim (each up to INBOX_ROW_IDS ids): a long inbox is worked off over
        # the next claims instead of stalling this one.
        self.expand(max_rows=_EXPAND_PER_CLAIM)
        self.prune()
        with self._locked("claim") as conn:
            now = self._clock()
            with self._write():
                rows = claim_rows(conn, limit, now)
        jobs = sorted((row_to_job(row) for row in rows), key=lambda job: job.id)
        log_claimed(log, jobs, "it was running when the worker died")
        return jobs

    def _finish(
        self,
        job_id: int,
        action: str,
        decide: Callable[[Job, float], _Change],
    ) -> Job:
        """Move a running job to where ``decide`` says, in one transaction; return it."""
        with self._locked(action) as conn:
            now = self._clock()
            with self._write():
                row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise ValueError(f"{action}: no job with id {job_id}")
                before = row_to_job(row)
                if before.state is not JobState.RUNNING:
                    raise ValueError(
                        f"{action}: {describe(before)} is {before.state.value}, not running"
                    )
                change = decide(before, now)
                after_row = conn.execute(
                    f"UPDATE jobs SET state = ?, reason = ?, not_before = ?, attempts = ?,"
                    f" suspect = ?, updated_at = ? WHERE id = ? RETURNING {COLUMNS}",
                    (
                        change.state.value,
                        change.reason,
                        change.not_before,
                        change.attempts,
                        int(change.suspect),
                        now,
                        job_id,
                    ),
                ).fetchone()
        return row_to_job(after_row)

    def _terminal(self, job_id: int, state: JobState, reason: str | None) -> Job:
        after = self._finish(
            job_id,
            f"mark_{state.value}",
            # It ran to an outcome without killing the worker: suspect no more.
            lambda job, now: _Change(state, reason, job.not_before, job.attempts, False),
        )
        log_ended(log, after, reason)
        return after

    def mark_done(self, job_id: int, reason: str | None = None) -> Job:
        return self._terminal(job_id, JobState.DONE, reason)

    def mark_skipped(self, job_id: int, reason: str) -> Job:
        return self._terminal(job_id, JobState.SKIPPED, reason)

    def mark_failed(self, job_id: int, reason: str) -> Job:
        return self._terminal(job_id, JobState.FAILED, reason)

    def retry_later(self, job_id: int, reason: str, delay_s: float) -> Job:
        checks.delay_s(delay_s)

        def decide(job: Job, now: float) -> _Change:
            if job.attempts >= self.max_attempts:
                gave_up = f"gave up after {job.attempts} attempts: {reason}"
                return _Change(JobState.FAILED, gave_up, job.not_before, job.attempts, False)
            # A retry proves nothing (it may not have reached the model): still suspect.
            return _Change(JobState.QUEUED, reason, now + delay_s, job.attempts, job.suspect)

        after = self._finish(job_id, "retry_later", decide)
        log_retried(log, after, self.max_attempts, delay_s, reason)
        return after

    def release(self, job_id: int, reason: str | None = None) -> Job:
        after = self._finish(
            job_id,
            "release",
            lambda job, now: _Change(
                JobState.QUEUED,
                job.reason if reason is None else reason,
                job.not_before,
                max(job.attempts - 1, 0),
                job.suspect,
            ),
        )
        log.debug("%s: running -> queued (released, attempt not counted)", describe(after))
        return after

    def recover(self) -> int:
        with self._locked("recover") as conn:
            now = self._clock()
            with self._write():
                failed = conn.execute(
                    f"UPDATE jobs SET state = 'failed', updated_at = ?, suspect = 0,"
                    f" reason = 'crashed the worker ' || attempts || ' times'"
                    f" WHERE state = 'running' AND attempts >= ? RETURNING {COLUMNS}",
                    (now, self.max_attempts),
                ).fetchall()
                # Suspect: any of them may be what killed the worker, so each runs alone
                # next (``claim``) and only the one that kills it again spends more attempts.
                requeued = conn.execute(
                    f"UPDATE jobs SET state = 'queued', updated_at = ?, suspect = 1"
                    f" WHERE state = 'running' RETURNING {COLUMNS}",
                    (now,),
                ).fetchall()
        recovered = [row_to_job(row) for row in [*failed, *requeued]]
        log_recovered(log, recovered, self.max_attempts, "recovered after a crash")
        return len(requeued)

    # -- one process: what leases are on a shared store ------------------------------------

    def confirm(self, job_ids: Sequence[int]) -> set[int]:
        with self._locked("confirm") as conn:
            return running_ids(conn, job_ids)

    def heartbeat(self) -> None:
        """Nothing to renew: the process holds its jobs until it ends."""

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Nothing to listen for: one process, whose intake wakes its worker itself."""

    def take_turn(self, name: str, interval_s: float) -> bool:
        checks.delay_s(interval_s)
        with self._locked("take_turn") as conn, self._write():
            return take_turn(conn, name, self._clock(), interval_s)

    def workers(self) -> list[WorkerSeen]:
        return []

    # -- reads ------------------------------------------------------------------------------

    def counts(self) -> dict[JobState, int]:
        with self._locked("counts") as conn:
            counted = state_counts(conn)
            accepted = inbox_ids(conn)
        result = {state: counted.get(state.value, 0) for state in JobState}
        result[JobState.QUEUED] += accepted  # not expanded yet (repeats counted)
        return result

    def get(self, project: int, task: int, model_version: str) -> Job | None:
        with self._locked("get") as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE project = ? AND task = ? AND model_version = ?",
                (project, task, model_version),
            ).fetchone()
        return None if row is None else row_to_job(row)

    def recent_failures(self, limit: int = 20) -> list[Job]:
        return self._latest("recent_failures", "state = 'failed'", limit)

    def waiting_retries(self, limit: int = 20) -> list[Job]:
        return self._latest(
            "waiting_retries", "state = 'queued' AND attempts > 0 AND reason IS NOT NULL", limit
        )

    def _latest(self, action: str, where: str, limit: int) -> list[Job]:
        """Up to ``limit`` jobs matching ``where`` (a constant of this class), newest first."""
        checks.limit(limit)
        with self._locked(action) as conn:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM jobs WHERE {where}"
                " ORDER BY updated_at DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [row_to_job(row) for row in rows]

    def check_writable(self) -> None:
        with self._locked("write check") as conn, self._write():
            # Rewriting the header's schema version is a real commit (a WAL frame, an fsync):
            # a full disk or a failing one shows here, and nothing a reader sees changes.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def span(self) -> QueueSpan:
        with self._locked("span") as conn:
            jobs, first_task, last_task, first_created, last_created = conn.execute(
                "SELECT COUNT(*), MIN(task), MAX(task), MIN(created_at), MAX(created_at) FROM jobs"
            ).fetchone()
            (last_done,) = conn.execute(
                "SELECT MAX(updated_at) FROM jobs WHERE state = 'done'"
            ).fetchone()
            accepted = inbox_ids(conn)
        return QueueSpan(
            jobs=int(jobs),
            accepted=accepted,
            first_task=first_task,
            last_task=last_task,
            first_created=None if first_created is None else float(first_created),
            last_created=None if last_created is None else float(last_created),
            last_done=None if last_done is None else float(last_done),
        )

    def next_due(self) -> float | None:
        with self._locked("next_due") as conn:
            (due,) = conn.execute(
                "SELECT MIN(not_before) FROM jobs WHERE state = 'queued'"
            ).fetchone()
            (accepted,) = conn.execute("SELECT MIN(received_at) FROM inbox").fetchone()
        dues = [float(t) for t in (due, accepted) if t is not None]
        return min(dues) if dues else None

    def pending(self) -> int:
        with self._locked("pending") as conn:
            counted = state_counts(conn)
            accepted = inbox_ids(conn)
        return counted.get("queued", 0) + counted.get("running", 0) + accepted

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
