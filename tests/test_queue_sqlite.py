"""The durable job queue, against real SQLite files (and real processes where it matters)."""

from __future__ import annotations

import dataclasses
import json
import logging
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
from service.queue import SCHEMA_VERSION, Job, JobQueue, JobState, QueueSpan, SQLiteJobQueue

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeQueue = Callable[..., SQLiteJobQueue]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture
def make_queue(db_path: Path) -> Iterator[MakeQueue]:
    opened: list[SQLiteJobQueue] = []

    def make(**kwargs: object) -> SQLiteJobQueue:
        kwargs.setdefault("max_attempts", 3)
        queue = SQLiteJobQueue(db_path, **kwargs)  # type: ignore[arg-type]
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(make_queue: MakeQueue, clock: FakeClock) -> SQLiteJobQueue:
    return make_queue(clock=clock, max_attempts=3)


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


# -- enqueue --------------------------------------------------------------------------------


def test_the_same_webhook_twice_or_ten_times_queues_each_task_once(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    assert queue.enqueue(3, [45, 46, 47], "v1") == 3
    assert queue.enqueue(3, [45, 46, 47], "v1") == 0
    for _ in range(8):
        assert queue.enqueue(3, [45, 46, 47], "v1") == 0
    assert [row[1] for row in all_rows(db_path)] == [45, 46, 47]
    assert queue.counts()[JobState.QUEUED] == 3


def test_overlapping_batches_and_repeats_within_a_batch_add_only_new_tasks(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    assert queue.enqueue(3, [1, 2, 3, 4], "v1") == 4
    assert queue.enqueue(3, [3, 4, 5, 6], "v1") == 2
    assert queue.enqueue(3, [6, 6, 7, 7, 7], "v1") == 1
    assert [row[1] for row in all_rows(db_path)] == [1, 2, 3, 4, 5, 6, 7]


def test_model_version_and_project_are_part_of_the_job_key(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    assert queue.enqueue(3, [1, 2], "v1") == 2
    assert queue.enqueue(3, [1, 2], "v2") == 2
    assert queue.enqueue(4, [1, 2], "v1") == 2
    assert queue.enqueue(4, [1, 2], "v2") == 2
    assert queue.enqueue(4, [1, 2], "v2") == 0
    assert len(all_rows(db_path)) == 8
    job = queue.get(3, 1, "v2")
    assert job is not None and (job.project, job.task, job.model_version) == (3, 1, "v2")


@pytest.mark.parametrize("final", ["done", "skipped", "failed", "running"])
def test_a_task_seen_before_in_any_state_is_not_queued_again(
    queue: SQLiteJobQueue, final: str
) -> None:
    queue.enqueue(3, [45], "v1")
    (job,) = queue.claim(1)
    if final == "done":
        queue.mark_done(job.id)
    elif final == "skipped":
        queue.mark_skipped(job.id, "already annotated")
    elif final == "failed":
        queue.mark_failed(job.id, "bad image")
    assert queue.enqueue(3, [45], "v1") == 0
    after = queue.get(3, 45, "v1")
    assert after is not None and after.state == JobState(final) and after.attempts == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None, 2**63])
def test_enqueue_rejects_bad_task_ids_and_writes_nothing(
    queue: SQLiteJobQueue, db_path: Path, bad: object
) -> None:
    with pytest.raises(ValueError, match="task ids"):
        queue.enqueue(3, [1, 2, bad], "v1")  # type: ignore[list-item]
    assert all_rows(db_path) == []


def test_enqueue_rejects_a_bad_project_or_model_version(queue: SQLiteJobQueue) -> None:
    with pytest.raises(ValueError, match="project"):
        queue.enqueue(0, [1], "v1")
    with pytest.raises(ValueError, match="model_version"):
        queue.enqueue(3, [1], "")
    with pytest.raises(ValueError, match="string"):
        queue.enqueue(3, "12", "v1")  # type: ignore[arg-type]


def test_enqueue_of_nothing_is_a_no_op(queue: SQLiteJobQueue) -> None:
    assert queue.enqueue(3, [], "v1") == 0
    assert queue.pending() == 0


def test_enqueue_logs_one_summary_line_not_one_per_task(
    queue: SQLiteJobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.queue")
    queue.enqueue(3, range(1, 5001), "v1")
    queue.enqueue(3, [1, 5001], "v1")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("service.queue")]
    assert len(messages) == 2
    assert messages[0].startswith("project 3: 5000 job(s) queued, 0 duplicate(s)")
    assert messages[1].startswith("project 3: 1 job(s) queued, 1 duplicate(s)")


def test_enqueue_of_5000_ids_is_fast(queue: SQLiteJobQueue) -> None:
    # The webhook answers within Label Studio's 1 s timeout; typically ~20 ms here. The bound
    # is loose so that a loaded machine does not fail the suite.
    start = time.perf_counter()
    assert queue.enqueue(3, range(1, 5001), "v1") == 5000
    assert time.perf_counter() - start < 2.0
    assert queue.pending() == 5000


# -- durability -----------------------------------------------------------------------------


def test_enqueued_jobs_are_visible_to_a_fresh_connection_when_enqueue_returns(
    queue: SQLiteJobQueue, db_path: Path
) -> None:
    queue.enqueue(3, [10, 20], "v1")
    assert all_rows(db_path) == [(3, 10, "v1", "queued", 0), (3, 20, "v1", "queued", 0)]


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


def test_reopening_keeps_the_jobs(make_queue: MakeQueue, db_path: Path) -> None:
    first = make_queue()
    first.enqueue(3, [1, 2], "v1")
    first.close()
    second = make_queue()
    assert second.pending() == 2
    assert second.enqueue(3, [1, 2, 3], "v1") == 1


# -- claim ------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_jobs_first_up_to_the_limit(
    queue: SQLiteJobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [30, 10, 20], "v1")
    clock.advance(1)
    queue.enqueue(2, [5, 4], "v1")
    first = queue.claim(2)
    assert [(job.project, job.task) for job in first] == [(3, 30), (3, 10)]
    assert all(job.state is JobState.RUNNING and job.attempts == 1 for job in first)
    assert all(job.updated_at == clock.now for job in first)
    assert queue.claim(0) == []
    rest = queue.claim(100)
    assert [(job.project, job.task) for job in rest] == [(3, 20), (2, 5), (2, 4)]
    assert queue.claim(100) == []
    assert queue.counts()[JobState.RUNNING] == 5


