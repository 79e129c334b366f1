"""What only the SQLite job queue has: its file, schema, WAL, busy timeout, inbox, and crashes
and claims of real processes on one file. What every queue must do is in
``tests/test_queue_contract.py``, which runs against SQLite too."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.errors import ConfigError, RetryableError
from service.queue import JobState, SQLiteJobQueue
from service.queue.prune import PRUNE_BATCH, PRUNE_BATCHES_PER_CALL
from service.queue.sqlite import INBOX_ROW_IDS
from service.queue.sqlite_schema import SCHEMA_VERSION

MakeQueue = Callable[..., SQLiteJobQueue]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture
def make_queue(db_path: Path) -> Iterator[MakeQueue]:
    with contextlib.ExitStack() as stack:

        def make(**kwargs: object) -> SQLiteJobQueue:
            kwargs.setdefault("max_attempts", 3)
            return stack.enter_context(SQLiteJobQueue(db_path, **kwargs))  # type: ignore[arg-type]

        yield make


@pytest.fixture
def queue(make_queue: MakeQueue) -> SQLiteJobQueue:
    return make_queue()


def all_rows(path: Path) -> list[tuple[int, int, str, str, int]]:
    """Rows read through a fresh connection: what another process would see."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT project, task, model_version, state, attempts FROM jobs ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


