"""The worker on a shared queue that takes its jobs away: a worker frozen or cut off past its
lease comes back to find another worker holds them. It must not post for them, nor record
their outcome; a post that landed while the job was being taken over is undone when the new
holder posted too. The queue is the real PostgreSQL one (its clock moved by the test, so a
lease runs out on demand), Label Studio the ``FakeLabelStudio`` of test_worker_faults.py
(it steals the jobs at the moment a test picks), the model an exact fake.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from test_queue_contract import FakeClock
from test_worker_faults import (
    PROJECT,
    FakeLabelStudio,
    assert_one_correct_prediction_each,
    fake_client,
    make_worker,
)

from service.config import ModelConfig, PredictionConfig
from service.errors import RetryableError
from service.metrics import NoMetrics
from service.model.torchscript import SegmentationModel
from service.queue import JobState
from service.queue.postgres import PostgresJobQueue
from service.worker.leases import Leases
from service.worker.supervise import Supervisor

LEASE_S = 30.0
VERSION = PredictionConfig().model_version


@dataclass
class Lost(NoMetrics):
    lost: int = 0

    def job_lost(self) -> None:
        self.lost += 1


@dataclass
class StealingLabelStudio(FakeLabelStudio):
    """Calls ``steal`` once, on the first request that ``when`` matches (after answering it
    when ``after`` is set), as if the worker froze there past its lease; answers DELETEs."""

    when: Callable[[httpx.Request], bool] = lambda request: False
    steal: Callable[[httpx.Request], None] = lambda request: None
    after: bool = False
    stolen: bool = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        trigger = not self.stolen and self.when(request)
        if trigger and not self.after:
            self.stolen = True
            self.steal(request)
        response = super().handler(request)
        if trigger and self.after:
            self.stolen = True
            self.steal(request)
        return response


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queues(pg_url: str, clock: FakeClock) -> Iterator[tuple[PostgresJobQueue, PostgresJobQueue]]:
    """The worker's handle, and another worker's (the one that takes the jobs over)."""
    with (
        PostgresJobQueue(pg_url, max_attempts=4, lease_s=LEASE_S, clock=clock) as mine,
        PostgresJobQueue(pg_url, max_attempts=4, lease_s=LEASE_S, clock=clock) as other,
    ):
        yield mine, other


Run = Callable[..., Lost]


@pytest.fixture
def run(
    queues: tuple[PostgresJobQueue, PostgresJobQueue], colour_model: Callable[..., ModelConfig]
) -> Run:
    """Run the worker on ``mine`` until it holds nothing and no job of it is queued."""
    mine, _ = queues
    model = SegmentationModel.load(colour_model(channels=1))

    def go(fake: StealingLabelStudio, **settings: Any) -> Lost:
        """``settings``: WorkerConfig fields beside the test's own."""
        metrics = Lost()

        async def main() -> None:
            client = fake_client(fake.handler, timeout_s=5, retries=1, backoff_s=0.001)
            worker = make_worker(
                mine,  # type: ignore[arg-type]
                client,
                model,
                metrics,
                prediction=PredictionConfig(min_pixels=0, prob_upsample=False),
                idle_poll_s=0.02,
                settle_s=0,
                **settings,
            )
            mine.enqueue(PROJECT, fake.tasks, "v1")
            stop = asyncio.Event()
            runner = asyncio.create_task(worker.run(stop))
            try:
                async with asyncio.timeout(20):
                    while mine.counts()[JobState.QUEUED] or worker.busy or not fake.stolen:
                        assert not runner.done(), runner
                        await asyncio.sleep(0.01)
            finally:
                stop.set()
                await runner
                await client.aclose()

        asyncio.run(main())
        return metrics

    return go


def take_over(
    queues: tuple[PostgresJobQueue, PostgresJobQueue], clock: FakeClock, into: list[int]
) -> Callable[[httpx.Request], None]:
    """The worker stalls past its lease; the other worker's claim takes one of its jobs (a
    lost worker's jobs run alone) and ``into`` collects its id."""
    _, other = queues

    def steal(request: httpx.Request) -> None:
        clock.advance(LEASE_S + 1)
        into.extend(job.id for job in other.claim(10))

    return steal


def test_jobs_taken_over_before_the_post_are_never_posted(
    queues: tuple[PostgresJobQueue, PostgresJobQueue], clock: FakeClock, run: Run
) -> None:
    mine, other = queues
    taken: list[int] = []
    reads = []

    def second_list_read(request: httpx.Request) -> bool:
        # The first reads the group before the downloads, the second re-checks it right
        # before posting: the worker stalls just after that one.
        if request.method == "GET" and request.url.path == "/api/tasks/":
            reads.append(request)
        return len(reads) == 2

    fake = StealingLabelStudio(tasks=[1, 2, 3], when=second_list_read, after=True)
    fake.steal = take_over(queues, clock, taken)
    metrics = run(fake)
    # The other worker took one (a lost worker's jobs run alone); its lease ran out on all
    # three, so the worker dropped all three unposted, then claimed back the two still queued.
    assert metrics.lost == 3
    (held_elsewhere,) = taken
    other_job = other.get(PROJECT, 1, "v1")
    assert other_job is not None and other_job.id == held_elsewhere
    assert other_job.state is JobState.RUNNING  # untouched: the other worker's to conclude
    assert 1 not in fake.predictions  # never posted by a worker that no longer held it
    assert_one_correct_prediction_each(fake, [2, 3])
    assert other.mark_done(held_elsewhere, "by the other worker").state is JobState.DONE
    assert mine.counts()[JobState.DONE] == 3


