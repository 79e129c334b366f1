"""The job queue's contract: what every ``JobQueue`` implementation must do, whatever stores it.

Each test runs once per backend of the ``queue_factory`` fixture and goes through the
``JobQueue`` protocol only (no SQL, no file, no implementation attribute), so a new backend
adds one ``params`` entry and an opener and passes the same suite. What only one backend has
(SQLite's schema, WAL, busy timeout, file errors, crashes of real processes) is tested in that
backend's own file, e.g. ``tests/test_queue_sqlite.py``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from service.queue import Job, JobQueue, JobState, QueueSpan, SQLiteJobQueue
from service.queue.postgres import PostgresJobQueue

T0 = 1_700_000_000.0
MAX_ATTEMPTS = 3
# A shared store's lease; tests move the clock past it where a worker is to count as lost
# (a store of one process ignores it: its lost worker is one whose process ended).
LEASE_S = 60.0
RETENTION_DAYS = 0.05  # 72 min: over the pruner's hour, and a live worker heartbeats through


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class QueueFactory(Protocol):
    """Opens a queue on the test's one store; every call opens another handle on it (as
    another process or machine would), so jobs outlive a handle closed. Every backend takes
    the attempt limit, a clock (epoch seconds), so that tests can move time, and the
    retention of done/skipped jobs in days (None: keep them)."""

    def __call__(
        self,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        retention_days: float | None = None,
    ) -> JobQueue: ...


def _sqlite_opener(tmp_path: Path, stack: contextlib.ExitStack) -> QueueFactory:
    path = tmp_path / "state" / "jobs.sqlite3"

    def open_sqlite(
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        retention_days: float | None = None,
    ) -> JobQueue:
        return stack.enter_context(
            SQLiteJobQueue(
                path, max_attempts=max_attempts, clock=clock, retention_days=retention_days
            )
        )

    return open_sqlite


def _postgres_opener(url: str, stack: contextlib.ExitStack) -> QueueFactory:
    def open_postgres(
        *,
        max_attempts: int = MAX_ATTEMPTS,
        clock: Callable[[], float] = time.time,
        retention_days: float | None = None,
    ) -> JobQueue:
        return stack.enter_context(
            PostgresJobQueue(
                url,
                max_attempts=max_attempts,
                clock=clock,
                retention_days=retention_days,
                lease_s=LEASE_S,
            )
        )

    return open_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueFactory]:
    """One store per test, per backend; a backend joins with a param and an opener (which
    closes what it opened when the stack unwinds). PostgreSQL: a database of the test's own
    in the session's throwaway cluster (tests/pg_fixtures.py)."""
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            yield _postgres_opener(request.getfixturevalue("pg_url"), stack)
        else:
            yield _sqlite_opener(tmp_path, stack)


def live_for(queue: JobQueue, clock: FakeClock, seconds: float) -> None:
    """Move the clock ``seconds`` on, heart-beating within the lease as a live worker does."""
    while seconds > 0:
        step = min(seconds, LEASE_S / 2)
        clock.advance(step)
        queue.heartbeat()
        seconds -= step


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(queue_factory: QueueFactory, clock: FakeClock) -> JobQueue:
    return queue_factory(clock=clock)


def claim_tasks(queue: JobQueue, limit: int = 10_000) -> list[tuple[int, int]]:
    """(project, task) of every job claimed now, in the order handed out."""
    return [(job.project, job.task) for job in queue.claim(limit)]


def queue_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("service.queue")]


# -- enqueue: idempotent by (project, task, model_version) ---------------------------------------


def test_the_same_webhook_twice_or_ten_times_queues_each_task_once(queue: JobQueue) -> None:
    assert queue.enqueue(3, [45, 46, 47], "v1") == 3
    for _ in range(9):
        assert queue.enqueue(3, [45, 46, 47], "v1") == 0
    assert queue.counts()[JobState.QUEUED] == 3
    assert claim_tasks(queue) == [(3, 45), (3, 46), (3, 47)]


