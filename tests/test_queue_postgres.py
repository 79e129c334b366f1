"""What only the shared PostgreSQL job queue does, against a real server: leases taken over
from a lost worker, heartbeats and the worker registry, the suspect rule per worker, NOTIFY,
a server stopped and started again, opening errors, claims from several OS processes, and one
reconcile turn across handles. What every queue must do is in ``tests/test_queue_contract.py``,
which runs against PostgreSQL too.

Handles on one database stand for workers on several machines; they share one ``FakeClock``
so that a test can move time past a lease. Tests that stop the server use a cluster of this
module's own (``own_cluster``), so the session's cluster stays up for every other test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from test_queue_contract import LEASE_S, MAX_ATTEMPTS, FakeClock

from service.errors import ConfigError, LeaseLost, RetryableError
from service.local import pgserver
from service.queue import Job, JobState, postgres_io
from service.queue import postgres_schema as schema
from service.queue.postgres import PostgresJobQueue

REPO = Path(__file__).resolve().parent.parent
OpenQueue = Callable[..., PostgresJobQueue]

# How long a NOTIFY may take to reach another handle's callback: well within a second on an
# idle machine; the margin is for a loaded CI box.
NOTIFY_WAIT_S = 2.0
# The role of ``own_cluster`` that logs in with a password (the session's cluster trusts all).
ROLE = "autoseg_worker"
PASSWORD = "Pw-7f3a-not-in-any-message"
# A pool timeout short enough for tests that call a stopped server several times.
AWAY_TIMEOUT_S = 1.0
# How soon a handle takes writes again once the server is back: its pool reconnects with a
# backoff of a few seconds.
RESUME_S = 15.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def open_queue(pg_url: str, clock: FakeClock) -> Iterator[OpenQueue]:
    """Opens another handle (another worker) on the test's database; all closed at the end."""
    with contextlib.ExitStack() as stack:

        def open_(url: str = pg_url, **kwargs: object) -> PostgresJobQueue:
            kwargs.setdefault("max_attempts", MAX_ATTEMPTS)
            kwargs.setdefault("lease_s", LEASE_S)
            kwargs.setdefault("clock", clock)
            return stack.enter_context(PostgresJobQueue(url, **kwargs))  # type: ignore[arg-type]

        yield open_


@pytest.fixture(scope="module")
def own_cluster(
    postgres: pgserver.LocalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pgserver.LocalPostgres]:
    """A cluster to stop and start, where ``ROLE`` must give its password (``postgres`` is
    still trusted, for the tests' own look at the server). Asking for ``postgres`` first
    skips or fails the same way when the server binaries are missing."""
    with pgserver.cluster(tmp_path_factory.mktemp("own-pg")) as server:
        (server.data_dir / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
            encoding="utf-8",
        )
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("SELECT pg_reload_conf()")
        _wait_for_password_auth(server)
        yield server


def _wait_for_password_auth(server: pgserver.LocalPostgres) -> None:
    """The reload is asynchronous: wait until a wrong password is refused."""
    deadline = time.monotonic() + 10
    wrong = f"postgresql://{ROLE}:wrong@127.0.0.1:{server.port}/postgres"
    while time.monotonic() < deadline:
        try:
            psycopg.connect(wrong, connect_timeout=2).close()
        except psycopg.OperationalError:
            return
        time.sleep(0.05)
    raise AssertionError("pg_hba.conf's password rule did not take effect")


@pytest.fixture
def own_db(own_cluster: pgserver.LocalPostgres) -> tuple[str, str]:
    """A fresh database of ``ROLE``'s in ``own_cluster``: (the queue's URL with the password,
    the superuser's URL of the same database, to look at it from outside)."""
    own_cluster.start()  # a no-op unless an earlier test failed while it was stopped
    name = f"own_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(own_cluster.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
    port = own_cluster.port
    return (
        f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{name}",
        f"postgresql://postgres@127.0.0.1:{port}/{name}",
    )


@contextlib.contextmanager
def server_stopped(server: pgserver.LocalPostgres) -> Iterator[None]:
    server.stop()
    try:
        yield
    finally:
        server.start()


def tasks(jobs: list[Job]) -> list[int]:
    return [job.task for job in jobs]