def test_claim_rejects_a_negative_limit(queue: SQLiteJobQueue) -> None:
    with pytest.raises(ValueError, match="limit"):
        queue.claim(-1)


def test_claim_skips_jobs_that_are_not_due_yet(queue: SQLiteJobQueue, clock: FakeClock) -> None:
    queue.enqueue(3, [1], "v1")
    (first,) = queue.claim(1)
    queue.retry_later(first.id, "Label Studio 503", 30)
    assert queue.next_due() == T0 + 30
    clock.advance(29.5)
    assert queue.claim(5) == []
    queue.enqueue(3, [2], "v1")  # newer, but due now: it overtakes the delayed job
    assert [job.task for job in queue.claim(5)] == [2]
    clock.advance(0.5)
    (again,) = queue.claim(5)
    assert (again.id, again.attempts, again.reason) == (first.id, 2, "Label Studio 503")


def test_every_claim_counts_an_attempt(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, [1], "v1")
    attempts = []
    for _ in range(3):
        (job,) = queue.claim(1)
        attempts.append(job.attempts)
        if job.attempts < 3:
            queue.retry_later(job.id, "flaky", 0)
    assert attempts == [1, 2, 3]


def test_claim_logs_each_transition_with_project_and_task(
    queue: SQLiteJobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue.enqueue(3, [45, 46], "v1")
    caplog.set_level(logging.DEBUG, logger="service.queue")
    first, second = queue.claim(2)
    queue.mark_done(first.id)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("service.queue")]
    assert messages == [
        f"job {first.id} project 3 task 45: queued -> running (attempt 1)",
        f"job {second.id} project 3 task 46: queued -> running (attempt 1)",
        f"job {first.id} project 3 task 45: running -> done (attempt 1)",
    ]


# -- outcomes --------------------------------------------------------------------------------


def test_mark_done_skipped_and_failed_record_state_and_reason(
    queue: SQLiteJobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [1, 2, 3, 4], "v1")
    a, b, c, d = queue.claim(4)
    clock.advance(5)
    done = queue.mark_done(a.id)
    assert (done.state, done.reason, done.updated_at) == (JobState.DONE, None, T0 + 5)
    assert queue.mark_done(b.id, "2 regions").reason == "2 regions"
    skipped = queue.mark_skipped(c.id, "already has a prediction")
    assert (skipped.state, skipped.reason) == (JobState.SKIPPED, "already has a prediction")
    failed = queue.mark_failed(d.id, "corrupt image")
    assert (failed.state, failed.reason, failed.attempts) == (JobState.FAILED, "corrupt image", 1)
    assert queue.get(3, 4, "v1") == failed