def test_overlapping_batches_and_repeats_within_a_batch_add_only_new_tasks(
    queue: JobQueue,
) -> None:
    assert queue.enqueue(3, [1, 2, 3, 4], "v1") == 4
    assert queue.enqueue(3, [3, 4, 5, 6], "v1") == 2
    assert queue.enqueue(3, [6, 6, 7, 7, 7], "v1") == 1
    assert [task for _, task in claim_tasks(queue)] == [1, 2, 3, 4, 5, 6, 7]


def test_model_version_and_project_are_part_of_the_job_key(queue: JobQueue) -> None:
    assert queue.enqueue(3, [1, 2], "v1") == 2
    assert queue.enqueue(3, [1, 2], "v2") == 2
    assert queue.enqueue(4, [1, 2], "v1") == 2
    assert queue.enqueue(4, [1, 2], "v2") == 2
    assert queue.enqueue(4, [1, 2], "v2") == 0
    assert queue.pending() == 8
    job = queue.get(3, 1, "v2")
    assert job is not None and (job.project, job.task, job.model_version) == (3, 1, "v2")
    assert len({job.id for job in queue.claim(100)}) == 8


@pytest.mark.parametrize("final", ["done", "skipped", "failed", "running"])
def test_a_task_seen_before_in_any_state_is_not_queued_again(queue: JobQueue, final: str) -> None:
    queue.enqueue(3, [45], "v1")
    (job,) = queue.claim(1)
    if final == "done":
        queue.mark_done(job.id)
    elif final == "skipped":
        queue.mark_skipped(job.id, "already annotated")
    elif final == "failed":
        queue.mark_failed(job.id, "bad image")
    assert queue.enqueue(3, [45], "v1") == 0
    assert queue.accept(3, [45], "v1") == 1
    assert queue.claim(5) == []  # the accepted repeat never becomes a second job
    after = queue.get(3, 45, "v1")
    assert after is not None and after.state == JobState(final) and after.attempts == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None, 2**63])
def test_enqueue_rejects_bad_task_ids_and_writes_nothing(queue: JobQueue, bad: object) -> None:
    with pytest.raises(ValueError, match="task ids"):
        queue.enqueue(3, [1, 2, bad], "v1")  # type: ignore[list-item]
    assert queue.pending() == 0 and queue.get(3, 1, "v1") is None


def test_enqueue_rejects_a_bad_project_or_model_version(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="project"):
        queue.enqueue(0, [1], "v1")
    with pytest.raises(ValueError, match="model_version"):
        queue.enqueue(3, [1], "")
    with pytest.raises(ValueError, match="string"):
        queue.enqueue(3, "12", "v1")  # type: ignore[arg-type]


def test_enqueue_of_nothing_is_a_no_op(queue: JobQueue) -> None:
    assert queue.enqueue(3, [], "v1") == 0
    assert queue.pending() == 0


def test_enqueue_logs_one_summary_line_not_one_per_task(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="service.queue")
    queue.enqueue(3, range(1, 5001), "v1")
    queue.enqueue(3, [1, 5001], "v1")
    messages = queue_messages(caplog)
    assert len(messages) == 2
    assert messages[0].startswith("project 3: 5000 job(s) queued, 0 duplicate(s)")
    assert messages[1].startswith("project 3: 1 job(s) queued, 1 duplicate(s)")


def test_enqueue_of_5000_ids_is_fast(queue: JobQueue) -> None:
    # The webhook answers within Label Studio's 1 s timeout; typically ~20 ms with SQLite.
    # The bound is loose so that a loaded machine does not fail the suite.
    start = time.perf_counter()
    assert queue.enqueue(3, range(1, 5001), "v1") == 5000
    assert time.perf_counter() - start < 2.0
    assert queue.pending() == 5000


# -- durability across handles ----------------------------------------------------------------


def test_enqueued_jobs_are_visible_to_another_handle_when_enqueue_returns(
    queue: JobQueue, queue_factory: QueueFactory
) -> None:
    other = queue_factory()
    queue.enqueue(3, [10, 20], "v1")
    assert other.pending() == 2
    assert [(j.task, j.state, j.attempts) for j in other.claim(5)] == [
        (10, JobState.RUNNING, 1),
        (20, JobState.RUNNING, 1),
    ]


