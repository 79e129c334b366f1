"""How a held job ends (service/worker/settle.py), against the real SQLite journal: each
outcome's next state, and one settle per job."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.config import WorkerConfig
from service.errors import (
    AuthError,
    ImageError,
    LabelStudioUnavailable,
    NotYetVisible,
    PermanentError,
    RetryableError,
    SkipJob,
)
from service.labelstudio.client import LabelStudioClient
from service.metrics import NoMetrics
from service.queue import Job, JobState, SQLiteJobQueue
from service.worker import settle as settle_module
from service.worker.held import Held
from service.worker.outage import OutageWatch
from service.worker.settle import Settler

PROJECT = 7


@dataclass
class Recorded(NoMetrics):
    finished: list[JobState] = field(default_factory=list)
    retried: int = 0

    def job_finished(self, state: JobState, seconds: float) -> None:
        self.finished.append(state)

    def job_retried(self) -> None:
        self.retried += 1


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteJobQueue]:
    with SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3) as queue:
        yield queue


def settle_all(
    queue: SQLiteJobQueue,
    outcomes: list[BaseException | str],
    *,
    label_studio_down: bool = False,
) -> tuple[list[Job], Recorded, Held]:
    """Claim one job per outcome, settle each with it; return the jobs as the journal has
    them afterwards."""

    def whoami(request: httpx.Request) -> httpx.Response:
        if label_studio_down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(200, json={"id": 1, "email": "ops@example.com"})

    metrics = Recorded()
    held = Held(capacity=len(outcomes))

    async def main() -> list[Job]:
        async with LabelStudioClient(
            "http://ls.test",
            "0123456789abcdef0123456789abcdef01234567",
            transport=httpx.MockTransport(whoami),
            backoff_s=0.001,
        ) as client:
            outage = OutageWatch(client, metrics, probe_s=1)
            settler = Settler(queue, held, outage, metrics, WorkerConfig(retry_base_s=5))
            queue.enqueue(PROJECT, list(range(1, len(outcomes) + 1)), "v1")
            jobs = sorted(queue.claim(len(outcomes)), key=lambda j: j.task)
            for job in jobs:
                assert held.hold(job)
            for job, outcome in zip(jobs, outcomes, strict=True):
                await settler.settle(job, outcome, started=job.created_at, reraise=False)
            return [queue.get(PROJECT, job.task, "v1") for job in jobs]  # type: ignore[misc]

    return asyncio.run(main()), metrics, held


def test_each_outcome_leads_to_its_state(queue: SQLiteJobQueue) -> None:
    after, metrics, held = settle_all(
        queue,
        [
            "prediction 1001",
            SkipJob("annotated"),
            NotYetVisible("task 3 not found yet"),
            LabelStudioUnavailable("HTTP 503"),  # Label Studio answers verify: no outage
            PermanentError("task has no image URL"),
            ImageError("corrupt"),
            RuntimeError("boom"),
            asyncio.CancelledError(),
        ],
    )
    assert [(j.state, j.reason, j.attempts) for j in after] == [
        (JobState.DONE, "prediction 1001", 1),
        (JobState.SKIPPED, "annotated", 1),
        (JobState.QUEUED, "task 3 not found yet", 1),
        (JobState.QUEUED, "HTTP 503", 1),
        (JobState.FAILED, "task has no image URL", 1),
        (JobState.FAILED, "corrupt", 1),
        (JobState.FAILED, "internal error: RuntimeError: boom", 1),
        (JobState.QUEUED, None, 0),  # a cancel gives the job back, the attempt not counted
    ]
    # NotYetVisible backs off from 1 s, other retryable errors from retry_base_s.
    assert after[2].not_before - after[2].updated_at == pytest.approx(1.0, abs=0.05)
    assert after[3].not_before - after[3].updated_at == pytest.approx(5.0, abs=0.05)
    assert metrics.finished == [JobState.DONE, JobState.SKIPPED] + [JobState.FAILED] * 3
    assert metrics.retried == 2
    assert held.busy == 0


def test_an_outage_gives_the_jobs_back_without_spending_attempts(queue: SQLiteJobQueue) -> None:
    after, metrics, held = settle_all(
        queue,
        [LabelStudioUnavailable("timed out"), AuthError("token refused"), ImageError("bad")],
        label_studio_down=True,
    )
    assert [(j.state, j.attempts) for j in after] == [
        (JobState.QUEUED, 0),
        (JobState.QUEUED, 0),
        (JobState.FAILED, 1),  # not Label Studio's fault: fails as ever
    ]
    assert str(after[0].reason).startswith("waiting for Label Studio: timed out")
    assert str(after[1].reason).startswith("waiting for Label Studio: token refused")
    assert metrics.retried == 2 and held.busy == 0


def test_a_job_settles_once_and_a_second_settle_records_nothing(
    queue: SQLiteJobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    def whoami(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": 1, "email": "ops@example.com"})

    metrics = Recorded()
    held = Held(capacity=2)

    async def main() -> None:
        async with LabelStudioClient(
            "http://ls.test",
            "0123456789abcdef0123456789abcdef01234567",
            transport=httpx.MockTransport(whoami),
        ) as client:
            settler = Settler(
                queue, held, OutageWatch(client, metrics, probe_s=1), metrics, WorkerConfig()
            )
            queue.enqueue(PROJECT, [1, 2], "v1")
            jobs = queue.claim(2)
            for job in jobs:
                held.hold(job)
            await settler.settle(jobs[0], "prediction 1001", 0.0)
            with caplog.at_level(logging.ERROR, logger="service.worker.held"):
                await settler.settle(jobs[0], SkipJob("exists"), 0.0)
                await settler.give_back([jobs[0]])

    asyncio.run(main())
    job = queue.get(PROJECT, 1, "v1")
    assert job is not None and (job.state, job.reason) == (JobState.DONE, "prediction 1001")
    assert metrics.finished == [JobState.DONE]
    assert held.busy == 1  # job 2 is still held; job 1 freed its slot once
    assert caplog.text.count("settled again (not held): refused") == 2


def settle_one_done(queue: SQLiteJobQueue, held: Held) -> None:
    """Claim one job of ``queue``, hold it in ``held`` and settle it done, as the worker does."""

    async def main() -> None:
        async with LabelStudioClient(
            "http://ls.test",
            "0123456789abcdef0123456789abcdef01234567",
            transport=httpx.MockTransport(lambda request: httpx.Response(200, json={})),
        ) as client:
            settler = Settler(
                queue,
                held,
                OutageWatch(client, NoMetrics(), probe_s=1),
                NoMetrics(),
                WorkerConfig(),
            )
            queue.enqueue(PROJECT, [1], "v1")
            [job] = queue.claim(1)
            held.hold(job)
            await settler.settle(job, "prediction 1001", 0.0)

    asyncio.run(main())


def test_a_journal_error_is_logged_and_still_frees_the_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenJournal(SQLiteJobQueue):
        def mark_done(self, job_id: int, reason: str | None = None) -> Job:
            raise RuntimeError("disk I/O error (simulated)")

    held = Held(capacity=1)

    with BrokenJournal(tmp_path / "jobs.sqlite3", max_attempts=3) as queue:
        settle_one_done(queue, held)
        assert queue.counts()[JobState.RUNNING] == 1  # the next start re-queues it
    assert held.busy == 0
    assert "recording its outcome failed" in caplog.text


def test_a_journal_write_refused_for_a_moment_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL restarting, SQLite locked past its busy timeout: the outcome is recorded once
    the queue takes writes again, instead of the job staying running (and, on a shared queue,
    its lease lapsing: an attempt spent and a suspect run for nothing)."""
    monkeypatch.setattr(settle_module, "RECORD_RETRY_S", (0.01, 0.01, 0.01))

    class Restarting(SQLiteJobQueue):
        refusals = 2

        def mark_done(self, job_id: int, reason: str | None = None) -> Job:
            if self.refusals:
                self.refusals -= 1
                raise RetryableError("the job queue is unreachable (mark_done): restarting")
            return super().mark_done(job_id, reason)

    held = Held(capacity=1)

    with Restarting(tmp_path / "jobs.sqlite3", max_attempts=3) as queue:
        settle_one_done(queue, held)
        done = queue.get(PROJECT, 1, "v1")
        assert done is not None and (done.state, done.reason) == (JobState.DONE, "prediction 1001")
        assert queue.refusals == 0
    assert held.busy == 0