def test_outcomes_are_accepted_only_for_running_jobs(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, [1, 2], "v1")
    (job,) = queue.claim(1)
    queued = queue.get(3, 2, "v1")
    assert queued is not None
    with pytest.raises(ValueError, match="is queued, not running"):
        queue.mark_done(queued.id)
    queue.mark_done(job.id)
    with pytest.raises(ValueError, match="is done, not running"):
        queue.mark_failed(job.id, "late")
    with pytest.raises(ValueError, match="is done, not running"):
        queue.retry_later(job.id, "late", 1)
    with pytest.raises(ValueError, match="is done, not running"):
        queue.release(job.id)
    with pytest.raises(ValueError, match="no job with id 999"):
        queue.mark_skipped(999, "nothing")
    assert queue.get(3, 1, "v1") == dataclasses.replace(job, state=JobState.DONE)


def test_retry_later_gives_up_at_max_attempts(queue: SQLiteJobQueue, clock: FakeClock) -> None:
    queue.enqueue(3, [1], "v1")
    results: list[Job] = []
    for _ in range(3):
        clock.advance(100)
        (job,) = queue.claim(1)
        results.append(queue.retry_later(job.id, "Label Studio 503", 10))
    assert [job.state for job in results] == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    assert results[0].not_before == T0 + 110 and results[0].reason == "Label Studio 503"
    assert results[-1].reason == "gave up after 3 attempts: Label Studio 503"
    clock.advance(100)
    assert queue.claim(1) == []
    assert queue.recent_failures() == [results[-1]]