def test_reopening_keeps_the_jobs(queue_factory: QueueFactory) -> None:
    first = queue_factory()
    first.enqueue(3, [1, 2], "v1")
    first.accept(3, [3], "v1")
    first.close()
    second = queue_factory()
    assert second.pending() == 3
    assert second.enqueue(3, [1, 2, 4], "v1") == 1
    assert sorted(task for _, task in claim_tasks(second)) == [1, 2, 3, 4]


# -- accept: durable at once, jobs by the next claim --------------------------------------------


def test_accepted_ids_count_as_queued_and_become_jobs_dated_when_accepted(
    queue: JobQueue, clock: FakeClock
) -> None:
    assert queue.accept(3, [1, 2, 3], "v1") == 3
    assert queue.counts()[JobState.QUEUED] == 3
    assert (queue.pending(), queue.next_due()) == (3, T0)  # due at once
    clock.advance(1)
    assert queue.accept(3, [3, 4], "v1") == 2  # one repeat
    assert queue.accept(5, [1], "v1") == 1  # another project: another job
    queue.enqueue(3, [4], "v1")  # reconcile found it too
    assert queue.accept(3, [], "v1") == 0
    clock.advance(50)
    jobs = {(j.project, j.task): j for j in queue.claim(10)}
    assert sorted(jobs) == [(3, 1), (3, 2), (3, 3), (3, 4), (5, 1)]
    assert jobs[(3, 1)].created_at == T0 and jobs[(5, 1)].created_at == T0 + 1
    assert jobs[(3, 4)].created_at == T0 + 1
    assert queue.counts()[JobState.RUNNING] == 5 and queue.pending() == 5


def test_accept_checks_its_arguments_like_enqueue(queue: JobQueue) -> None:
    for args in [(0, [1], "v1"), (1, [0], "v1"), (1, [1], ""), (1, "12", "v1"), (1, [True], "v1")]:
        with pytest.raises(ValueError):
            queue.accept(*args)  # type: ignore[arg-type]
    assert queue.pending() == 0


# -- claim -------------------------------------------------------------------------------------


def test_claim_takes_the_oldest_jobs_first_up_to_the_limit(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [30, 10, 20], "v1")
    clock.advance(1)
    queue.enqueue(2, [5, 4], "v1")
    first = queue.claim(2)
    assert [(job.project, job.task) for job in first] == [(3, 30), (3, 10)]
    assert all(job.state is JobState.RUNNING and job.attempts == 1 for job in first)
    assert all(job.updated_at == clock.now for job in first)
    assert queue.claim(0) == []
    assert claim_tasks(queue, 100) == [(3, 20), (2, 5), (2, 4)]
    assert queue.claim(100) == []
    assert queue.counts()[JobState.RUNNING] == 5


def test_claim_rejects_a_negative_limit(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="limit"):
        queue.claim(-1)


def test_claim_skips_jobs_that_are_not_due_yet(queue: JobQueue, clock: FakeClock) -> None:
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


def test_every_claim_counts_an_attempt(queue: JobQueue) -> None:
    queue.enqueue(3, [1], "v1")
    attempts = []
    for _ in range(MAX_ATTEMPTS):
        (job,) = queue.claim(1)
        attempts.append(job.attempts)
        if job.attempts < MAX_ATTEMPTS:
            queue.retry_later(job.id, "flaky", 0)
    assert attempts == [1, 2, 3]