def wait_listening(admin_url: str) -> None:
    """Wait until a session of this database is LISTENing (``subscribe`` starts its listener
    in the background; a NOTIFY sent before that reaches no one)."""
    deadline = time.monotonic() + 10
    with psycopg.connect(admin_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN %%'"
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.02)
    raise AssertionError("no session LISTENs on the queue's database")


def wait_writable(queue: PostgresJobQueue, within_s: float) -> None:
    """Wait until ``queue`` takes writes again, as a paused worker's retries would."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            queue.check_writable()
            return
        except RetryableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def error_texts(exc: BaseException) -> list[str]:
    """The message of an error and of each error it was raised from."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        texts.extend([str(seen), repr(seen)])
        seen = seen.__cause__ or seen.__context__
    return texts


# -- leases: a lost worker's jobs --------------------------------------------------------------


def test_a_lost_workers_jobs_go_to_another_worker_one_at_a_time_as_suspect(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    lost, other = open_queue(), open_queue()
    lost.enqueue(3, [1, 2, 3, 4], "v1")
    held = lost.claim(3)
    assert tasks(held) == [1, 2, 3]
    clock.advance(LEASE_S + 1)  # no heartbeat from ``lost`` for longer than its lease
    taken: list[list[tuple[int, int, bool]]] = []
    while jobs := other.claim(10):
        taken.append([(job.task, job.attempts, job.suspect) for job in jobs])
        # Back after the takeover, the lost worker's heartbeat takes nothing back.
        lost.heartbeat()
        assert lost.confirm([job.id for job in held]) == set()
        for job in jobs:
            other.mark_done(job.id)
    # Each job the lost worker held alone, its crash counted; then the untouched one.
    assert taken == [[(1, 2, True)], [(2, 2, True)], [(3, 2, True)], [(4, 1, False)]]
    assert other.counts()[JobState.DONE] == 4


CONCLUDE: dict[str, Callable[[PostgresJobQueue, int], Job]] = {
    "mark_done": lambda queue, job_id: queue.mark_done(job_id),
    "mark_skipped": lambda queue, job_id: queue.mark_skipped(job_id, "already annotated"),
    "mark_failed": lambda queue, job_id: queue.mark_failed(job_id, "bad image"),
    "retry_later": lambda queue, job_id: queue.retry_later(job_id, "Label Studio 503", 5),
    "release": lambda queue, job_id: queue.release(job_id, "shutting down"),
}


@pytest.mark.parametrize("conclude", sorted(CONCLUDE))
def test_a_worker_back_after_its_lease_ran_out_concludes_nothing(
    open_queue: OpenQueue, clock: FakeClock, conclude: str
) -> None:
    lost, other = open_queue(), open_queue()
    lost.enqueue(3, [1, 2], "v1")
    first, second = lost.claim(2)
    clock.advance(LEASE_S + 1)
    (taken,) = other.claim(10)  # both queued again; the first now runs on ``other``
    assert taken.id == first.id
    requeued = other.get(3, 2, "v1")
    assert requeued is not None and requeued.state is JobState.QUEUED

    for job in (first, second):
        with pytest.raises(LeaseLost, match=f"job {job.id} "):
            CONCLUDE[conclude](lost, job.id)

    # Nothing changed: the first still runs on ``other``, the second waits as it did.
    assert other.get(3, 1, "v1") == taken
    assert other.get(3, 2, "v1") == requeued
    assert other.confirm([first.id]) == {first.id}
    assert other.mark_done(first.id).state is JobState.DONE
    (last,) = other.claim(10)
    assert (last.id, last.attempts, last.suspect) == (second.id, 2, True)


def test_a_job_whose_lease_runs_out_at_max_attempts_fails_as_crashing_the_worker(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    workers = [open_queue() for _ in range(MAX_ATTEMPTS + 1)]
    workers[0].enqueue(3, [1, 2], "v1")
    for attempt, worker in enumerate(workers[:MAX_ATTEMPTS], start=1):
        (job,) = worker.claim(1)  # each worker in turn takes it, and is lost with it
        assert (job.task, job.attempts) == (1, attempt)
        clock.advance(LEASE_S + 1)
    (next_job,) = workers[-1].claim(10)
    assert (next_job.task, next_job.attempts, next_job.suspect) == (2, 1, False)
    failed = workers[-1].get(3, 1, "v1")
    assert failed is not None
    assert (failed.state, failed.attempts, failed.reason, failed.suspect) == (
        JobState.FAILED,
        MAX_ATTEMPTS,
        f"crashed the worker {MAX_ATTEMPTS} times",
        False,
    )
    assert tasks(workers[0].recent_failures()) == [1]


# -- heartbeats and the worker registry --------------------------------------------------------


def test_heartbeats_keep_a_workers_jobs_and_workers_lists_each_handle(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    first, second = open_queue(), open_queue()
    first.enqueue(3, range(1, 6), "v1")
    mine = first.claim(2)
    theirs: list[Job] = []
    for _ in range(4):  # three leases long, each renewed well within it
        first.heartbeat()
        second.heartbeat()
        theirs += second.claim(10)
        clock.advance(LEASE_S * 0.75)
    first.heartbeat()
    clock.advance(1)
    second.heartbeat()
    assert tasks(theirs) == [3, 4, 5]  # nothing of the first worker's
    assert first.confirm([job.id for job in mine]) == {job.id for job in mine}

    seen = first.workers()
    assert [w.id for w in seen] == [second.worker_id, first.worker_id]  # latest heard first
    assert [(w.host, w.pid) for w in seen] == [(socket.gethostname(), os.getpid())] * 2
    assert [(w.heartbeat_at, w.running) for w in seen] == [(clock.now, 3), (clock.now - 1, 2)]
    assert all(w.started_at <= w.heartbeat_at for w in seen)

    first.close()
    assert [w.id for w in second.workers()] == [second.worker_id]


# -- the suspect rule is per worker ------------------------------------------------------------


def test_a_suspect_job_runs_alone_on_its_worker_while_others_go_on(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    lost, b, c = open_queue(), open_queue(), open_queue()
    lost.enqueue(3, [1, 2], "v1")
    lost.claim(2)
    clock.advance(LEASE_S + 1)
    lost.enqueue(3, [3, 4, 5], "v1")  # ordinary jobs, due

    (alone,) = b.claim(10)
    assert (alone.task, alone.suspect) == (1, True)
    assert b.claim(10) == []  # nothing beside its suspect job, though jobs are due
    (next_alone,) = c.claim(10)  # none of c's running: the next suspect job, alone
    assert (next_alone.task, next_alone.suspect) == (2, True)
    assert c.claim(10) == []
    c.mark_done(next_alone.id)
    ordinary = c.claim(10)  # b's suspect job keeps nothing from c
    assert [(job.task, job.suspect) for job in ordinary] == [(3, False), (4, False), (5, False)]
    assert b.claim(10) == []

    b.mark_done(alone.id)
    lost.enqueue(3, [6], "v1")
    assert tasks(b.claim(10)) == [6]


def test_claims_skip_rows_another_transaction_has_locked(
    open_queue: OpenQueue, pg_url: str
) -> None:
    queue = open_queue()
    queue.enqueue(3, range(1, 6), "v1")
    with psycopg.connect(pg_url) as conn:  # a claim of another machine, not committed yet
        conn.execute("SELECT id FROM ls_autoseg_jobs WHERE task IN (1, 2) FOR UPDATE")
        started = time.monotonic()
        assert tasks(queue.claim(10)) == [3, 4, 5]
        assert time.monotonic() - started < 2.0  # skipped, not waited for
        conn.rollback()
    assert tasks(queue.claim(10)) == [1, 2]


# -- NOTIFY wakes the other workers ------------------------------------------------------------


def test_another_handles_new_jobs_and_releases_wake_a_subscriber(
    open_queue: OpenQueue, pg_url: str
) -> None:
    worker, intake = open_queue(), open_queue()
    woke = threading.Event()
    worker.subscribe(woke.set)
    wait_listening(pg_url)

    intake.enqueue(3, [1, 2], "v1")
    assert woke.wait(NOTIFY_WAIT_S), "enqueue of new jobs did not wake the worker"
    woke.clear()
    intake.accept(3, [3, 4], "v1")
    assert woke.wait(NOTIFY_WAIT_S), "accept of new ids did not wake the worker"
    woke.clear()
    (job,) = intake.claim(1)
    intake.release(job.id)
    assert woke.wait(NOTIFY_WAIT_S), "a released job did not wake the worker"


def test_the_listener_reconnects_after_a_server_restart(
    own_cluster: pgserver.LocalPostgres, own_db: tuple[str, str], clock: FakeClock
) -> None:
    url, admin_url = own_db
    with (
        PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS, clock=clock) as worker,
        PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS, clock=clock) as intake,
    ):
        woke = threading.Event()
        worker.subscribe(woke.set)
        wait_listening(admin_url)
        intake.enqueue(3, [1], "v1")
        assert woke.wait(NOTIFY_WAIT_S)
        woke.clear()

        own_cluster.stop()
        own_cluster.start()
        # Back, it wakes the worker once (a NOTIFY may have been missed while it was away) ...
        assert woke.wait(15), "the listener did not reconnect"
        woke.clear()
        wait_listening(admin_url)
        # ... and new work wakes it again.
        intake.enqueue(3, [2], "v1")
        assert woke.wait(NOTIFY_WAIT_S), "no wake-up for new jobs after the restart"
        assert tasks(worker.claim(10)) == [1, 2]


# -- the server away ---------------------------------------------------------------------------


def test_a_server_away_is_retryable_names_no_password_and_loses_nothing(
    own_cluster: pgserver.LocalPostgres,
    own_db: tuple[str, str],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A shorter wait for a pooled connection than the real one, for the four calls below.
    monkeypatch.setattr(postgres_io, "POOL_WAIT_S", AWAY_TIMEOUT_S)
    caplog.set_level(logging.DEBUG, logger="service.queue")
    url, _ = own_db
    with PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS, clock=clock) as queue:
        queue.enqueue(3, range(1, 51), "v1")
        queue.accept(3, list(range(51, 101)), "v1")
        held = queue.claim(2)

        calls: dict[str, Callable[[], object]] = {
            "accept": lambda: queue.accept(3, [101], "v1"),
            "claim": lambda: queue.claim(10),
            "check_writable": queue.check_writable,
            "mark_done": lambda: queue.mark_done(held[0].id),
        }
        with server_stopped(own_cluster):
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(RetryableError) as raised:
                    call()
                assert time.monotonic() - started < AWAY_TIMEOUT_S + 2, name
                texts = error_texts(raised.value)
                assert not [text for text in texts if PASSWORD in text], name
                assert f"{ROLE}@127.0.0.1:{own_cluster.port}" in str(raised.value), name

        # The same handle works again by itself (once its pool has reconnected), and nothing
        # accepted before the stop is lost.
        wait_writable(queue, RESUME_S)
        assert queue.counts()[JobState.QUEUED] == 98
        assert queue.confirm([job.id for job in held]) == {job.id for job in held}
        assert queue.accept(3, [101], "v1") == 1
        everything = held + queue.claim(1000)
        assert sorted(tasks(everything)) == list(range(1, 102))
        for job in everything:
            queue.mark_done(job.id)
        assert queue.counts()[JobState.DONE] == 101
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]


def test_a_call_to_a_server_refusing_connections_fails_within_the_pool_wait(
    own_cluster: pgserver.LocalPostgres, own_db: tuple[str, str], clock: FakeClock
) -> None:
    # As configured: the webhook's 503 and /ready's answer must come while someone waits.
    url, _ = own_db
    with PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS, clock=clock) as queue:
        queue.check_writable()
        with server_stopped(own_cluster):
            started = time.monotonic()
            with pytest.raises(RetryableError):
                queue.accept(3, [1], "v1")
            elapsed = time.monotonic() - started
        wait_writable(queue, RESUME_S)
        assert queue.pending() == 0  # the failed accept left nothing behind
    assert elapsed < postgres_io.POOL_WAIT_S + 2.0