def test_retry_later_rejects_a_bad_delay(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, [1], "v1")
    (job,) = queue.claim(1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delay_s"):
            queue.retry_later(job.id, "x", bad)
    assert queue.counts()[JobState.RUNNING] == 1


def test_release_gives_a_job_back_without_counting_the_attempt(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, [1, 2], "v1")
    first, second = queue.claim(2)
    released = queue.release(second.id)
    assert (released.state, released.attempts) == (JobState.QUEUED, 0)
    (again,) = queue.claim(5)
    assert again.id == second.id and again.attempts == 1
    # A job already retried once keeps that attempt when released.
    queue.retry_later(first.id, "flaky", 0)
    (retried,) = queue.claim(1)
    assert retried.attempts == 2
    assert queue.release(retried.id).attempts == 1
    # An outage gives the job back with the reason it waits for, still not counted.
    (waiting,) = queue.claim(1)
    released = queue.release(waiting.id, "waiting: Label Studio unreachable")
    assert (released.reason, released.attempts) == ("waiting: Label Studio unreachable", 1)


# -- crashes -----------------------------------------------------------------------------------


def test_recover_requeues_jobs_left_running_by_a_dropped_queue(
    make_queue: MakeQueue, clock: FakeClock
) -> None:
    crashed = make_queue(clock=clock)
    crashed.enqueue(3, [1, 2, 3, 4], "v1")
    claimed = crashed.claim(3)
    crashed.close()  # the process goes away without marking anything

    restarted = make_queue(clock=clock)
    assert restarted.counts()[JobState.RUNNING] == 3
    assert restarted.recover() == 3
    assert restarted.counts()[JobState.RUNNING] == 0
    assert restarted.recover() == 0
    assert [job.task for job in claimed] == [1, 2, 3]
    again = restarted.claim(10)
    assert [(job.task, job.attempts) for job in again] == [(1, 2), (2, 2), (3, 2), (4, 1)]


def test_recover_after_a_worker_process_is_killed(make_queue: MakeQueue, db_path: Path) -> None:
    make_queue(max_attempts=3).enqueue(3, [1, 2, 3, 4, 5], "v1")
    result = run_child("claim-and-die", db_path, 2)
    assert result.returncode == -signal.SIGKILL, result.stderr
    claimed = json.loads(result.stdout)
    assert len(claimed) == 2

    restarted = make_queue(max_attempts=3)
    assert restarted.counts()[JobState.RUNNING] == 2
    assert restarted.recover() == 2
    jobs = restarted.claim(10)
    assert [job.id for job in jobs][:2] == claimed
    assert [job.attempts for job in jobs] == [2, 2, 1, 1, 1]


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


def test_recover_fails_only_the_running_jobs_out_of_attempts(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, [1], "v1")
    for _ in range(2):
        (job,) = queue.claim(1)
        queue.retry_later(job.id, "flaky", 0)
    queue.enqueue(3, [2, 3], "v1")
    assert [(job.task, job.attempts) for job in queue.claim(2)] == [(1, 3), (2, 1)]
    assert queue.recover() == 1
    jobs = [queue.get(3, task, "v1") for task in (1, 2, 3)]
    assert [(j.state, j.attempts, j.reason) for j in jobs if j] == [
        (JobState.FAILED, 3, "crashed the worker 3 times"),
        (JobState.QUEUED, 1, None),
        (JobState.QUEUED, 0, None),
    ]


# -- concurrency ---------------------------------------------------------------------------------


def test_threads_claiming_together_never_share_a_job(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, range(1, 2001), "v1")
    start = threading.Barrier(4)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def worker(mine: list[int]) -> None:
        start.wait()
        while jobs := queue.claim(7):
            mine.extend(job.task for job in jobs)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = [task for mine in claimed for task in mine]
    assert len(everything) == 2000
    assert set(everything) == set(range(1, 2001))
    assert queue.counts()[JobState.RUNNING] == 2000


def test_enqueue_and_claim_from_many_threads_lose_and_duplicate_nothing(
    queue: SQLiteJobQueue,
) -> None:
    done = threading.Event()
    claimed: list[list[int]] = [[] for _ in range(3)]

    def webhook() -> None:
        for batch in range(40):  # overlapping batches, as repeated webhooks would send
            queue.enqueue(3, range(batch * 50 + 1, batch * 50 + 101), "v1")
        done.set()

    def worker(mine: list[int]) -> None:
        while True:
            finished = done.is_set()
            jobs = queue.claim(10)
            mine.extend(job.task for job in jobs)
            if not jobs and finished:
                return

    threads = [threading.Thread(target=webhook)]
    threads += [threading.Thread(target=worker, args=(mine,)) for mine in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = sorted(task for mine in claimed for task in mine)
    assert everything == list(range(1, 2051))


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


# -- reads --------------------------------------------------------------------------------------


def test_counts_pending_next_due_and_recent_failures(
    queue: SQLiteJobQueue, clock: FakeClock
) -> None:
    assert queue.counts() == dict.fromkeys(JobState, 0)
    assert list(queue.counts()) == list(JobState)
    assert (queue.pending(), queue.next_due(), queue.recent_failures()) == (0, None, [])

    queue.enqueue(3, range(1, 8), "v1")
    jobs = queue.claim(6)
    queue.mark_done(jobs[0].id)
    queue.mark_skipped(jobs[1].id, "has a prediction")
    clock.advance(1)
    old = queue.mark_failed(jobs[2].id, "first")
    clock.advance(1)
    new = queue.mark_failed(jobs[3].id, "second")
    queue.retry_later(jobs[4].id, "503", 60)
    # running: jobs[5]; queued: task 7 (due now) and jobs[4] (due in 60 s)
    assert queue.counts() == {
        JobState.QUEUED: 2,
        JobState.RUNNING: 1,
        JobState.DONE: 1,
        JobState.SKIPPED: 1,
        JobState.FAILED: 2,
    }
    assert queue.pending() == 3
    assert queue.next_due() == T0
    assert queue.recent_failures() == [new, old]
    assert queue.recent_failures(limit=1) == [new]

    assert [job.task for job in queue.claim(5)] == [7]  # the delayed job is not due
    assert queue.next_due() == T0 + 2 + 60
    clock.advance(60)
    assert [job.id for job in queue.claim(5)] == [jobs[4].id]
    assert queue.next_due() is None
    assert queue.pending() == 3


def test_get_returns_the_job_or_none(queue: SQLiteJobQueue) -> None:
    queue.enqueue(3, [45], "v1")
    job = queue.get(3, 45, "v1")
    assert job == Job(
        id=1,
        project=3,
        task=45,
        model_version="v1",
        state=JobState.QUEUED,
        attempts=0,
        reason=None,
        created_at=T0,
        updated_at=T0,
        not_before=T0,
    )
    assert queue.get(3, 46, "v1") is None
    assert queue.get(3, 45, "v2") is None


def test_the_sqlite_queue_fits_the_interface(queue: SQLiteJobQueue) -> None:
    interface: JobQueue = queue
    assert JobQueue in type(interface).__mro__
    assert JobState.QUEUED == "queued" and f"{JobState.FAILED}" == "failed"


# -- lifetime and errors ------------------------------------------------------------------------


def test_creates_the_state_folder_and_closes_as_a_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "jobs.sqlite3"
    with SQLiteJobQueue(path, max_attempts=3) as queue:
        queue.enqueue(1, [1], "v1")
    assert path.exists()
    with pytest.raises(RuntimeError, match="closed"):
        queue.pending()
    queue.close()  # closing twice is fine


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


def test_constructor_rejects_bad_settings(db_path: Path) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        SQLiteJobQueue(db_path, max_attempts=0)
    with pytest.raises(ValueError, match="busy_timeout_s"):
        SQLiteJobQueue(db_path, max_attempts=3, busy_timeout_s=-1)


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


def test_expand_drops_repeats_and_dates_jobs_when_accepted(make_queue: MakeQueue) -> None:
    now = [1000.0]
    queue = make_queue(clock=lambda: now[0])
    assert queue.accept(3, [1, 2, 3], "v1") == 3
    now[0] = 1001.0
    assert queue.accept(3, [3, 4], "v1") == 2
    assert queue.accept(5, [1], "v1") == 1  # another project: another job
    queue.enqueue(3, [4], "v1")  # already queued directly (reconcile)
    assert queue.accept(3, [], "v1") == 0
    assert queue.next_due() == 1000.0  # the oldest accepted id is due
    assert queue.pending() == 3 + 2 + 1 + 1
    now[0] = 1050.0
    assert queue.expand(max_rows=1) == 3  # the oldest row: 1, 2, 3
    assert queue.pending() == 3 + 2 + 1 + 1
    assert queue.expand() == 1  # project 5's 1; 3 and 4 were there
    assert queue.expand() == 0
    assert queue.pending() == 5
    jobs = {(j.project, j.task): j for j in queue.claim(10)}
    assert sorted(jobs) == [(3, 1), (3, 2), (3, 3), (3, 4), (5, 1)]
    assert jobs[(3, 1)].created_at == 1000.0 and jobs[(5, 1)].created_at == 1001.0
    assert jobs[(3, 4)].created_at == 1001.0  # enqueued before its accepted copy expanded


def test_accept_checks_its_arguments_like_enqueue(queue: SQLiteJobQueue) -> None:
    for args in [(0, [1], "v1"), (1, [0], "v1"), (1, [1], ""), (1, "12", "v1"), (1, [True], "v1")]:
        with pytest.raises(ValueError):
            queue.accept(*args)  # type: ignore[arg-type]
    assert queue.pending() == 0


def test_accepts_and_claims_in_parallel_threads_lose_and_repeat_nothing(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    claimed: list[int] = []
    done = threading.Event()

    def accept(start: int) -> None:
        for first in range(start, start + 2000, 200):
            queue.accept(1, list(range(first, first + 200)), "v1")
            queue.accept(1, list(range(first, first + 100)), "v1")  # a repeat

    def claim() -> None:
        while not done.is_set() or queue.counts()[JobState.QUEUED]:
            claimed.extend(job.task for job in queue.claim(50))

    threads = [threading.Thread(target=accept, args=(s,)) for s in (1, 2001, 4001)]
    claimer = threading.Thread(target=claim)
    claimer.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    claimer.join(timeout=60)
    assert sorted(claimed) == list(range(1, 6001))


def test_a_version_1_database_gets_the_inbox(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, project INTEGER NOT NULL, task INTEGER NOT"
        " NULL, model_version TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL"
        " DEFAULT 0, reason TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " not_before REAL NOT NULL)"
    )
    conn.execute(
        "INSERT INTO jobs (project, task, model_version, state, created_at, updated_at,"
        " not_before) VALUES (1, 9, 'v1', 'queued', 0, 0, 0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with SQLiteJobQueue(db_path, max_attempts=3) as queue:
        queue.accept(1, [9, 10], "v1")
        assert sorted(job.task for job in queue.claim(5)) == [9, 10]


def test_span_reports_jobs_accepted_ids_task_bounds_and_times(
    queue: SQLiteJobQueue, clock: FakeClock
) -> None:
    assert queue.span() == QueueSpan(
        jobs=0,
        accepted=0,
        first_task=None,
        last_task=None,
        first_created=None,
        last_created=None,
        last_done=None,
    )
    queue.enqueue(3, [20, 10], "v1")
    clock.advance(5)
    queue.enqueue(3, [30], "v1")
    queue.accept(3, [40, 40], "v1")
    first, _ = queue.claim(2)  # expands the inbox first: task 40 becomes a job now
    clock.advance(5)
    queue.mark_done(first.id)
    assert queue.span() == QueueSpan(
        jobs=4,
        accepted=0,
        first_task=10,
        last_task=40,
        first_created=T0,
        last_created=T0 + 5,
        last_done=T0 + 10,
    )
    queue.accept(3, [50, 60], "v1")
    assert queue.span().accepted == 2
    assert queue.span().jobs + queue.span().accepted == sum(queue.counts().values())