POST_PATHS = {"off": "/api/predictions/", "on": f"/api/projects/{PROJECT}/import/predictions"}


def posts_prediction(request: httpx.Request, mode: str) -> bool:
    """A post of predictions: one (``off``) or in bulk (``on``)."""
    return request.method == "POST" and request.url.path == POST_PATHS[mode]


def store_as_another_worker(fake: StealingLabelStudio, request: httpx.Request) -> None:
    """What the request carries, stored as another worker's post (ahead of it)."""
    body = json.loads(request.content)
    for item in body if isinstance(body, list) else [body]:
        fake.store({**item, "project": PROJECT})


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_post_that_lands_after_the_new_holders_is_undone(
    queues: tuple[PostgresJobQueue, PostgresJobQueue], clock: FakeClock, run: Run, mode: str
) -> None:
    taken: list[int] = []
    fake = StealingLabelStudio(tasks=[4], when=lambda r: posts_prediction(r, mode))
    steal = take_over(queues, clock, taken)

    def steal_and_post(request: httpx.Request) -> None:
        # The worker froze with its POST on the way; the new holder took the job and posted
        # first, so ours lands second.
        steal(request)
        store_as_another_worker(fake, request)

    fake.steal = steal_and_post
    metrics = run(fake, bulk_predictions=mode)
    assert taken and metrics.lost == 1
    assert len(fake.deleted) == 1
    assert [p["id"] for p in fake.predictions[4]] != fake.deleted
    assert_one_correct_prediction_each(fake, [4])


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_retried_jobs_post_that_lands_after_another_workers_is_undone(
    queues: tuple[PostgresJobQueue, PostgresJobQueue], run: Run, mode: str
) -> None:
    """The other side of the race: the job was tried before (its last worker may have been
    lost with a post in flight), and that post lands just before ours: ours goes, although
    this worker holds the job, so exactly the first one stays."""
    posts = []

    def second_post(request: httpx.Request) -> bool:
        if posts_prediction(request, mode):
            posts.append(request)
        return len(posts) == 2

    fake = StealingLabelStudio(tasks=[6], when=second_post)
    fake.faults[("POST", POST_PATHS[mode])] = [503]  # the first attempt fails: a retry
    fake.steal = lambda request: store_as_another_worker(fake, request)
    # due again at once (the queue's clock does not move here)
    run(fake, retry_base_s=0, bulk_predictions=mode)
    assert len(fake.deleted) == 1
    assert [p["id"] for p in fake.predictions[6]] == [min(fake.deleted) - 1]
    assert_one_correct_prediction_each(fake, [6])


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_post_that_lands_during_a_takeover_stays_when_it_is_the_only_one(
    queues: tuple[PostgresJobQueue, PostgresJobQueue], clock: FakeClock, run: Run, mode: str
) -> None:
    taken: list[int] = []
    fake = StealingLabelStudio(tasks=[5], when=lambda r: posts_prediction(r, mode), after=True)
    fake.steal = take_over(queues, clock, taken)
    metrics = run(fake, bulk_predictions=mode)
    assert taken and metrics.lost == 1
    assert fake.deleted == []  # the new holder's re-check finds it and skips
    assert_one_correct_prediction_each(fake, [5])
    assert all(p["model_version"] == VERSION for p in fake.predictions[5])


def test_leases_are_renewed_every_second_while_the_queue_is_away() -> None:
    """Not the supervisor's growing backoff: a healthy worker whose queue was away for most of
    a lease must renew as soon as the queue is back, or it loses every job it holds."""

    class AwayThenBack:
        shared, lease_s = True, 0.4  # renewals every 0.1 s, retries as often

        def __init__(self) -> None:
            self.calls: list[float] = []

        def heartbeat(self) -> None:
            self.calls.append(time.monotonic())
            if len(self.calls) <= 3:
                raise RetryableError("the job queue is unreachable (heartbeat)")

    queue = AwayThenBack()
    supervisor = Supervisor()

    async def main() -> None:
        leases = Leases(queue, None, VERSION)  # type: ignore[arg-type]
        renewing = asyncio.create_task(leases.renew(supervisor))
        await asyncio.sleep(0.55)
        renewing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await renewing

    asyncio.run(main())
    gaps = [b - a for a, b in itertools.pairwise(queue.calls)]
    assert len(queue.calls) >= 5, queue.calls  # 3 failures, then renewals again
    assert max(gaps) < 0.3, gaps  # no backoff: every retry within the renewal period
    assert supervisor.problem is None
