"""The intake contract (``service.intake.base.Intake``): what every way in from Label Studio must
do, run against each implementation on the real SQLite queue. The webhook is the one intake
today; Label Studio's model protocol adds one entry to ``INTAKES`` that says how to ask it for
task ids with and without its credential.

The rules: its routes mount beside the probes; a request without the credential is refused
and acts on nothing; task ids asked for are durable in the queue before the answer (a queue
reopened afterwards holds them); a queue that cannot be written is a 503, never a lost 200,
and asks for a reconcile of the project (Label Studio does not ask twice).
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.app import Readiness, create_app
from service.constants import SECRET_HEADER, TASKS_CREATED, WEBHOOK_PATH
from service.intake import Intake, IntakeHooks, WebhookIntake, WebhookSettings
from service.metrics import Metrics
from service.queue import JobQueue, JobState, SQLiteJobQueue

with warnings.catch_warnings():  # see test_app.py: Starlette's TestClient warns about httpx
    warnings.filterwarnings("ignore", r"Using `httpx` with `starlette\.testclient` is deprecated")
    from starlette.testclient import TestClient

PROJECT = 5
MODEL_VERSION = "contract-v1"
SECRET = "contract-secret-4d1f"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class IntakeCase:
    """How to build one intake and ask it for work."""

    build: Callable[[JobQueue, IntakeHooks, Metrics], Intake]
    ask: Callable[[list[int]], Call]  # a request with the credential, for these task ids
    ask_without_credential: Callable[[list[int]], Call]


def _webhook_call(ids: list[int], headers: dict[str, str]) -> Call:
    body = {"action": TASKS_CREATED, "project": {"id": PROJECT}, "tasks": [{"id": i} for i in ids]}
    return Call("POST", WEBHOOK_PATH, headers, json.dumps(body).encode())


def _webhook(queue: JobQueue, hooks: IntakeHooks, metrics: Metrics) -> Intake:
    settings = WebhookSettings(
        secret=SECRET,
        allow_unauthenticated=False,
        max_body_bytes=10_000_000,
        projects=frozenset({PROJECT}),
        model_version=MODEL_VERSION,
    )
    return WebhookIntake(settings, queue, hooks, metrics)


INTAKES = {
    "webhook": IntakeCase(
        build=_webhook,
        ask=lambda ids: _webhook_call(ids, {SECRET_HEADER: SECRET}),
        ask_without_credential=lambda ids: _webhook_call(ids, {}),
    ),
}


class Hooks:
    def __init__(self) -> None:
        self.wakes = 0
        self.reconciles: list[int | None] = []

    def wake(self) -> None:
        self.wakes += 1

    def request_reconcile(self, project: int | None) -> None:
        self.reconciles.append(project)

    async def readiness(self) -> Readiness:
        return Readiness(True, {})


@dataclass
class Running:
    client: TestClient
    queue: SQLiteJobQueue
    hooks: Hooks
    case: IntakeCase
    intake: Intake
    db: Path

    def send(self, call: Call) -> int:
        response = self.client.request(
            call.method, call.path, headers=call.headers, content=call.body
        )
        return response.status_code


@pytest.fixture(params=sorted(INTAKES))
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    db = tmp_path / "jobs.sqlite3"
    queue = SQLiteJobQueue(db, max_attempts=3, busy_timeout_s=0.0)
    hooks, metrics = Hooks(), Metrics(queue)
    case = INTAKES[request.param]
    intake = case.build(queue, hooks, metrics)
    with TestClient(create_app([intake], hooks, metrics)) as client:
        yield Running(client, queue, hooks, case, intake, db)
    queue.close()


def test_its_routes_mount_beside_the_probes(running: Running) -> None:
    paths = [getattr(route, "path", None) for route in running.intake.routes()]
    assert paths and not {"/health", "/ready", "/metrics"} & set(paths)
    assert running.client.get("/health").status_code == 200


def test_a_request_without_the_credential_acts_on_nothing(running: Running) -> None:
    assert running.send(running.case.ask_without_credential([1, 2])) == 401
    assert running.queue.pending() == 0
    assert running.hooks.wakes == 0


def test_task_ids_are_durable_before_the_answer(running: Running) -> None:
    status = running.send(running.case.ask([11, 12, 13]))
    assert 200 <= status < 300
    with SQLiteJobQueue(running.db, max_attempts=3) as reopened:  # another reader of the file
        assert reopened.counts()[JobState.QUEUED] == 3
        assert {job.task for job in reopened.claim(10)} == {11, 12, 13}
    assert running.hooks.wakes >= 1
    assert 200 <= running.send(running.case.ask([11, 12, 13, 14])) < 300  # three again
    with SQLiteJobQueue(running.db, max_attempts=3) as reopened:
        assert [job.task for job in reopened.claim(10)] == [14]  # one job per task, ever
    assert running.hooks.reconciles == []  # a request that names its tasks needs none


def test_a_queue_that_cannot_be_written_is_a_503(running: Running) -> None:
    blocker = sqlite3.connect(running.db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        assert running.send(running.case.ask([21])) == 503
        assert running.hooks.wakes == 0
        # Label Studio will not ask again: a reconcile of the project, retried until the
        # queue takes writes, is what finds the task.
        assert running.hooks.reconciles == [PROJECT]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert running.queue.pending() == 0
    assert 200 <= running.send(running.case.ask([21])) < 300
    assert running.queue.pending() == 1