# -- children: real processes for crashes and cross-process claiming -----------------------------

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from service.queue import SQLiteJobQueue

    mode, path, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    queue = SQLiteJobQueue(path, max_attempts=3)
    if mode == "claim-and-die":
        jobs = queue.claim(int(arg))
        print(json.dumps([job.id for job in jobs]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "enqueue-and-die":
        queue.enqueue(7, range(1, int(arg) + 1), "v1")
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "accept-and-die":
        queue.accept(7, range(1, int(arg) + 1), "v1")
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "claim-all":
        print("ready", flush=True)
        gate = Path(arg)
        while not gate.exists():
            time.sleep(0.001)
        claimed = []
        while jobs := queue.claim(10):
            claimed.extend(job.id for job in jobs)
            time.sleep(0.001)  # "work": SQLite's busy wait is not fair, one could starve
        print(json.dumps(claimed), flush=True)
    """
)


def run_child(mode: str, path: Path, arg: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(arg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- durability -----------------------------------------------------------------------------


def test_the_database_uses_wal_with_full_sync(queue: SQLiteJobQueue, db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()
    # synchronous is per connection, so only the queue's own connection can tell.
    assert queue._conn.execute("PRAGMA synchronous").fetchone() == (2,)


def test_jobs_survive_a_process_killed_right_after_enqueue_returns(db_path: Path) -> None:
    result = run_child("enqueue-and-die", db_path, 300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    rows = all_rows(db_path)
    assert len(rows) == 300
    assert {row[1] for row in rows} == set(range(1, 301))


# -- crashes -----------------------------------------------------------------------------------


def test_recover_after_a_worker_process_is_killed(make_queue: MakeQueue, db_path: Path) -> None:
    make_queue(max_attempts=3).enqueue(3, [1, 2, 3, 4, 5], "v1")
    result = run_child("claim-and-die", db_path, 2)
    assert result.returncode == -signal.SIGKILL, result.stderr
    claimed = json.loads(result.stdout)
    assert len(claimed) == 2

    restarted = make_queue(max_attempts=3)
    assert restarted.counts()[JobState.RUNNING] == 2
    assert restarted.recover() == 2
    alone = []
    while jobs := restarted.claim(10):
        alone.append([(job.id, job.attempts) for job in jobs])
        for job in jobs:
            restarted.mark_done(job.id)
    # The two the kill left running, each alone, then the other three together.
    assert alone[:2] == [[(claimed[0], 2)], [(claimed[1], 2)]]
    assert [[attempts for _, attempts in group] for group in alone[2:]] == [[1, 1, 1]]


def test_a_job_that_keeps_killing_the_worker_ends_failed(
    make_queue: MakeQueue, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_queue(max_attempts=3).enqueue(3, [45], "v1")
    requeued = []
    for _ in range(3):
        result = run_child("claim-and-die", db_path, 1)
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert len(json.loads(result.stdout)) == 1
        with SQLiteJobQueue(db_path, max_attempts=3) as restarted:
            requeued.append(restarted.recover())
    assert requeued == [1, 1, 0]
    queue = make_queue(max_attempts=3)
    job = queue.get(3, 45, "v1")
    assert job is not None
    assert (job.state, job.attempts, job.reason) == (
        JobState.FAILED,
        3,
        "crashed the worker 3 times",
    )
    assert queue.claim(1) == []
    assert "job 1 project 3 task 45: running -> failed: crashed the worker 3 times" in [
        r.getMessage() for r in caplog.records
    ]


# -- concurrency ---------------------------------------------------------------------------------


def test_processes_claiming_from_one_file_never_share_a_job(
    make_queue: MakeQueue, db_path: Path, tmp_path: Path
) -> None:
    make_queue().enqueue(3, range(1, 2001), "v1")
    gate = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, "claim-all", str(db_path), str(gate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    gate.touch()
    outputs = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    per_child = [json.loads(out) for out, _ in outputs]
    assert all(per_child), "both processes should have claimed some jobs"
    everything = [job_id for ids in per_child for job_id in ids]
    assert len(everything) == 2000
    assert len(set(everything)) == 2000
    assert make_queue().counts()[JobState.RUNNING] == 2000


# -- lifetime and errors ------------------------------------------------------------------------


def test_creates_the_state_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "jobs.sqlite3"
    with SQLiteJobQueue(path, max_attempts=3) as queue:
        queue.enqueue(1, [1], "v1")
    assert all_rows(path) == [(1, 1, "v1", "queued", 0)]


def test_an_unusable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the folder"):
        SQLiteJobQueue(blocker / "jobs.sqlite3", max_attempts=3)
    with pytest.raises(ConfigError, match="cannot be used"):
        SQLiteJobQueue(tmp_path, max_attempts=3)  # a folder, not a file


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    path.write_bytes(b"this is not a database, just some text" * 100)
    with pytest.raises(ConfigError, match="not a database"):
        SQLiteJobQueue(path, max_attempts=3)


def test_a_database_from_a_newer_version_is_a_config_error(db_path: Path) -> None:
    SQLiteJobQueue(db_path, max_attempts=3).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SQLiteJobQueue(db_path, max_attempts=3)


def test_a_database_locked_past_the_busy_timeout_is_retryable(
    make_queue: MakeQueue, db_path: Path
) -> None:
    queue = make_queue(busy_timeout_s=0.05)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(RetryableError, match="busy"):
            queue.enqueue(3, [1], "v1")
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert queue.enqueue(3, [1], "v1") == 1  # the failed write left no transaction open


def test_constructor_rejects_a_bad_busy_timeout_or_attempt_limit(db_path: Path) -> None:
    with pytest.raises(ValueError, match="busy_timeout_s"):
        SQLiteJobQueue(db_path, max_attempts=3, busy_timeout_s=-1)
    with pytest.raises(ValueError, match="max_attempts"):
        SQLiteJobQueue(db_path, max_attempts=True)
    assert not db_path.exists()


# -- the inbox: accept now, expand into jobs later -------------------------------------------


def test_accepted_ids_survive_a_kill_and_become_jobs_on_the_next_claim(db_path: Path) -> None:
    result = run_child("accept-and-die", db_path, 5000)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert all_rows(db_path) == []  # not expanded: still in the inbox
    with SQLiteJobQueue(db_path, max_attempts=3) as queue:
        assert queue.pending() == 5000
        assert queue.counts()[JobState.QUEUED] == 5000
        claimed = queue.claim(10)
        assert [job.task for job in claimed] == list(range(1, 11))
        assert queue.counts()[JobState.QUEUED] == 4990
    rows = all_rows(db_path)
    assert len(rows) == 5000 and {row[1] for row in rows} == set(range(1, 5001))


def test_the_inbox_counts_repeats_until_expand_drops_them(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    queue.accept(3, [1, 2, 3], "v1")
    queue.accept(3, [3, 4], "v1")
    queue.accept(5, [1], "v1")
    queue.enqueue(3, [4], "v1")  # a job already: its accepted copy is a repeat
    assert all_rows(db_path) == [(3, 4, "v1", "queued", 0)]
    assert (queue.pending(), queue.counts()[JobState.QUEUED]) == (7, 7)
    assert (queue.span().jobs, queue.span().accepted) == (1, 6)
    assert queue.expand(max_rows=1) == 3  # the oldest row only: 1, 2, 3
    assert (queue.pending(), queue.span().accepted) == (7, 3)
    assert queue.expand() == 1  # project 5's 1; 3 and 4 are jobs already
    assert queue.expand() == 0
    assert (queue.pending(), queue.span().accepted, len(all_rows(db_path))) == (5, 0, 5)


def inbox_sizes(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT json_array_length(task_ids) FROM inbox ORDER BY id")
        return [size for (size,) in rows.fetchall()]
    finally:
        conn.close()


def test_a_big_body_is_accepted_as_bounded_rows_and_each_id_becomes_one_job(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    n = 3 * INBOX_ROW_IDS + 7
    ids = [*range(1, n + 1), 5, 6]  # repeats inside one body
    assert queue.accept(3, ids, "v1") == n + 2
    assert inbox_sizes(db_path) == [INBOX_ROW_IDS] * 3 + [9]
    assert queue.pending() == n + 2
    assert queue.expand(max_rows=2) == 2 * INBOX_ROW_IDS  # a bounded row per transaction
    assert queue.expand() == n - 2 * INBOX_ROW_IDS
    tasks = [row[1] for row in all_rows(db_path)]
    assert tasks == list(range(1, n + 1))  # each once, in the body's order
    assert queue.pending() == n


def test_a_big_row_written_whole_by_an_older_version_is_split_before_expanding(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    n = 2 * INBOX_ROW_IDS + 1
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "INSERT INTO inbox (project, model_version, task_ids, received_at) VALUES (3, 'v1', ?, 0)",
        (json.dumps(list(range(1, n + 1))),),
    )
    conn.close()
    queue.accept(3, [n + 1], "v1")
    assert queue.expand(max_rows=1) == 0  # split, nothing expanded in that transaction
    assert inbox_sizes(db_path) == [1, INBOX_ROW_IDS, INBOX_ROW_IDS, 1]
    assert queue.expand() == n + 1
    assert sorted(row[1] for row in all_rows(db_path)) == list(range(1, n + 2))


@pytest.mark.slow
def test_accepts_wait_at_most_a_bounded_row_behind_the_expansion_of_a_huge_body(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    # A 15 MB webhook body: expanded in one transaction it held every accept for ~2 s.
    n = 1_000_000
    assert queue.accept(3, range(1, n + 1), "v1") == n
    expanded: list[int] = []
    expander = threading.Thread(target=lambda: expanded.append(queue.expand()))
    waits: list[float] = []
    expander.start()
    while expander.is_alive():
        started = time.perf_counter()
        queue.accept(4, [len(waits) + 1], "v1")
        waits.append(time.perf_counter() - started)
        time.sleep(0.01)
    expander.join()
    assert max(waits) < 0.1, sorted(waits)[-5:]
    assert len(waits) >= 10, "the expansion ended before accepts could be measured"
    queue.expand()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        counted = conn.execute(
            "SELECT project, COUNT(*), COUNT(DISTINCT task), MIN(task), MAX(task) FROM jobs"
            " GROUP BY project ORDER BY project"
        ).fetchall()
    assert counted == [(3, n, n, 1, n), (4, len(waits), len(waits), 1, len(waits))]


def version_1_jobs_table(db_path: Path) -> sqlite3.Connection:
    """A new database file with the jobs table of schema version 1 (and 2), no rows."""
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, project INTEGER NOT NULL, task INTEGER NOT"
        " NULL, model_version TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL"
        " DEFAULT 0, reason TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " not_before REAL NOT NULL)"
    )
    return conn


def test_a_version_1_database_gets_the_inbox(db_path: Path) -> None:
    conn = version_1_jobs_table(db_path)
    conn.execute(
        "INSERT INTO jobs (project, task, model_version, state, created_at, updated_at,"
        " not_before) VALUES (1, 9, 'v1', 'queued', 0, 0, 0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with SQLiteJobQueue(db_path, max_attempts=3) as queue:
        queue.accept(1, [9, 10], "v1")
        assert sorted(job.task for job in queue.claim(5)) == [9, 10]


def test_a_version_2_database_gets_the_suspect_mark(db_path: Path) -> None:
    conn = version_1_jobs_table(db_path)
    conn.execute(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY, project INTEGER NOT NULL, model_version"
        " TEXT NOT NULL, task_ids TEXT NOT NULL, received_at REAL NOT NULL)"
    )
    conn.executemany(
        "INSERT INTO jobs (project, task, model_version, state, attempts, created_at,"
        " updated_at, not_before) VALUES (1, ?, 'v1', ?, ?, 0, 0, 0)",
        [(8, "running", 1), (9, "queued", 0)],
    )
    conn.execute(
        "INSERT INTO inbox (project, model_version, task_ids, received_at)"
        " VALUES (1, 'v1', '[10]', 0)"
    )
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    with SQLiteJobQueue(db_path, max_attempts=3) as queue:
        assert queue.recover() == 1  # the running job of the old version becomes suspect
        (alone,) = queue.claim(5)
        assert (alone.task, alone.suspect) == (8, True)
        queue.mark_done(alone.id)
        assert sorted((job.task, job.suspect) for job in queue.claim(5)) == [
            (9, False),
            (10, False),
        ]
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


def test_a_version_3_database_gets_counters_filled_from_its_jobs(db_path: Path) -> None:
    conn = version_1_jobs_table(db_path)
    conn.execute("ALTER TABLE jobs ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY, project INTEGER NOT NULL, model_version"
        " TEXT NOT NULL, task_ids TEXT NOT NULL, received_at REAL NOT NULL)"
    )
    states = ["queued", "queued", "running", "done", "done", "done", "skipped", "failed"]
    conn.executemany(
        "INSERT INTO jobs (project, task, model_version, state, attempts, created_at,"
        " updated_at, not_before) VALUES (1, ?, 'v1', ?, 1, 0, 0, 0)",
        list(enumerate(states, start=1)),
    )
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with SQLiteJobQueue(db_path, max_attempts=3) as queue:
        assert queue.counts() == {
            JobState.QUEUED: 2,
            JobState.RUNNING: 1,
            JobState.DONE: 3,
            JobState.SKIPPED: 1,
            JobState.FAILED: 1,
        }
        assert queue.pending() == 3
        assert queue.recover() == 1
        (alone,) = queue.claim(5)
        queue.mark_failed(alone.id, "broken")
        queue.enqueue(1, [20, 21], "v1")
        assert queue.counts() == recount(db_path)
        assert queue.counts()[JobState.FAILED] == 2
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def recount(db_path: Path) -> dict[JobState, int]:
    """Jobs per state counted from the jobs table itself, for comparison with counts()."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        rows = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    return {state: rows.get(state.value, 0) for state in JobState}


def test_counts_and_pending_read_no_jobs_row_whatever_the_table_holds(
    make_queue: MakeQueue, db_path: Path
) -> None:
    queue = make_queue()
    queue.enqueue(1, range(1, 2001), "v1")
    queue.accept(1, [5000], "v1")
    statements: list[str] = []
    queue._conn.set_trace_callback(statements.append)  # what counts() and pending() run
    try:
        counted = queue.counts()
        pending = queue.pending()
    finally:
        queue._conn.set_trace_callback(None)
    assert counted[JobState.QUEUED] == 2001 and pending == 2001
    assert statements
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        plans = [
            detail
            for statement in statements
            for *_, detail in conn.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
        ]
    assert plans and not [detail for detail in plans if re.search(r"\bjobs\b", detail)], plans


def old_done_jobs(db_path: Path, tasks: range, at: float) -> None:
    """Done and skipped jobs last changed at ``at``, written straight into the file."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(
            "INSERT INTO jobs (project, task, model_version, state, attempts, created_at,"
            " updated_at, not_before) SELECT 1, value, 'v1',"
            " CASE value % 2 WHEN 0 THEN 'done' ELSE 'skipped' END, 1, ?, ?, ?"
            " FROM json_each(?)",
            (at, at, at, json.dumps(list(tasks))),
        )


def test_pruning_runs_in_bounded_batches_at_open_and_then_hourly_from_claim(
    make_queue: MakeQueue, db_path: Path
) -> None:
    make_queue().close()  # creates the file
    per_call = PRUNE_BATCH * PRUNE_BATCHES_PER_CALL
    old_done_jobs(db_path, range(1, per_call + 501), at=0.0)
    now = [100 * 86400.0]
    queue = make_queue(retention_days=30, clock=lambda: now[0])
    left = sum(queue.counts().values())
    assert left == 500  # the open pruned one call's worth, no more
    queue.claim(1)  # more were left: the next claim goes on at once
    assert sum(queue.counts().values()) == 0 == sum(recount(db_path).values())
    old_done_jobs(db_path, range(20_001, 20_011), at=0.0)
    now[0] += 3000
    queue.claim(1)
    assert sum(queue.counts().values()) == 10  # pruned less than an hour ago: not yet
    now[0] += 700
    queue.claim(1)
    assert sum(queue.counts().values()) == 0


def test_retention_days_must_be_positive(db_path: Path) -> None:
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="retention_days"):
            SQLiteJobQueue(db_path, max_attempts=3, retention_days=bad)
