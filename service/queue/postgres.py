"""The job journal in a shared PostgreSQL database (``queue.url``): any number of intake and
worker processes, on any number of machines, on one queue. The rules it keeps are in
``base.py``, its tables and statements in ``postgres_schema.py``, how it reaches the server
(psycopg's async pool on a loop of its own, errors, LISTEN) in ``postgres_io.py``.

- Claims take due jobs in groups with ``FOR UPDATE SKIP LOCKED``: workers never wait for each
  other's rows, and one claim serves a model batch and a list read of Label Studio.
- Leases: each handle is one worker (``owner``: host, pid and a random part); a claimed job is
  its own until ``lease_until``, renewed by ``heartbeat`` and ``confirm``. A job whose lease ran
  out is queued again by the next claim anywhere, as suspect, its attempt spent; the worker
  that comes back finds it no longer holds it (``confirm``; ``LeaseLost`` on conclude).
- ``enqueue``, ``accept`` and ``release`` ``NOTIFY`` in their transaction; ``subscribe``
  ``LISTEN``s. Polling stays the fallback (PgBouncer in transaction mode has no LISTEN).
- An unreachable or restarting server is a ``RetryableError`` (the webhook answers 503,
  workers back off and resume); a refused login, a missing database or privilege is a
  ``ConfigError``. Messages name the server without the password.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import psycopg
import psycopg_pool

from service.errors import ConfigError, LeaseLost
from service.queue import checks
from service.queue import postgres_schema as db
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
from service.queue.postgres_io import (
    CALL_TIMEOUT_S,
    LoopThread,
    check_url,
    connect,
    listen,
    make_pool,
    public_url,
    reraise,
)
from service.queue.prune import Pruner

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LEASE_S = 60.0
POOL_MAX = 8  # connections per process: the webhook's accepts, the worker, metrics, status
FORGET_WORKERS_S = 86400.0  # a worker silent this long leaves the registry
EXPAND_PER_CLAIM = 4  # inbox rows a claim expands first, at most
TX_RETRIES = 3  # a transaction PostgreSQL rolled back for a deadlock is run again


class PostgresJobQueue(JobQueue):
    """The job journal in PostgreSQL; each handle is one worker with its own leases.

    ``max_attempts`` has no default (the worker's, from ``open_queue``); ``lease_s`` is
    ``queue.lease_s``; ``retention_days`` prunes done and skipped jobs as on SQLite. Times come
    from ``clock`` (epoch seconds): the machines of one queue need synchronised clocks (NTP),
    a skew adds to the takeover time of a lost worker's jobs.
    """

    shared = True

    def __init__(
        self,
        url: str,
        *,
        max_attempts: int,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.time,
        retention_days: float | None = None,
        pool_max: int = POOL_MAX,
    ) -> None:
        checks.max_attempts(max_attempts)
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"lease_s must be a finite number > 0, got {lease_s!r}")
        check_url(url)
        self.max_attempts = max_attempts
        self.lease_s = float(lease_s)
        self.where = public_url(url)
        self._clock = clock
        self._pruner = Pruner(retention_days)
        self._me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._callbacks: list[Callable[[], None]] = []
        # Jobs this handle claimed and has not tried to conclude: the ones ``heartbeat`` renews.
        # A conclude that finds one gone is a lost lease (``LeaseLost``), of any other job a
        # wrong call (``ValueError``). A conclude that fails (the server away) moves the job to
        # ``_lost``: renewed no more (its lease lapses unless a retry of the conclude lands
        # first, and a later claim re-reads its task), still known as ours.
        self._held: set[int] = set()
        self._lost: set[int] = set()  # were in _held until their lease ran out or a conclude failed
        self._held_lock = threading.Lock()
        self._used: dict[int, float] = {}  # id(connection) -> when a call last used it
        self._listener: asyncio.Task[None] | None = None  # on self._loop
        self._closed = False
        self._url = url
        self._loop = LoopThread(f"queue {self.where}")
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        try:
            self._loop.call(self._open(pool_max), CALL_TIMEOUT_S)
            self.prune()
        except BaseException:
            self.close()
            raise

    @property
    def worker_id(self) -> str:
        """This handle's name in ``owner`` and ``workers``."""
        return self._me

    async def _open(self, pool_max: int) -> None:
        self._pool = make_pool(self._url, pool_max, self._used)
        try:
            # One connection first: a wrong password or database fails here, clearly.
            conn = await connect(self._url)
        except psycopg.Error as exc:
            reraise(exc, f"the job queue at {self.where}", "open")
        try:
            await self._migrate(conn)
        except psycopg.Error as exc:
            reraise(exc, f"the job queue at {self.where}", "create its tables")
        finally:
            await conn.close()
        await self._pool.open(wait=False)

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Create or upgrade the tables, one instance at a time (a transaction lock)."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (db.SCHEMA_LOCK,))
            await conn.execute(db.SCHEMA[0])
            cur = await conn.execute(
                "SELECT value FROM ls_autoseg_meta WHERE key = 'schema_version'"
            )
            row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > db.SCHEMA_VERSION:
                raise ConfigError(
                    f"the job queue at {self.where} has schema version {version}, newer than "
                    f"this program's {db.SCHEMA_VERSION}; upgrade ls-autoseg"
                )
            for old in range(version, db.SCHEMA_VERSION) if version else ():
                for statement in db.UPGRADES[old]:
                    await conn.execute(statement)
            # Every time (each creates only what is missing, a few ms): a database that
            # lost a table or index, or predates one of this version's, is made whole.
            for statement in db.SCHEMA[1:]:
                await conn.execute(statement)
            if version < db.SCHEMA_VERSION:
                await conn.execute(
                    "INSERT INTO ls_autoseg_meta (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (str(db.SCHEMA_VERSION),),
                )
                log.info("job queue at %s: schema version %d", self.where, db.SCHEMA_VERSION)

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, action: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection; errors as the project's.

        The pool's connections are in autocommit: a single statement is its own transaction
        (one round trip), and work that must be atomic sends its statements in one pipeline
        (one implicit transaction, one round trip) or opens ``conn.transaction()``."""
        if self._closed:
            raise RuntimeError(f"the job queue at {self.where} is closed")
        pool = self._pool
        assert pool is not None

        broken: list[bool] = []

        async def transaction() -> T:
            async with pool.connection() as conn:
                try:
                    return await work(conn)
                except psycopg.OperationalError:
                    broken.append(conn.broken)
                    raise
                finally:
                    self._used[id(conn)] = time.monotonic()

        for attempt in range(TX_RETRIES + 1):
            broken.clear()
            try:
                return self._loop.call(transaction(), CALL_TIMEOUT_S + 5)
            except psycopg.errors.DeadlockDetected as exc:
                # Two bodies sharing task ids in another order, inserted at once: one is
                # rolled back whole; it goes again at once.
                if attempt == TX_RETRIES:
                    reraise(exc, f"the job queue at {self.where}", action)
            except psycopg.OperationalError as exc:
                # A connection the server dropped since its last use (a restart, a failover),
                # found broken by this call: once more, on a fresh one. (Every call is safe to
                # repeat: inserts skip what exists, a conclude that landed reads as a lost
                # lease, a claim that landed lets its jobs' leases lapse.)
                if not (attempt == 0 and broken == [True]):
                    reraise(exc, f"the job queue at {self.where}", action)
            except (psycopg.Error, psycopg_pool.PoolTimeout, TimeoutError) as exc:
                reraise(exc, f"the job queue at {self.where}", action)
        raise AssertionError("unreachable")

    async def _rows(
        self, conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        cur = await conn.execute(query, params)
        return await cur.fetchall()

    def _fetch(self, action: str, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        """The rows of one statement, in a transaction of its own."""
        return self._run(action, lambda conn: self._rows(conn, query, params or {}))

    # -- writes -----------------------------------------------------------------------------

    def _insert(
        self, action: str, project: int, task_ids: Sequence[int], model_version: str
    ) -> int:
        # In the body's order (job ids follow it, as on SQLite), repeats dropped.
        ids = list(dict.fromkeys(checks.job_args(project, task_ids, model_version)))
        if not ids:
            return 0
        now = self._clock()

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                cur = await conn.execute(
                    db.INSERT_JOBS,
                    {"project": project, "version": model_version, "now": now, "ids": ids},
                )
                if cur.rowcount:
                    await conn.execute("SELECT pg_notify(%s, '')", (db.CHANNEL,))
            return cur.rowcount

        new = self._run(action, work)
        log_queued(log, project, new, len(task_ids), model_version)
        return new

    def enqueue(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        return self._insert("enqueue", project, task_ids, model_version)

    def accept(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        """The ids as inbox rows of ``INBOX_ROW_IDS``, in one transaction (a few ms for 5000,
        where inserting 5000 jobs costs the server ~40 ms of CPU); ``claim`` expands them."""
        ids = checks.job_args(project, task_ids, model_version)
        if not ids:
            return 0
        now = self._clock()
        rows = [
            {
                "project": project,
                "version": model_version,
                "ids": ids[at : at + db.INBOX_ROW_IDS],
                "now": now,
            }
            for at in range(0, len(ids), db.INBOX_ROW_IDS)
        ]

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.pipeline(), conn.cursor() as cur:  # one transaction, one round trip
                await cur.executemany(db.INSERT_INBOX, rows)
                await cur.execute("SELECT pg_notify(%s, '')", (db.CHANNEL,))

        self._run("accept", work)
        log.debug("project %d: %d task id(s) accepted", project, len(ids))
        return len(ids)

    def expand(self, max_rows: int | None = None) -> int:
        """Turn inbox rows, oldest first (every one, or ``max_rows``), into jobs as ``enqueue``
        does, dated when accepted; return how many jobs were new. ``claim`` does it first, in
        its own statement; rows another claim is expanding are left to it. PostgreSQL's own
        (not ``JobQueue``'s), for tests and benchmarks."""
        new = 0
        for _ in itertools.count() if max_rows is None else range(max_rows):
            rows = self._fetch("expand", db.EXPAND, {"rows": 1})
            if not rows:
                break
            new += self._log_expanded(rows)
        return new

    @staticmethod
    def _log_expanded(rows: list[tuple[Any, ...]]) -> int:
        """Log what ``EXPAND``'s rows say; return the jobs it made."""
        for project, version, given, added, _ in rows:
            log_queued(log, int(project), int(added), int(given), str(version))
        return sum(int(row[3]) for row in rows)

    def prune(self) -> int:
        """Delete done and skipped jobs older than the retention when due (see ``Pruner``)."""
        return self._pruner.run(self._clock, self._prune_batch)

    def _prune_batch(self, before: float, limit: int) -> int:
        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(db.PRUNE, {"before": before, "limit": limit})
            return cur.rowcount

        return self._run("prune", work)

    def claim(self, limit: int) -> list[Job]:
        if checks.limit(limit) == 0:
            return []
        self.prune()
        now = self._clock()
        params = {
            "now": now,
            "me": self._me,
            "until": now + self.lease_s,
            "limit": limit,
            "max": self.max_attempts,
            "rows": EXPAND_PER_CLAIM,
        }

        async def work(
            conn: psycopg.AsyncConnection[Any],
        ) -> tuple[list[tuple[Any, ...]], list[Job], list[Job]]:
            # One pipeline, so one implicit transaction and one round trip: accepted ids
            # become jobs (a few inbox rows: a long inbox is worked off over the next claims
            # of every worker), jobs of lost workers go back to the queue, and the due ones
            # are taken (the suspect rule reads this worker's running jobs after the expiry).
            async with conn.pipeline():
                expanding = await conn.execute(db.EXPAND, params)
                expiring = await conn.execute(db.EXPIRE_LEASES, params)
                taking = await conn.execute(db.CLAIM, params)
            expanded = await expanding.fetchall()
            expired = [row_to_job(r) for r in await expiring.fetchall()]
            return expanded, expired, [row_to_job(r) for r in await taking.fetchall()]

        expanded, expired, jobs = self._run("claim", work)
        self._log_expanded(expanded)
        self._log_expired(expired)
        jobs.sort(key=lambda job: job.id)
        with self._held_lock:
            self._held.update(job.id for job in jobs)
        log_claimed(log, jobs, "its last worker was lost")
        return jobs

    def _lose(self, job_ids: set[int]) -> None:
        """These jobs' leases ran out: renewed no more, a conclude of one is ``LeaseLost``."""
        with self._held_lock:
            lost = self._held & job_ids
            self._held -= lost
            self._lost |= lost

    def _log_expired(self, jobs: list[Job]) -> None:
        """Log the jobs a lost worker's lease left; any of ours among them is ours no more."""
        self._lose({job.id for job in jobs})
        log_recovered(log, jobs, self.max_attempts, "its worker's lease ran out")

    def _finish(
        self,
        job_id: int,
        action: str,
        assignments: str,
        params: dict[str, Any],
    ) -> Job:
        """Move a running job this handle holds, by ``assignments`` (SQL of this module's)."""
        query = (
            f"UPDATE ls_autoseg_jobs SET {assignments}, owner = NULL, lease_until = NULL,"
            f" updated_at = %(now)s WHERE id = %(id)s AND state = 'running' AND owner = %(me)s"
            f" RETURNING {COLUMNS}"
        )
        args = {**params, "id": job_id, "now": self._clock(), "me": self._me}

        async def work(conn: psycopg.AsyncConnection[Any]) -> tuple[Job | None, Job | None]:
            rows = await self._rows(conn, query, args)
            if rows:
                if action == "release":
                    await conn.execute("SELECT pg_notify(%s, '')", (db.CHANNEL,))
                return row_to_job(rows[0]), None
            found = await self._rows(
                conn, f"SELECT {COLUMNS} FROM ls_autoseg_jobs WHERE id = %(id)s", args
            )
            return None, row_to_job(found[0]) if found else None

        with self._held_lock:
            was_ours = job_id in self._held or job_id in self._lost
        try:
            after, before = self._run(action, work)
        except BaseException:
            # Renewed no more (a caller that gives up must not leave it running for ever),
            # still ours: a conclude tried again later succeeds, or finds it taken over.
            self._lose({job_id})
            raise
        with self._held_lock:
            self._held.discard(job_id)
            self._lost.discard(job_id)
        if after is not None:
            return after
        if before is None:
            raise ValueError(f"{action}: no job with id {job_id}")
        if was_ours:
            raise LeaseLost(
                f"{action}: {describe(before)} is no longer held by this worker: its lease ran"
                f" out and it went back to the queue (now {before.state.value})"
            )
        raise ValueError(f"{action}: {describe(before)} is {before.state.value}, not running")

    def _terminal(self, job_id: int, state: JobState, reason: str | None) -> Job:
        after = self._finish(
            job_id,
            f"mark_{state.value}",
            "state = %(state)s, reason = %(reason)s, suspect = false",
            {"state": state.value, "reason": reason},
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
        # Out of attempts it fails; else queued again, still suspect if it was (a retry
        # proves nothing about a crash).
        after = self._finish(
            job_id,
            "retry_later",
            "state = CASE WHEN attempts >= %(max)s THEN 'failed' ELSE 'queued' END,"
            " reason = CASE WHEN attempts >= %(max)s"
            "   THEN 'gave up after ' || attempts || ' attempts: ' || %(reason)s"
            "   ELSE %(reason)s END,"
            " suspect = suspect AND attempts < %(max)s,"
            " not_before = CASE WHEN attempts >= %(max)s THEN not_before"
            "   ELSE %(now)s + %(delay)s END",
            {"max": self.max_attempts, "reason": reason, "delay": float(delay_s)},
        )
        log_retried(log, after, self.max_attempts, delay_s, reason)
        return after

    def release(self, job_id: int, reason: str | None = None) -> Job:
        after = self._finish(
            job_id,
            "release",
            "state = 'queued', attempts = greatest(attempts - 1, 0),"
            " reason = coalesce(%(reason)s, reason)",
            {"reason": reason},
        )
        log.debug("%s: running -> queued (released, attempt not counted)", describe(after))
        return after

    def recover(self) -> int:
        """Re-queue (or fail) the running jobs whose lease ran out; safe at any time."""
        params = {"now": self._clock(), "max": self.max_attempts}

        expired = [row_to_job(r) for r in self._fetch("recover", db.EXPIRE_LEASES, params)]
        self._log_expired(expired)
        return sum(job.state is JobState.QUEUED for job in expired)

    # -- leases -----------------------------------------------------------------------------

    def confirm(self, job_ids: Sequence[int]) -> set[int]:
        if not job_ids:
            return set()
        now = self._clock()
        params = {"ids": list(job_ids), "me": self._me, "now": now, "until": now + self.lease_s}

        held = {int(row[0]) for row in self._fetch("confirm", db.CONFIRM, params)}
        self._lose(set(job_ids) - held)
        return held

    def heartbeat(self) -> None:
        now = self._clock()
        with self._held_lock:
            held = sorted(self._held)
        params = {
            "held": held,
            "me": self._me,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "now": now,
            "until": now + self.lease_s,
            "before": now - FORGET_WORKERS_S,
        }

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.pipeline():
                await conn.execute(db.REGISTER, params)
                await conn.execute(db.RENEW, params)
                await conn.execute(db.FORGET_WORKERS, params)

        self._run("heartbeat", work)

    def workers(self) -> list[WorkerSeen]:
        rows = self._fetch(
            "workers",
            "SELECT w.id, w.host, w.pid, w.started_at, w.heartbeat_at, count(j.id)"
            " FROM ls_autoseg_workers w LEFT JOIN ls_autoseg_jobs j"
            " ON j.owner = w.id AND j.state = 'running'"
            " GROUP BY w.id ORDER BY w.heartbeat_at DESC, w.id",
        )
        return [
            WorkerSeen(str(i), str(h), int(p), float(s), float(b), int(n))
            for i, h, p, s, b, n in rows
        ]

    def subscribe(self, callback: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"the job queue at {self.where} is closed")
        self._callbacks.append(callback)
        if self._listener is None:
            self._listener = self._loop.call(self._start_listener(), CALL_TIMEOUT_S)

    async def _start_listener(self) -> asyncio.Task[None]:
        return asyncio.create_task(
            listen(self._url, db.CHANNEL, self._notify, self.where), name="queue listener"
        )

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("a queue subscriber failed")

    def take_turn(self, name: str, interval_s: float) -> bool:
        checks.delay_s(interval_s)
        params = {"name": name, "now": self._clock(), "gap": interval_s * 0.9}

        return bool(self._fetch("take_turn", db.TAKE_TURN, {**params, "lock": db.TURN_LOCK}))

    # -- reads ------------------------------------------------------------------------------

    def _one(self, action: str, query: str) -> tuple[Any, ...]:
        (row,) = self._fetch(action, query)
        return tuple(row)

    def counts(self) -> dict[JobState, int]:
        rows = self._fetch(
            "counts",
            "SELECT state, count(*) FROM ls_autoseg_jobs GROUP BY state"
            f" UNION ALL SELECT 'inbox', ({db.INBOX_IDS})",
        )
        counted = {str(state): int(n) for state, n in rows}
        result = {state: counted.get(state.value, 0) for state in JobState}
        result[JobState.QUEUED] += counted["inbox"]  # accepted, not expanded yet
        return result

    def pending(self) -> int:
        (n,) = self._one(
            "pending",
            f"SELECT count(*) + ({db.INBOX_IDS}) FROM ls_autoseg_jobs"
            " WHERE state IN ('queued', 'running')",
        )
        return int(n)

    def next_due(self) -> float | None:
        (due,) = self._one(
            "next_due",
            "SELECT least(min(not_before), (SELECT min(received_at) FROM ls_autoseg_inbox))"
            " FROM ls_autoseg_jobs WHERE state = 'queued'",
        )
        return None if due is None else float(due)

    def get(self, project: int, task: int, model_version: str) -> Job | None:
        rows = self._fetch(
            "get",
            f"SELECT {COLUMNS} FROM ls_autoseg_jobs WHERE project = %(p)s"
            " AND task = %(t)s AND model_version = %(v)s",
            {"p": project, "t": task, "v": model_version},
        )
        return row_to_job(rows[0]) if rows else None

    def recent_failures(self, limit: int = 20) -> list[Job]:
        return self._latest("recent_failures", "state = 'failed'", limit)

    def waiting_retries(self, limit: int = 20) -> list[Job]:
        return self._latest(
            "waiting_retries", "state = 'queued' AND attempts > 0 AND reason IS NOT NULL", limit
        )

    def _latest(self, action: str, where: str, limit: int) -> list[Job]:
        """Up to ``limit`` jobs matching ``where`` (a constant of this class), newest first."""
        checks.limit(limit)
        rows = self._fetch(
            action,
            f"SELECT {COLUMNS} FROM ls_autoseg_jobs WHERE {where}"
            " ORDER BY updated_at DESC, id DESC LIMIT %(limit)s",
            {"limit": limit},
        )
        return [row_to_job(row) for row in rows]

    def check_writable(self) -> None:
        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            # A real write, rolled back: the server is up, takes writes, and is not read-only.
            async with conn.transaction(force_rollback=True):
                await conn.execute(
                    "UPDATE ls_autoseg_meta SET value = value WHERE key = 'schema_version'"
                )

        self._run("write check", work)

    def span(self) -> QueueSpan:
        jobs, first_task, last_task, first_created, last_created, last_done, accepted = self._one(
            "span",
            "SELECT count(*), min(task), max(task), min(created_at), max(created_at),"
            " max(updated_at) FILTER (WHERE state = 'done'),"
            f" ({db.INBOX_IDS}) FROM ls_autoseg_jobs",
        )

        def opt(value: Any) -> float | None:
            return None if value is None else float(value)

        return QueueSpan(
            jobs=int(jobs),
            accepted=int(accepted),
            first_task=None if first_task is None else int(first_task),
            last_task=None if last_task is None else int(last_task),
            first_created=opt(first_created),
            last_created=opt(last_created),
            last_done=opt(last_done),
        )

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, leave the worker registry, close the pool; twice is fine."""
        if self._closed:
            return
        self._closed = True
        self._loop.call(self._aclose(), CALL_TIMEOUT_S)
        self._loop.stop()

    async def _aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        pool = self._pool
        if pool is None:
            return
        if not pool.closed:
            try:
                async with pool.connection(timeout=2) as conn:
                    await conn.execute("DELETE FROM ls_autoseg_workers WHERE id = %s", (self._me,))
            except (psycopg.Error, psycopg_pool.PoolTimeout):
                pass  # the server is away: the row ages out of the registry
            await pool.close(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