def _terminate_queue_sessions(admin_url: str) -> None:
    """Cut the queue's connections to this database, as a failover does."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (postgres_io.APPLICATION_NAME,),
        )


def test_a_server_turned_read_only_is_a_retryable_error_until_it_takes_writes(
    pg_url: str, postgres: pgserver.LocalPostgres
) -> None:
    name = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    with PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS) as queue:
        queue.enqueue(3, [1, 2], "v1")
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            # What a standby answers: every new session of the database is read-only.
            conn.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
            _terminate_queue_sessions(pg_url)
            try:
                for call in (
                    queue.check_writable,
                    lambda: queue.accept(3, [3], "v1"),
                    lambda: queue.claim(10),
                ):
                    for _ in range(2):  # the cut connection first, then a read-only one
                        with pytest.raises(RetryableError):
                            call()
            finally:
                conn.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
                _terminate_queue_sessions(pg_url)
        wait_writable(queue, RESUME_S)
        assert tasks(queue.claim(10)) == [1, 2]


def test_public_url_hides_the_password_and_options() -> None:
    shown = postgres_io.public_url(f"postgresql://me:{PASSWORD}@db.example:5433/q?sslmode=require")
    assert shown == "postgresql://me@db.example:5433/q"


# -- opening -----------------------------------------------------------------------------------


def test_a_missing_database_is_a_config_error_that_says_so(
    postgres: pgserver.LocalPostgres,
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{postgres.port}/no_such_db_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError, match="no such database"):
        PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS)


def test_a_wrong_password_is_a_config_error_that_names_no_password(
    own_cluster: pgserver.LocalPostgres, own_db: tuple[str, str]
) -> None:
    url, _ = own_db
    wrong = "Wrong-" + PASSWORD  # checking for PASSWORD below finds either
    with pytest.raises(ConfigError, match="refused the login") as raised:
        PostgresJobQueue(url.replace(PASSWORD, wrong), max_attempts=MAX_ATTEMPTS)
    assert not [text for text in error_texts(raised.value) if PASSWORD in text]
    assert f"{ROLE}@127.0.0.1:{own_cluster.port}" in str(raised.value)
    with PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS) as queue:  # the right one works
        assert queue.pending() == 0


def test_handles_opening_a_fresh_database_at_once_create_the_schema_once(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.queue")
    count = 8
    start = threading.Barrier(count)
    opened: list[PostgresJobQueue] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS))
        except BaseException as exc:  # recorded for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == []
        assert len(opened) == count
        opened[0].enqueue(3, [1], "v1")
        assert all(queue.pending() == 1 for queue in opened)
    finally:
        for queue in opened:
            queue.close()
    with psycopg.connect(pg_url) as conn:
        meta = conn.execute("SELECT key, value FROM ls_autoseg_meta").fetchall()
    assert meta == [("schema_version", str(schema.SCHEMA_VERSION))]
    created = [r for r in caplog.records if "schema version" in r.getMessage()]
    assert len(created) == 1


def test_a_database_of_a_newer_schema_is_refused(pg_url: str) -> None:
    PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            "UPDATE ls_autoseg_meta SET value = %s WHERE key = 'schema_version'",
            (str(schema.SCHEMA_VERSION + 1),),
        )
    with pytest.raises(ConfigError, match="newer than this program's"):
        PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS)


# -- several processes, several handles --------------------------------------------------------

CLAIMER = textwrap.dedent(
    """
    import json, sys
    from service.queue.postgres import PostgresJobQueue

    with PostgresJobQueue(sys.argv[1], max_attempts=3, lease_s=600) as queue:
        print("ready", flush=True)
        sys.stdin.readline()  # the go: every process claims at once
        done = []
        while True:
            jobs = queue.claim(int(sys.argv[2]))
            # None, and none pending: all done. None, but some pending: the rest runs on
            # another process or waits in the inbox for a claim to make it jobs.
            if not jobs and not queue.pending():
                break
            for job in jobs:
                queue.mark_done(job.id)
                done.append(job.task)
    print(json.dumps(done), flush=True)
    """
)


def start_python(stack: contextlib.ExitStack, script: str, *args: str) -> subprocess.Popen[str]:
    """``python -c script args`` with pipes to talk to; killed, if still running, and reaped
    when ``stack`` unwinds."""
    proc = stack.enter_context(
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    )
    stack.callback(_kill_if_running, proc)  # runs before the Popen's exit waits for it
    return proc


def _kill_if_running(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()


def test_processes_claiming_together_conclude_every_job_once(pg_url: str) -> None:
    total = 2000
    with PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS) as queue:
        queue.enqueue(3, range(1, 1001), "v1")
        # And webhook bodies, each sent twice, the first overlapping the enqueued tasks: the
        # processes' claims turn them into jobs as they go.
        for first in range(801, total + 1, 100):
            for _ in range(2):
                queue.accept(3, list(range(first, first + 100)), "v1")
    with contextlib.ExitStack() as stack:
        procs = [start_python(stack, CLAIMER, pg_url, "10") for _ in range(4)]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:  # the go to all, before waiting for any
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    claimed = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    assert sorted(task for mine in claimed for task in mine) == list(range(1, total + 1))
    assert all(mine for mine in claimed)  # every process took part
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT state, attempts, count(*) FROM ls_autoseg_jobs GROUP BY state, attempts"
        ).fetchall()
    assert rows == [("done", 1, total)]  # none claimed twice


HOLDER = textwrap.dedent(
    """
    import json, sys
    from service.errors import LeaseLost
    from service.queue.postgres import PostgresJobQueue

    with PostgresJobQueue(sys.argv[1], max_attempts=3, lease_s=float(sys.argv[2])) as queue:
        held = queue.claim(int(sys.argv[3]))
        print(json.dumps([job.task for job in held]), flush=True)
        sys.stdin.readline()  # killed or frozen meanwhile; else told to conclude its jobs
        outcome = {"confirmed": sorted(queue.confirm([job.id for job in held])), "lost": []}
        for job in held:
            try:
                queue.mark_done(job.id)
            except LeaseLost:
                outcome["lost"].append(job.task)
        print(json.dumps(outcome), flush=True)
    """
)
HOLDER_LEASE_S = 1.0


def test_jobs_of_a_killed_and_a_frozen_process_are_taken_over_after_the_lease(
    pg_url: str,
) -> None:
    with contextlib.ExitStack() as stack:
        survivor = stack.enter_context(
            PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS, lease_s=HOLDER_LEASE_S)
        )
        survivor.enqueue(3, [1, 2, 3, 4], "v1")
        holders = []
        for _ in range(2):  # one after the other: the first takes 1 and 2, the second 3 and 4
            proc = start_python(stack, HOLDER, pg_url, str(HOLDER_LEASE_S), "2")
            assert proc.stdout is not None
            holders.append((proc, json.loads(proc.stdout.readline())))
        (killed, killed_tasks), (frozen, frozen_tasks) = holders
        assert (killed_tasks, frozen_tasks) == ([1, 2], [3, 4])
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        frozen.send_signal(signal.SIGSTOP)
        stack.callback(frozen.send_signal, signal.SIGCONT)  # a frozen one cannot be reaped
        survivor.enqueue(3, [5, 6], "v1")

        time.sleep(HOLDER_LEASE_S + 0.3)
        taken: list[list[tuple[int, int, bool]]] = []
        while jobs := survivor.claim(10):
            taken.append([(job.task, job.attempts, job.suspect) for job in jobs])
            for job in jobs:
                survivor.mark_done(job.id)
        assert taken == [
            [(1, 2, True)],
            [(2, 2, True)],
            [(3, 2, True)],
            [(4, 2, True)],
            [(5, 1, False), (6, 1, False)],
        ]

        # Thawed, the frozen one holds nothing and concludes nothing.
        frozen.send_signal(signal.SIGCONT)
        out, _ = frozen.communicate("go\n", timeout=30)
        assert frozen.returncode == 0
        assert json.loads(out.strip().splitlines()[-1]) == {"confirmed": [], "lost": [3, 4]}
        assert survivor.counts()[JobState.DONE] == 6


CLAIM_ON_GO = textwrap.dedent(
    """
    import json, sys
    from service.queue.postgres import PostgresJobQueue

    with PostgresJobQueue(sys.argv[1], max_attempts=3, lease_s=float(sys.argv[2])) as queue:
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps([job.task for job in queue.claim(int(sys.argv[3]))]), flush=True)
        sys.stdin.readline()
    """
)


def test_jobs_a_worker_froze_inside_its_claim_are_claimed_after_the_lease(pg_url: str) -> None:
    # Frozen (SIGSTOP) or cut off while its claim runs, a worker must not leave the jobs
    # locked in a transaction only it could end: every other claim would skip them for good
    # (the kernel still answers keepalives for a stopped process).
    deadline_s = HOLDER_LEASE_S + 5.0  # the takeover target: lease_s plus 5 s
    with contextlib.ExitStack() as stack:
        survivor = stack.enter_context(
            PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS, lease_s=HOLDER_LEASE_S)
        )
        survivor.enqueue(3, [1, 2, 3], "v1")
        proc = start_python(stack, CLAIM_ON_GO, pg_url, str(HOLDER_LEASE_S), "2")
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            # Slows that process's taking of its jobs (only its), so that it can be frozen
            # while its transaction holds them locked.
            conn.execute(
                "CREATE FUNCTION slow_take() RETURNS trigger LANGUAGE plpgsql"
                " AS $$ BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$"
            )
            conn.execute(
                "CREATE TRIGGER slow_take BEFORE UPDATE ON ls_autoseg_jobs FOR EACH ROW"
                f" WHEN (NEW.owner LIKE '%:{proc.pid}:%') EXECUTE FUNCTION slow_take()"
            )
            proc.stdin.write("go\n")
            proc.stdin.flush()
            until_taking = time.monotonic() + 10
            while not conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event = 'PgSleep'"  # in slow_take, its jobs locked
            ).fetchone():
                assert time.monotonic() < until_taking, "the frozen worker's claim never ran"
                time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        stack.callback(proc.send_signal, signal.SIGCONT)  # a frozen one cannot be reaped
        frozen_at = time.monotonic()

        done: list[int] = []
        while len(done) < 3 and time.monotonic() - frozen_at < deadline_s:
            for job in survivor.claim(10):
                survivor.mark_done(job.id)
                done.append(job.task)
            time.sleep(0.1)
        assert sorted(done) == [1, 2, 3], f"taken within {deadline_s:.0f} s: {done}"


def test_handles_asking_for_a_turn_at_the_same_instant_get_exactly_one(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    handles = [open_queue() for _ in range(8)]
    for _ in range(3):  # one turn per interval, each asked for by all at once
        start = threading.Barrier(len(handles))
        answers: list[bool] = []

        def ask(queue: PostgresJobQueue, start: threading.Barrier, answers: list[bool]) -> None:
            start.wait()
            answers.append(queue.take_turn("reconcile", 60))

        threads = [threading.Thread(target=ask, args=(queue, start, answers)) for queue in handles]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(answers) == [False] * 7 + [True]
        assert not any(queue.take_turn("reconcile", 60) for queue in handles)  # taken
        clock.advance(60)


def test_turns_for_different_passes_asked_at_once_are_each_given(
    open_queue: OpenQueue, clock: FakeClock
) -> None:
    # One pass's check must not take another pass's turn away (they share no record).
    handles = [open_queue() for _ in range(8)]
    names = ["reconcile", "another pass"]
    for _ in range(5):
        start = threading.Barrier(len(handles))
        answers: list[tuple[str, bool]] = []

        def ask(
            queue: PostgresJobQueue,
            name: str,
            start: threading.Barrier,
            answers: list[tuple[str, bool]],
        ) -> None:
            start.wait()
            answers.append((name, queue.take_turn(name, 60)))

        threads = [
            threading.Thread(target=ask, args=(queue, names[i % 2], start, answers))
            for i, queue in enumerate(handles)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(name for name, got in answers if got) == sorted(names)
        clock.advance(60)


@pytest.mark.parametrize(
    "url", ["postgresql://me:se%zzcret@127.0.0.1:1/q", "postgresql://me:secret@h/q?foo=1"]
)
def test_a_url_libpq_cannot_read_is_a_config_error_that_names_no_part_of_it(url: str) -> None:
    with pytest.raises(ConfigError, match="not a PostgreSQL URL") as raised:
        PostgresJobQueue(url, max_attempts=MAX_ATTEMPTS)
    assert not [text for text in error_texts(raised.value) if "secret" in text]


def test_pooled_sessions_bound_how_long_a_frozen_client_holds_locks(pg_url: str) -> None:
    # A worker frozen (SIGSTOP) inside a transaction, or with a pipeline sent but not synced,
    # holds its row locks: the server drops an idle transaction, waiters give up on a lock,
    # and a peer that vanished is found by keepalives, each within seconds, not hours.
    with PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS) as queue:
        shown = {
            name: queue._fetch("test", f"SHOW {name}")[0][0]  # a pooled connection's session
            for name in (
                "idle_in_transaction_session_timeout",
                "lock_timeout",
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
            )
        }
    assert shown == {
        "idle_in_transaction_session_timeout": "30s",
        "lock_timeout": "5s",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "2",
    }


def test_opening_makes_a_database_that_lost_a_table_whole(pg_url: str) -> None:
    with PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS) as queue:
        queue.enqueue(3, [1], "v1")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE ls_autoseg_inbox")  # as a database of an earlier build has
    with PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS) as queue:
        queue.accept(3, [2], "v1")
        assert tasks(queue.claim(10)) == [1, 2]
