"""A queue that cannot be written for a while (another process holds the SQLite file's write
lock, the busy timeout 0) must neither kill the worker nor hide: the supervised loops restart,
``/ready`` says why with a 503, the webhook answers 503 (Label Studio logs it; reconcile covers
it), and once the lock is gone every task gets exactly one correct prediction.

The real ``Service`` runs here (app, lifespan, worker, reconcile loop, SQLite queue); only
Label Studio is ``test_worker_faults``' MockTransport fake.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_app import TestClient  # imported there with Starlette's httpx warning silenced
from test_worker_faults import (
    PROJECT,
    TARGET,
    FakeLabelStudio,
    assert_one_correct_prediction_each,
    fake_client,
    make_worker,
)

from service.config import (
    Config,
    ModelConfig,
    PredictionConfig,
    ProjectConfig,
    ReconcileConfig,
    ServerConfig,
)
from service.errors import RetryableError
from service.intake import WebhookSettings
from service.intake.reconcile import Reconciler
from service.metrics import Metrics
from service.model.torchscript import SegmentationModel
from service.queue import JobState, SQLiteJobQueue
from service.server import Service
from service.worker.supervise import Supervisor

SECRET = "supervise-test-secret"
TASKS = [1, 2, 3, 4, 5, 6]


class Lock:
    """Another process's write transaction on the queue file, held until ``release``."""

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
            self.conn = None


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture
def service(
    tmp_path: Path, db: Path, colour_model: Callable[..., ModelConfig]
) -> Iterator[tuple[Service, FakeLabelStudio]]:
    model_config = colour_model(channels=1)
    config = Config(
        source=tmp_path / "config.yaml",
        model=model_config,
        projects=(ProjectConfig(PROJECT),),
        server=ServerConfig(webhook_secret=SECRET),
        prediction=PredictionConfig(model_version="v1", min_pixels=0, prob_upsample=False),
        state_dir=db.parent,
    )
    fake = FakeLabelStudio(tasks=TASKS)
    client = fake_client(fake.handler, retries=1, backoff_s=0.001)
    queue = SQLiteJobQueue(db, max_attempts=4, busy_timeout_s=0)
    model = SegmentationModel.load(model_config)
    worker = make_worker(
        queue,
        client,
        model,
        prediction=config.prediction,
        retry_base_s=0.01,
        outage_probe_s=0.02,
        idle_poll_s=0.02,
        settle_s=0,
    )
    reconciler = Reconciler(
        client, queue, [PROJECT], "v1", ReconcileConfig(on_startup=False), on_new=worker.wake
    )
    yield (
        Service(
            config,
            queue,
            client,
            model,
            {PROJECT: TARGET},
            worker,
            Metrics(queue),
            reconciler,
            WebhookSettings.from_config(config),
            ready_cache_s=0,
        ),
        fake,
    )
    queue.close()


def webhook(http: TestClient, tasks: list[int]) -> Any:
    body = {
        "action": "TASKS_CREATED",
        "project": {"id": PROJECT},
        "tasks": [{"id": t, "project": PROJECT, "data": {}} for t in tasks],
    }
    return http.post("/webhook", content=json.dumps(body), headers={"X-Webhook-Secret": SECRET})


def wait_for(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_locked_queue_makes_ready_say_why_and_the_worker_goes_on_after_it(
    service: tuple[Service, FakeLabelStudio], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc, fake = service
    svc.queue.enqueue(PROJECT, TASKS[:3], "v1")  # work the worker must claim through the lock
    lock = Lock(db)
    try:
        with TestClient(svc.app()) as http:
            checks: dict[str, str] = {}

            def unready_with_both_reasons() -> bool:
                answer = http.get("/ready")
                checks.update(answer.json()["checks"])
                return answer.status_code == 503 and checks["worker"] != "ok"

            wait_for(unready_with_both_reasons)
            assert checks["queue"].startswith("the job queue cannot be written: "), checks
            assert "database is locked" in checks["queue"]
            assert checks["worker"].startswith("the claim loop failed (job database "), checks
            assert "database is locked" in checks["worker"]
            assert checks["label_studio"] == "ok" and checks["model"] == "ok"
            # The ids cannot be made durable: 503, so Label Studio logs the failed delivery.
            refused = webhook(http, TASKS[3:])
            assert refused.status_code == 503, refused.text
            assert refused.json() == {"error": "job queue unavailable"}
            assert http.get("/health").status_code == 200
            time.sleep(0.3)  # several claim failures: the loop keeps being restarted
            assert not fake.predictions

            lock.release()
            assert webhook(http, TASKS[3:]).json() == {"queued": 3}
            wait_for(lambda: svc.queue.counts()[JobState.DONE] == len(TASKS))
            wait_for(lambda: http.get("/ready").status_code == 200)
    finally:
        lock.release()
    assert_one_correct_prediction_each(fake, TASKS)
    restarts = [r for r in caplog.records if r.getMessage().startswith("the claim loop failed")]
    assert restarts and all(r.levelno == logging.ERROR for r in restarts)


def test_the_supervisor_restarts_a_failing_loop_with_backoff_and_clears_on_progress() -> None:
    calls: list[float] = []
    supervisor = Supervisor(base_s=0.01, max_s=0.04)
    seen: list[str | None] = []

    async def flaky() -> None:
        calls.append(time.monotonic())
        seen.append(supervisor.problem)
        if len(calls) <= 4:
            raise RetryableError(f"database is locked ({len(calls)})")
        supervisor.ok("claim")
        seen.append(supervisor.problem)

    asyncio.run(supervisor.run("claim", flaky))
    assert len(calls) == 5
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.01 and gaps[2] >= 0.04 and gaps[3] >= 0.04, gaps
    assert seen[0] is None
    assert seen[1] == "the claim loop failed (database is locked (1)); restarted with backoff"
    assert seen[-2] == "the claim loop failed (database is locked (4)); restarted with backoff"
    assert seen[-1] is None


def test_a_fatal_error_ends_the_supervised_loop_and_stop_ends_the_backoff() -> None:
    supervisor = Supervisor(base_s=30)

    async def give_up() -> None:
        raise RetryableError("Label Studio unusable for 300 s, giving up")

    async def main() -> None:
        with pytest.raises(RetryableError, match="giving up"):
            await supervisor.run("claim", give_up, fatal=lambda exc: True)
        stop = asyncio.Event()
        runner = asyncio.create_task(supervisor.run("claim", give_up, stop))
        await asyncio.sleep(0.05)
        assert supervisor.problem == (
            "the claim loop failed (Label Studio unusable for 300 s, giving up); "
            "restarting with backoff"
        )
        stop.set()
        await asyncio.wait_for(runner, 1)  # not after the 30 s backoff

    asyncio.run(main())