def test_claim_logs_each_transition_with_project_and_task(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue.enqueue(3, [45, 46], "v1")
    caplog.set_level(logging.DEBUG, logger="service.queue")
    first, second = queue.claim(2)
    queue.mark_done(first.id)
    assert queue_messages(caplog) == [
        f"job {first.id} project 3 task 45: queued -> running (attempt 1)",
        f"job {second.id} project 3 task 46: queued -> running (attempt 1)",
        f"job {first.id} project 3 task 45: running -> done (attempt 1)",
    ]


# -- outcomes ---------------------------------------------------------------------------------


def test_mark_done_skipped_and_failed_record_state_and_reason(
    queue: JobQueue, clock: FakeClock
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


def test_outcomes_are_accepted_only_for_running_jobs(queue: JobQueue) -> None:
    queue.enqueue(3, [1, 2], "v1")
    (job,) = queue.claim(1)
    queued = queue.get(3, 2, "v1")
    assert queued is not None
    with pytest.raises(ValueError, match="is queued, not running"):
        queue.mark_done(queued.id)
    done = queue.mark_done(job.id)
    with pytest.raises(ValueError, match="is done, not running"):
        queue.mark_failed(job.id, "late")
    with pytest.raises(ValueError, match="is done, not running"):
        queue.retry_later(job.id, "late", 1)
    with pytest.raises(ValueError, match="is done, not running"):
        queue.release(job.id)
    missing = max(job.id, queued.id) + 1000
    with pytest.raises(ValueError, match=f"no job with id {missing}"):
        queue.mark_skipped(missing, "nothing")
    assert queue.get(3, 1, "v1") == done
    assert (done.id, done.state, done.attempts) == (job.id, JobState.DONE, 1)


def test_retry_later_gives_up_at_max_attempts(queue: JobQueue, clock: FakeClock) -> None:
    queue.enqueue(3, [1], "v1")
    results: list[Job] = []
    for _ in range(MAX_ATTEMPTS):
        clock.advance(100)
        (job,) = queue.claim(1)
        results.append(queue.retry_later(job.id, "Label Studio 503", 10))
    assert [job.state for job in results] == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    assert results[0].not_before == T0 + 110 and results[0].reason == "Label Studio 503"
    assert results[-1].reason == "gave up after 3 attempts: Label Studio 503"
    clock.advance(100)
    assert queue.claim(1) == []
    assert queue.recent_failures() == [results[-1]]


def test_waiting_retries_lists_the_jobs_tried_and_queued_again_with_their_reason(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [1, 2, 3, 4, 5], "v1")
    first, second, third, fourth = queue.claim(4)
    assert queue.waiting_retries() == []
    queue.retry_later(first.id, "download of http://img.test/1.png took over 60 s", 30)
    clock.advance(1)
    later = queue.retry_later(second.id, "Label Studio 503", 30)
    queue.mark_failed(third.id, "bad image")  # failed: listed by recent_failures instead
    queue.release(fourth.id)  # given back untried: nothing to wait for
    waiting = queue.waiting_retries()
    assert [(job.task, job.attempts, job.reason) for job in waiting] == [
        (2, 1, "Label Studio 503"),
        (1, 1, "download of http://img.test/1.png took over 60 s"),
    ]
    assert waiting[0] == later
    assert queue.waiting_retries(1) == [later]
    with pytest.raises(ValueError, match="limit"):
        queue.waiting_retries(-1)
    clock.advance(100)
    assert len(queue.claim(5)) == 4  # claimed again: running, not waiting
    assert queue.waiting_retries() == []


def test_check_writable_passes_on_a_usable_store_and_changes_nothing_a_reader_sees(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock)
    queue.enqueue(3, [1, 2], "v1")
    (job,) = queue.claim(1)
    before = (queue.counts(), queue.span(), queue.get(3, 1, "v1"), queue.next_due())
    queue.check_writable()
    queue.check_writable()
    assert (queue.counts(), queue.span(), queue.get(3, 1, "v1"), queue.next_due()) == before
    assert queue.mark_done(job.id).state is JobState.DONE  # writes still go through
    queue.close()
    with pytest.raises(RuntimeError, match="closed"):
        queue.check_writable()


def test_the_attempt_limit_is_the_one_the_queue_is_opened_with(
    queue_factory: QueueFactory,
) -> None:
    queue = queue_factory(max_attempts=1)
    queue.enqueue(3, [1], "v1")
    (job,) = queue.claim(1)
    assert queue.retry_later(job.id, "flaky", 0).state is JobState.FAILED
    with pytest.raises(ValueError, match="max_attempts"):
        queue_factory(max_attempts=0)


def test_retry_later_rejects_a_bad_delay(queue: JobQueue) -> None:
    queue.enqueue(3, [1], "v1")
    (job,) = queue.claim(1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delay_s"):
            queue.retry_later(job.id, "x", bad)
    assert queue.counts()[JobState.RUNNING] == 1


def test_release_gives_a_job_back_without_counting_the_attempt(queue: JobQueue) -> None:
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


# -- recover: what a crash left running --------------------------------------------------------


def test_recover_requeues_jobs_left_running_by_a_dropped_queue(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    crashed = queue_factory(clock=clock)
    crashed.enqueue(3, [1, 2, 3, 4], "v1")
    claimed = crashed.claim(3)
    crashed.close()  # the process goes away without marking anything
    clock.advance(LEASE_S + 1)  # and stays away past its lease (a shared store's wait)

    restarted = queue_factory(clock=clock)
    assert restarted.counts()[JobState.RUNNING] == 3
    assert restarted.recover() == 3
    assert restarted.counts()[JobState.RUNNING] == 0
    assert restarted.recover() == 0
    assert [job.task for job in claimed] == [1, 2, 3]
    again = []
    while jobs := restarted.claim(10):
        again.append([(job.task, job.attempts) for job in jobs])
        for job in jobs:
            restarted.mark_done(job.id)
    # Each job the crash left running alone (any may have caused it), then the rest together.
    assert again == [[(1, 2)], [(2, 2)], [(3, 2)], [(4, 1)]]


def test_a_job_left_running_by_a_crash_runs_alone_until_it_settles(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    crashed = queue_factory(clock=clock)
    crashed.enqueue(3, [1, 2, 3], "v1")
    assert len(crashed.claim(2)) == 2
    crashed.close()
    clock.advance(LEASE_S + 1)
    queue = queue_factory(clock=clock)
    assert queue.recover() == 2
    queue.enqueue(3, [4, 5], "v1")
    (first,) = queue.claim(10)
    assert (first.task, first.attempts, first.suspect) == (1, 2, True)
    assert queue.claim(10) == []  # nothing beside it (what other handles get: backend tests)
    assert queue.mark_done(first.id).suspect is False  # settled normally: cleared
    (second,) = queue.claim(10)
    assert (second.task, second.suspect) == (2, True)
    assert queue.claim(10) == []
    assert queue.mark_failed(second.id, "bad image").suspect is False
    assert [(job.task, job.suspect) for job in queue.claim(10)] == [
        (3, False),
        (4, False),
        (5, False),
    ]


def test_a_suspect_job_keeps_its_mark_until_it_ends_and_waits_for_running_jobs(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [1, 2, 3], "v1")
    queue.claim(1)
    clock.advance(LEASE_S + 1)  # the worker is lost
    assert queue.recover() == 1
    (suspect,) = queue.claim(10)
    # A retry proves nothing about the crash (it may not have reached the model).
    assert queue.retry_later(suspect.id, "Label Studio 503", 10).suspect is True
    assert [job.task for job in queue.claim(1)] == [2]  # the suspect is not due yet
    clock.advance(10)
    assert queue.claim(10) == []  # due, so it waits for job 2, and nothing joins job 2
    running = queue.get(3, 2, "v1")
    assert running is not None and running.state is JobState.RUNNING
    queue.mark_done(running.id)
    (alone,) = queue.claim(10)
    assert (alone.task, alone.suspect) == (1, True)
    assert queue.release(alone.id).suspect is True  # given back unused: still suspect
    (again,) = queue.claim(10)
    assert again.task == 1
    queue.close()


def test_a_suspect_job_that_crashes_the_worker_again_stays_suspect_until_it_fails(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock)
    queue.enqueue(3, [1, 2], "v1")
    queue.claim(2)
    for attempt in range(2, MAX_ATTEMPTS + 1):
        clock.advance(LEASE_S + 1)
        assert queue.recover() >= 1
        (job,) = queue.claim(10)
        assert (job.task, job.attempts, job.suspect) == (1, attempt, True)
    clock.advance(LEASE_S + 1)
    assert queue.recover() == 0  # the third crash fails it; job 2 waits, queued, suspect
    failed = queue.get(3, 1, "v1")
    assert failed is not None and (failed.state, failed.suspect) == (JobState.FAILED, False)
    (innocent,) = queue.claim(10)
    assert (innocent.task, innocent.attempts, innocent.suspect) == (2, 2, True)


def test_recover_fails_only_the_running_jobs_out_of_attempts(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [1], "v1")
    for _ in range(MAX_ATTEMPTS - 1):
        (job,) = queue.claim(1)
        queue.retry_later(job.id, "flaky", 0)
    queue.enqueue(3, [2, 3], "v1")
    assert [(job.task, job.attempts) for job in queue.claim(2)] == [(1, 3), (2, 1)]
    clock.advance(LEASE_S + 1)
    assert queue.recover() == 1
    jobs = [queue.get(3, task, "v1") for task in (1, 2, 3)]
    assert [(j.state, j.attempts, j.reason) for j in jobs if j] == [
        (JobState.FAILED, 3, "crashed the worker 3 times"),
        (JobState.QUEUED, 1, None),
        (JobState.QUEUED, 0, None),
    ]
    assert [job.task for job in queue.recent_failures()] == [1]


# -- holding jobs: leases on a shared store, the process on a store of one ------------------------


def test_confirm_tells_which_jobs_this_handle_still_holds(queue: JobQueue) -> None:
    queue.enqueue(3, [1, 2, 3], "v1")
    done, running = queue.claim(2)
    queue.mark_done(done.id)
    queued = queue.get(3, 3, "v1")
    assert queued is not None
    assert queue.confirm([done.id, running.id, queued.id, running.id + 1000]) == {running.id}
    assert queue.confirm([]) == set()


def test_a_live_worker_keeps_its_jobs_however_long_they_take(
    queue: JobQueue, clock: FakeClock
) -> None:
    queue.enqueue(3, [1, 2], "v1")
    (job,) = queue.claim(1)
    for _ in range(5):  # well past the lease, renewed well within it
        clock.advance(LEASE_S * 0.75)
        queue.heartbeat()
    assert queue.confirm([job.id]) == {job.id}
    assert [other.task for other in queue.claim(10)] == [2]  # nothing was taken back
    assert queue.mark_done(job.id).state is JobState.DONE
    assert all(seen.heartbeat_at <= clock.now for seen in queue.workers())


def test_one_periodic_pass_per_interval_across_handles(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    first, second = queue_factory(clock=clock), queue_factory(clock=clock)
    assert first.take_turn("reconcile", 60) is True
    assert second.take_turn("reconcile", 60) is False
    assert first.take_turn("reconcile", 60) is False
    assert second.take_turn("another pass", 60) is True  # each name has its own turns
    clock.advance(55)  # a timer a little early (within 10% of the interval) still gets it
    assert second.take_turn("reconcile", 60) is True
    assert first.take_turn("reconcile", 60) is False
    with pytest.raises(ValueError, match="delay_s"):
        first.take_turn("reconcile", -1)


# -- concurrency -------------------------------------------------------------------------------


def claim_until_empty(queues: list[JobQueue], batch: int) -> list[list[int]]:
    """One thread per queue handle, started together, claiming until nothing is left."""
    start = threading.Barrier(len(queues))
    claimed: list[list[int]] = [[] for _ in queues]

    def worker(queue: JobQueue, mine: list[int]) -> None:
        start.wait()
        while jobs := queue.claim(batch):
            mine.extend(job.task for job in jobs)

    threads = [
        threading.Thread(target=worker, args=pair) for pair in zip(queues, claimed, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return claimed


def test_threads_claiming_together_never_share_a_job(queue: JobQueue) -> None:
    queue.enqueue(3, range(1, 2001), "v1")
    everything = [task for mine in claim_until_empty([queue] * 4, 7) for task in mine]
    assert sorted(everything) == list(range(1, 2001))
    assert queue.counts()[JobState.RUNNING] == 2000


def test_handles_on_one_store_claiming_together_never_share_a_job(
    queue_factory: QueueFactory,
) -> None:
    queues = [queue_factory() for _ in range(3)]
    queues[0].enqueue(3, range(1, 1001), "v1")
    queues[1].accept(3, list(range(1001, 1501)), "v1")
    claimed = claim_until_empty(queues, 9)
    assert sorted(task for mine in claimed for task in mine) == list(range(1, 1501))
    assert queues[2].counts()[JobState.RUNNING] == 1500


def test_enqueue_and_claim_from_many_threads_lose_and_duplicate_nothing(
    queue: JobQueue,
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


def test_accepts_and_claims_in_parallel_threads_lose_and_repeat_nothing(queue: JobQueue) -> None:
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


# -- reads -------------------------------------------------------------------------------------


def test_counts_pending_next_due_and_recent_failures(queue: JobQueue, clock: FakeClock) -> None:
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
    live_for(queue, clock, 60)  # a live worker: its running job keeps its lease
    assert [job.id for job in queue.claim(5)] == [jobs[4].id]
    assert queue.next_due() is None
    assert queue.pending() == 3


def test_recent_failures_rejects_a_negative_limit(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="limit"):
        queue.recent_failures(-1)


def test_get_returns_the_job_or_none(queue: JobQueue) -> None:
    queue.enqueue(3, [45], "v1")
    job = queue.get(3, 45, "v1")
    assert job is not None
    assert job == Job(
        id=job.id,
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
    assert queue.get(4, 45, "v1") is None


def test_span_reports_jobs_accepted_ids_task_bounds_and_times(
    queue: JobQueue, clock: FakeClock
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
    queue.enqueue(4, [30], "v1")
    queue.accept(3, [40, 40], "v1")
    first, second = queue.claim(2)  # every accepted id is a job after a claim
    clock.advance(5)
    queue.mark_done(first.id)
    clock.advance(5)
    queue.mark_failed(second.id, "later, but not done")
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
    span = queue.span()
    # A store may make accepted ids jobs at once (accepted 0) or later; either way all count.
    assert span.jobs + span.accepted == sum(queue.counts().values()) == 6


# -- lifetime ----------------------------------------------------------------------------------


def test_the_implementation_declares_the_protocol(queue: JobQueue) -> None:
    # Declared, mypy checks its method signatures against JobQueue's.
    assert JobQueue in type(queue).__mro__
    assert JobState.QUEUED == "queued" and f"{JobState.FAILED}" == "failed"


def test_a_closed_queue_refuses_every_call(queue_factory: QueueFactory) -> None:
    with queue_factory() as queue:
        queue.enqueue(1, [1, 2], "v1")
        (job,) = queue.claim(1)
    queue.close()  # closing twice is fine
    calls: list[Callable[[], object]] = [
        lambda: queue.enqueue(1, [3], "v1"),
        lambda: queue.accept(1, [3], "v1"),
        lambda: queue.claim(1),
        lambda: queue.mark_done(job.id),
        lambda: queue.mark_skipped(job.id, "x"),
        lambda: queue.mark_failed(job.id, "x"),
        lambda: queue.retry_later(job.id, "x", 1),
        lambda: queue.release(job.id),
        queue.recover,
        queue.counts,
        queue.pending,
        queue.next_due,
        queue.recent_failures,
        queue.span,
        lambda: queue.get(1, 1, "v1"),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()
    assert queue_factory().counts()[JobState.RUNNING] == 1  # the store itself is untouched


def by_state(**counts: int) -> dict[JobState, int]:
    return {state: counts.get(state.value, 0) for state in JobState}


def test_counts_and_pending_stay_right_through_every_transition(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock, max_attempts=2)
    assert queue.counts() == by_state() and queue.pending() == 0
    assert queue.enqueue(1, [1, 2, 3, 4, 5, 6], "v1") == 6
    queue.enqueue(1, [1, 2], "v1")  # repeats add nothing
    assert queue.counts() == by_state(queued=6) and queue.pending() == 6
    queue.accept(1, [7, 8], "v1")
    assert queue.counts() == by_state(queued=8) and queue.pending() == 8
    jobs = queue.claim(8)
    assert len(jobs) == 8
    assert queue.counts() == by_state(running=8) and queue.pending() == 8
    done, skipped, failed, retried, released, given_up, *_left = jobs
    queue.mark_done(done.id)
    queue.mark_skipped(skipped.id, "has a prediction")
    queue.mark_failed(failed.id, "broken")
    queue.retry_later(retried.id, "busy", 0)
    queue.release(released.id)
    assert queue.counts() == by_state(running=3, queued=2, done=1, skipped=1, failed=1)
    assert queue.pending() == 5
    queue.retry_later(given_up.id, "busy", 0)  # back to queued
    assert queue.counts() == by_state(running=2, queued=3, done=1, skipped=1, failed=1)
    assert len(queue.claim(8)) == 3  # retried, released and given_up
    queue.retry_later(given_up.id, "busy", 0)  # out of attempts: failed
    assert queue.counts() == by_state(running=4, done=1, skipped=1, failed=2)
    # A dropped handle leaves jobs running; another handle's recover re-queues them, and
    # fails retried (its second attempt).
    queue.close()
    clock.advance(LEASE_S + 1)
    other = queue_factory(clock=clock, max_attempts=2)
    assert other.counts() == by_state(running=4, done=1, skipped=1, failed=2)
    assert other.recover() == 3
    assert other.counts() == by_state(queued=3, done=1, skipped=1, failed=3)
    assert other.pending() == 3
    assert [other.get(1, task, "v1") is not None for task in range(1, 9)] == [True] * 8


def test_old_done_and_skipped_jobs_are_pruned_and_nothing_else(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock, retention_days=RETENTION_DAYS)
    queue.enqueue(1, [1, 2, 3, 4, 5], "v1")
    old_done, old_skipped, old_failed, _old_running, old_retry = queue.claim(5)
    queue.mark_done(old_done.id)
    queue.mark_skipped(old_skipped.id, "has a prediction")
    queue.mark_failed(old_failed.id, "broken")
    queue.retry_later(old_retry.id, "busy", 10 * 86400)  # queued, not due for days
    queue.enqueue(1, [6], "v1")  # queued, never claimed
    live_for(queue, clock, 2 * RETENTION_DAYS * 86400)  # the running job's worker is alive
    queue.enqueue(1, [7], "v1")
    # This claim prunes too: the first prune was at open, over an hour ago.
    recent = queue.claim(5)
    assert sorted(job.task for job in recent) == [6, 7]
    for job in recent:
        queue.mark_done(job.id)  # done now: within the retention, however old the job
    queue.claim(5)
    kept = {task for task in range(1, 8) if queue.get(1, task, "v1") is not None}
    assert kept == {3, 4, 5, 6, 7}
    states = {task: queue.get(1, task, "v1").state for task in kept}  # type: ignore[union-attr]
    assert states == {
        3: JobState.FAILED,
        4: JobState.RUNNING,
        5: JobState.QUEUED,
        6: JobState.DONE,
        7: JobState.DONE,
    }
    assert queue.counts() == by_state(queued=1, running=1, done=2, failed=1)
    # A late duplicate webhook for a pruned task queues it again (the worker's pre-read
    # then finds this model_version's prediction and skips it).
    assert queue.enqueue(1, [1, 2], "v1") == 2


def test_without_a_retention_nothing_is_pruned(
    queue_factory: QueueFactory, clock: FakeClock
) -> None:
    queue = queue_factory(clock=clock)
    queue.enqueue(1, [1], "v1")
    (job,) = queue.claim(1)
    queue.mark_done(job.id)
    clock.advance(10_000 * 86400)
    queue.enqueue(1, [2], "v1")
    queue.claim(1)
    assert queue.get(1, 1, "v1") is not None
    assert queue_factory(clock=clock).get(1, 1, "v1") is not None
