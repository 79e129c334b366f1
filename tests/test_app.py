"""The ASGI app: webhook, health, readiness, metrics; against a real SQLite job queue.

The only fake is the service side (``FakeHooks``: it records what the app asked for).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from service.app import Readiness, create_app
from service.config import Config, ServerConfig
from service.errors import ConfigError
from service.intake.webhook import (
    PARSE_IN_THREAD_BYTES,
    WebhookEvent,
    WebhookIntake,
    WebhookSettings,
    decode_event,
)
from service.metrics import Metrics
from service.queue import JobQueue, JobState, SQLiteJobQueue

# Starlette 1.10 wants httpx2 for its TestClient and warns (an error under our pytest
# settings) at import when it finds only httpx; the client works the same with either.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"Using `httpx` with `starlette\.testclient` is deprecated")
    from starlette.testclient import TestClient

SECRET = "hunter2-Zq8vX-webhook-secret"
AUTH = {"X-Webhook-Secret": SECRET}
PROJECT = 3
OTHER_PROJECT = 4
MODEL_VERSION = "seg-v7"
MAX_ATTEMPTS = 3  # the queue needs one; no webhook test retries a job
# What Label Studio puts in a payload that must never show up in a log or a response.
PROJECT_TOKEN = "ls-project-token-Yy61"
TASK_PASSWORD = "task-data-password-Pp02"
IMAGE_URL = "/data/upload/3/e48e4582-secret-name.jpg"


def webhook_body(
    task_ids: tuple[int, ...] | None = (1, 2, 3),
    project: int | None = PROJECT,
    action: str = "TASKS_CREATED",
) -> dict[str, Any]:
    """A body shaped like Label Studio's, secrets included."""
    body: dict[str, Any] = {"action": action}
    if task_ids is not None:
        body["tasks"] = [
            {"id": task_id, "data": {"image": IMAGE_URL}, "meta": {}, "project": project}
            for task_id in task_ids
        ]
    if project is not None:
        body["project"] = {
            "id": project,
            "title": "Cells",
            "token": PROJECT_TOKEN,
            "task_data_login": "alice",
            "task_data_password": TASK_PASSWORD,
            "label_config": "<View>...</View>",
        }
    return body


class FakeHooks:
    """Records what the app asks of the service; readiness is whatever the test sets."""

    def __init__(self) -> None:
        self.wakes = 0
        self.reconciles: list[int | None] = []
        self.state = Readiness(True, {"model": "ok", "label_studio": "ok", "token": "ok"})
        self.fail_readiness = False

    def wake(self) -> None:
        self.wakes += 1

    def request_reconcile(self, project: int | None) -> None:
        self.reconciles.append(project)

    async def readiness(self) -> Readiness:
        if self.fail_readiness:
            raise RuntimeError("boom")
        return self.state


@dataclass
class Service:
    client: TestClient
    queue: SQLiteJobQueue
    hooks: FakeHooks
    metrics: Metrics
    db_path: Path
    settings: WebhookSettings
    responses: list[str] = field(default_factory=list)

    def post(self, body: object, headers: Mapping[str, str | bytes] | None = None) -> Any:
        response = self.client.post(
            "/webhook", content=json.dumps(body), headers=AUTH if headers is None else headers
        )
        self.responses.append(response.text)
        return response

    def queued(self) -> int:
        return self.queue.counts()[JobState.QUEUED]

    def assert_alive(self) -> None:
        assert self.client.get("/health").json() == {"status": "alive"}
        assert self.client.get("/ready").status_code == 200


MakeService = Callable[..., Service]


def make_app(
    settings: WebhookSettings,
    queue: JobQueue,
    hooks: FakeHooks,
    metrics: Metrics,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """The app as the service builds it: the webhook intake plus the probes."""
    webhook = WebhookIntake(settings, queue, hooks, metrics)
    return create_app([webhook], hooks, metrics, lifespan=lifespan)


def settings(**overrides: Any) -> WebhookSettings:
    base = WebhookSettings(
        secret=SECRET,
        allow_unauthenticated=False,
        max_body_bytes=10_000_000,
        projects=frozenset({PROJECT, OTHER_PROJECT}),
        model_version=MODEL_VERSION,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture
def make_service(db_path: Path) -> Iterator[MakeService]:
    opened: list[tuple[TestClient, SQLiteJobQueue]] = []

    def make(queue_kwargs: dict[str, Any] | None = None, **overrides: Any) -> Service:
        queue = SQLiteJobQueue(db_path, max_attempts=MAX_ATTEMPTS, **(queue_kwargs or {}))
        hooks = FakeHooks()
        metrics = Metrics(queue)
        config = settings(**overrides)
        client = TestClient(make_app(config, queue, hooks, metrics))
        client.__enter__()
        opened.append((client, queue))
        return Service(client, queue, hooks, metrics, db_path, config)

    yield make
    for client, queue in opened:
        client.__exit__(None, None, None)
        queue.close()


@pytest.fixture
def service(make_service: MakeService) -> Service:
    return make_service()


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Webhook-Secret": ""},
        {"X-Webhook-Secret": "wrong"},
        {"X-Webhook-Secret": SECRET[:-1]},
        {"X-Webhook-Secret": SECRET + "x"},
        {"X-Webhook-Secret": SECRET.upper()},
        {"Authorization": f"Bearer {SECRET}"},
    ],
    ids=["missing", "empty", "wrong", "prefix", "longer", "case", "other-header"],
)
def test_missing_or_wrong_secret_is_401_and_queues_nothing(
    service: Service, headers: dict[str, str]
) -> None:
    response = service.post(webhook_body(), headers=headers)
    assert response.status_code == 401
    assert set(response.json()) == {"error"}
    assert service.queued() == 0
    assert service.hooks.wakes == 0
    service.assert_alive()


def test_secret_header_name_is_case_insensitive(service: Service) -> None:
    response = service.post(webhook_body(), headers={"x-webhook-secret": SECRET})
    assert response.status_code == 200


def test_non_ascii_secret(make_service: MakeService) -> None:
    # Raw ASGI: TestClient re-encodes header values as UTF-8, which would hide the point.
    svc = make_service(secret="pässwort")
    body = json.dumps(webhook_body()).encode()

    def receive() -> Callable[[], Any]:
        async def once() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        return once

    assert _call_asgi(svc, [], receive(), secret="pässwort".encode()) == 200
    assert _call_asgi(svc, [], receive(), secret="pässwort".encode("latin-1")) == 401
    assert svc.queued() == 3


def test_app_refuses_to_start_without_a_secret(db_path: Path) -> None:
    with SQLiteJobQueue(db_path, max_attempts=MAX_ATTEMPTS) as queue:
        for secret in (None, ""):
            with pytest.raises(ConfigError, match="allow_unauthenticated: true"):
                make_app(settings(secret=secret), queue, FakeHooks(), Metrics())
            with pytest.raises(ConfigError, match="webhook_secret is not set"):
                settings(secret=secret).check()


def test_allow_unauthenticated_without_secret_accepts_any_request(
    make_service: MakeService,
) -> None:
    svc = make_service(secret=None, allow_unauthenticated=True)
    assert svc.post(webhook_body(), headers={}).status_code == 200
    assert svc.post(webhook_body((9,)), headers={"X-Webhook-Secret": "x"}).status_code == 200
    assert svc.queued() == 4


def test_a_secret_is_checked_even_when_unauthenticated_is_allowed(
    make_service: MakeService,
) -> None:
    svc = make_service(allow_unauthenticated=True)
    assert svc.post(webhook_body(), headers={}).status_code == 401
    assert svc.post(webhook_body()).status_code == 200


def test_settings_from_config(repo_config: Config) -> None:
    # The shipped config reads the secret from ${LS_AUTOSEG_WEBHOOK_SECRET}, unset here.
    with pytest.raises(ConfigError, match="LS_AUTOSEG_WEBHOOK_SECRET"):
        WebhookSettings.from_config(repo_config)
    open_config = dataclasses.replace(
        repo_config, server=ServerConfig(webhook_secret=None, allow_unauthenticated=True)
    )
    assert WebhookSettings.from_config(open_config).secret is None
    config = dataclasses.replace(
        repo_config, server=ServerConfig(webhook_secret="s", max_body_bytes=1234)
    )
    got = WebhookSettings.from_config(config)
    assert got.secret == "s"
    assert got.max_body_bytes == 1234
    assert got.projects == frozenset(p.id for p in repo_config.projects)
    assert got.model_version == repo_config.prediction.model_version


# --------------------------------------------------------------------------- queueing


def test_tasks_created_queues_durably_and_wakes_the_worker(service: Service) -> None:
    response = service.post(webhook_body((11, 12, 13)))
    assert response.status_code == 200
    assert response.json() == {"queued": 3}
    assert service.hooks.wakes == 1
    # A second connection on the same file sees the jobs: they were committed before the answer
    # (in the inbox; the claim of a worker, or expand, makes them jobs).
    with SQLiteJobQueue(service.db_path, max_attempts=MAX_ATTEMPTS) as reopened:
        assert reopened.counts()[JobState.QUEUED] == 3
        assert reopened.expand() == 3
        for task in (11, 12, 13):
            job = reopened.get(PROJECT, task, MODEL_VERSION)
            assert job is not None
            assert job.state is JobState.QUEUED


def test_repeated_delivery_queues_each_task_once(service: Service) -> None:
    answers = [service.post(webhook_body((1, 2, 3))).json() for _ in range(10)]
    assert answers == [{"queued": 3}] * 10
    assert service.queue.expand() == 3
    assert service.queued() == 3


def test_overlapping_webhooks_and_other_projects(service: Service) -> None:
    assert service.post(webhook_body((1, 2, 3))).json() == {"queued": 3}
    assert service.post(webhook_body((3, 4))).json() == {"queued": 2}
    # Same task id in another project is another job.
    assert service.post(webhook_body((1,), project=OTHER_PROJECT)).json() == {"queued": 1}
    assert service.queue.expand() == 5
    assert service.queued() == 5
    jobs = [service.queue.get(p, t, MODEL_VERSION) for p, t in [(PROJECT, 3), (OTHER_PROJECT, 1)]]
    assert all(job is not None and job.state is JobState.QUEUED for job in jobs)


def test_empty_task_list_is_accepted(service: Service) -> None:
    assert service.post(webhook_body(())).json() == {"queued": 0}
    assert service.hooks.wakes == 0


def test_five_thousand_tasks_in_one_webhook(service: Service) -> None:
    ids = tuple(range(100_001, 105_001))
    body = webhook_body(ids)
    assert len(json.dumps(body)) > PARSE_IN_THREAD_BYTES  # takes the parse-in-a-thread path
    response = service.post(body)
    assert response.status_code == 200
    assert response.json() == {"queued": 5000}
    with SQLiteJobQueue(service.db_path, max_attempts=MAX_ATTEMPTS) as reopened:
        assert reopened.expand() == 5000
        assert reopened.counts()[JobState.QUEUED] == 5000
        assert reopened.get(PROJECT, 100_001, MODEL_VERSION) is not None
        assert reopened.get(PROJECT, 105_000, MODEL_VERSION) is not None
    assert service.post(body).json() == {"queued": 5000}
    assert service.queue.expand() == 0  # all repeats
    service.assert_alive()


def test_queue_unavailable_is_503_and_the_service_recovers(make_service: MakeService) -> None:
    svc = make_service(queue_kwargs={"busy_timeout_s": 0.0})
    blocker = sqlite3.connect(svc.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        response = svc.post(webhook_body())
        assert response.status_code == 503
        assert response.json() == {"error": "job queue unavailable"}
        assert svc.hooks.wakes == 0
        assert svc.client.get("/health").status_code == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert svc.post(webhook_body()).json() == {"queued": 3}


# --------------------------------------------------------------------------- bad requests

BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "not valid JSON"),
    ("truncated", b'{"action": "TASKS_CREATED", "tasks": [', "not valid JSON"),
    ("not-utf8", b"\xff\xfe\xfa{}", "not valid JSON"),
    ("nested", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("array", b"[1, 2]", "JSON object"),
    ("string", b'"TASKS_CREATED"', "JSON object"),
    ("null", b"null", "JSON object"),
    ("no-action", b"{}", "action"),
    ("action-int", b'{"action": 5}', "action"),
    ("tasks-object", b'{"action": "TASKS_CREATED", "tasks": {"id": 1}}', "tasks must be a list"),
    ("task-not-object", b'{"action": "TASKS_CREATED", "tasks": [1]}', "tasks[0] must be"),
    ("task-no-id", b'{"action": "TASKS_CREATED", "tasks": [{"data": {}}]}', "tasks[0].id"),
    ("task-id-str", b'{"action": "TASKS_CREATED", "tasks": [{"id": "7"}]}', "tasks[0].id"),
    ("task-id-zero", b'{"action": "TASKS_CREATED", "tasks": [{"id": 0}]}', "tasks[0].id"),
    ("task-id-neg", b'{"action": "TASKS_CREATED", "tasks": [{"id": -1}]}', "tasks[0].id"),
    ("task-id-bool", b'{"action": "TASKS_CREATED", "tasks": [{"id": true}]}', "tasks[0].id"),
    ("task-id-float", b'{"action": "TASKS_CREATED", "tasks": [{"id": 1.0}]}', "tasks[0].id"),
    ("task-id-huge", b'{"action": "TASKS_CREATED", "tasks": [{"id": 9223372036854775808}]}', "id"),
    (
        "second-task-bad",
        b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1}, {"id": null}]}',
        "tasks[1].id",
    ),
    ("tasks-no-project", b'{"action": "TASKS_CREATED", "tasks": [{"id": 1}]}', "project"),
    ("project-int", b'{"action": "TASKS_CREATED", "project": 3}', "project must be an object"),
    ("project-no-id", b'{"action": "TASKS_CREATED", "project": {}}', "project.id"),
    ("project-id-str", b'{"action": "TASKS_CREATED", "project": {"id": "3"}}', "project.id"),
]


@pytest.mark.parametrize(
    ("body", "reason"), [(b, r) for _, b, r in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES]
)
def test_malformed_webhook_is_400_with_a_short_reason(
    service: Service, body: bytes, reason: str
) -> None:
    response = service.client.post("/webhook", content=body, headers=AUTH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert reason in error
    assert len(error) < 80
    assert service.queued() == 0
    assert service.hooks.wakes == 0
    assert service.hooks.reconciles == []
    service.assert_alive()


# Refused with the whole message: the place in the body and what it must be, never a value.
# Fields are judged in a fixed order (the action, then project, then tasks), whatever order
# the body writes them in, and a body that is not JSON is refused as such first.
REFUSALS: dict[bytes, str] = {
    b"5": "body must be a JSON object",
    b'{"action": "", "project": {"id": 3}}': "action must be a non-empty string",
    b'{"project": 3, "action": 5}': "action must be a non-empty string",
    b'{"action": "TASKS_CREATED", "project": null}': "project must be an object",
    b'{"action": "TASKS_CREATED", "tasks": [1], "project": 3}': "project must be an object",
    b'{"action": "TASKS_CREATED", "project": {"id": 0}}': "project.id must be a positive integer",
    b'{"action": "TASKS_CREATED", "tasks": null}': "tasks must be a list",
    b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1}, {"id": 2}, {"id": 3},'
    b" [4]]}": "tasks[3] must be an object",
    b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1}, {"id": 2}, {"id": 3},'
    b' {"id": true}]}': "tasks[3].id must be a positive integer",
    b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": NaN}]}': (
        "tasks[0].id must be a positive integer"
    ),
    b'{"action": "TASKS_CREATED", "tasks": []}': "tasks came without project.id",
    b'{"action": 5, "tasks": [': "body is not valid JSON",
    b'{"action": "X", "tasks": [{"id": 1}]} x': "body is not valid JSON",
    b'{"action": "X", "d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "body is nested too deeply",
}


@pytest.mark.parametrize(("body", "message"), REFUSALS.items(), ids=list(REFUSALS.values()))
def test_a_refusal_names_the_place_and_what_it_must_be(
    service: Service, body: bytes, message: str
) -> None:
    response = service.client.post("/webhook", content=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json() == {"error": message}
    assert service.queued() == 0


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Nested just under Python's recursion limit: json.loads and msgspec then run out of stack
# inside the server's own frames, and the RecursionError must be a 400, never a 500.
DEEP_BODIES: dict[str, bytes] = {
    "body": _nested(990),
    "action": b'{"action": ' + _nested(990) + b"}",
    "project": b'{"action": "TASKS_CREATED", "project": ' + _nested(990) + b"}",
    "tasks": b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": ' + _nested(990) + b"}",
    "task-data-bad-id": b'{"action": "TASKS_CREATED", "project": {"id": 3},'
    b' "tasks": [{"id": "\\ud800", "data": ' + _nested(990) + b"}]}",
    "other-action": b'{"action": "X", "d": ' + _nested(990) + b"}",
}


@pytest.mark.parametrize("depth", [985, 990, 995, 1000, 5000])
@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=list(DEEP_BODIES))
def test_a_deeply_nested_body_is_400_or_ignored_never_500(
    service: Service, body: bytes, depth: int
) -> None:
    body = body.replace(_nested(990), _nested(depth))
    response = service.client.post("/webhook", content=body, headers=AUTH)
    if body.startswith(b'{"action": "X"') and response.status_code == 200:
        assert response.json() == {"ignored": "X"}  # msgspec skipped the nesting unread
    else:
        assert response.status_code == 400, response.text
    assert service.queued() == 0
    service.assert_alive()


def test_a_bad_request_does_not_echo_the_body(service: Service) -> None:
    body = b'{"action": "TASKS_CREATED", "tasks": [{"id": "' + PROJECT_TOKEN.encode() + b'"}'
    for content in (body, body + b"]}"):
        response = service.client.post("/webhook", content=content, headers=AUTH)
        assert response.status_code == 400
        assert PROJECT_TOKEN not in response.text


# --------------------------------------------------------------------------- size limit


def test_body_over_the_limit_by_content_length_is_413(make_service: MakeService) -> None:
    svc = make_service(max_body_bytes=1000)
    content = json.dumps(webhook_body(tuple(range(1, 200)))).encode()
    assert len(content) > 1000
    response = svc.client.post("/webhook", content=content, headers=AUTH)
    assert response.status_code == 413
    assert "1000 bytes" in response.json()["error"]
    assert svc.queued() == 0
    svc.assert_alive()


def test_body_over_the_limit_in_chunks_without_content_length_is_413(
    make_service: MakeService,
) -> None:
    svc = make_service(max_body_bytes=1000)
    sent_headers: list[dict[str, str]] = []

    def chunks() -> Iterator[bytes]:
        content = json.dumps(webhook_body(tuple(range(1, 200)))).encode()
        for start in range(0, len(content), 100):
            yield content[start : start + 100]

    svc.client.event_hooks["request"].append(lambda r: sent_headers.append(dict(r.headers)))
    response = svc.client.post("/webhook", content=chunks(), headers=AUTH)
    assert "content-length" not in sent_headers[0]
    assert sent_headers[0]["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert svc.queued() == 0
    svc.assert_alive()


def test_body_at_the_limit_is_accepted(make_service: MakeService) -> None:
    content = json.dumps(webhook_body((1, 2))).encode()
    svc = make_service(max_body_bytes=len(content))
    assert svc.client.post("/webhook", content=content, headers=AUTH).status_code == 200

    def chunks() -> Iterator[bytes]:
        yield content[:10]
        yield content[10:]

    assert svc.client.post("/webhook", content=chunks(), headers=AUTH).status_code == 200


def _http_scope(headers: list[tuple[bytes, bytes]], secret: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/webhook",
        "raw_path": b"/webhook",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"x-webhook-secret", secret), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


def _call_asgi(
    svc: Service,
    headers: list[tuple[bytes, bytes]],
    receive: Callable[[], Any],
    secret: bytes = SECRET.encode(),
) -> int:
    """Run one request through the raw ASGI interface; return the status code."""
    app = make_app(svc.settings, svc.queue, svc.hooks, svc.metrics)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(_http_scope(headers, secret), receive, send))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start"
    return int(sent[0]["status"])


def test_too_large_content_length_is_refused_before_reading(make_service: MakeService) -> None:
    svc = make_service(max_body_bytes=1000)

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    assert _call_asgi(svc, [(b"content-length", b"1001")], receive) == 413


def test_streamed_body_stops_being_read_at_the_limit(make_service: MakeService) -> None:
    svc = make_service(max_body_bytes=1000)
    received = 0

    async def receive() -> dict[str, Any]:
        # A client that sends 100 kB in 100-byte chunks, no Content-Length.
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b" " * 100, "more_body": received < 1000}

    assert _call_asgi(svc, [(b"transfer-encoding", b"chunked")], receive) == 413
    assert received == 11


def test_invalid_content_length_is_400(make_service: MakeService) -> None:
    svc = make_service()

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    assert _call_asgi(svc, [(b"content-length", b"12abc")], receive) == 400


# --------------------------------------------------------------------------- other events


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "TASKS_DELETED", "SOMETHING_NEW"])
def test_other_actions_are_ignored(service: Service, action: str) -> None:
    # Other actions have other shapes: their bodies are not validated beyond "action".
    response = service.post({"action": action, "tasks": "whatever", "project": 3})
    assert response.status_code == 200
    assert response.json() == {"ignored": action}
    assert service.queued() == 0
    assert service.hooks.reconciles == []


def test_unconfigured_project_is_ignored_and_logged_once(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        response = service.post(webhook_body((1, 2), project=77))
        assert response.status_code == 200
        assert response.json()["ignored"] == "TASKS_CREATED"
    service.post(webhook_body(None, project=77))  # send_payload false, but a project
    service.post(webhook_body((1,), project=78))
    assert service.queued() == 0
    assert service.hooks.reconciles == []
    app_messages = [r.getMessage() for r in caplog.records if r.name == "service.intake.webhook"]
    assert sum("project 77" in m for m in app_messages) == 1
    assert sum("project 78" in m for m in app_messages) == 1


def test_send_payload_false_requests_a_reconcile_of_every_project(service: Service) -> None:
    response = service.post({"action": "TASKS_CREATED"})
    assert response.status_code == 202
    assert response.json() == {"reconcile": "all"}
    assert service.hooks.reconciles == [None]
    assert service.queued() == 0


def test_tasks_created_with_project_but_no_tasks_reconciles_that_project(
    service: Service,
) -> None:
    response = service.post(webhook_body(None, project=PROJECT))
    assert response.status_code == 202
    assert response.json() == {"reconcile": PROJECT}
    assert service.hooks.reconciles == [PROJECT]


# --------------------------------------------------------------------------- health, ready


def test_health_and_ready(service: Service) -> None:
    assert service.client.get("/health").json() == {"status": "alive"}
    response = service.client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {
        "ready": True,
        "checks": {"model": "ok", "label_studio": "ok", "token": "ok"},
    }


def test_ready_is_503_with_the_reasons_when_not_ready(service: Service) -> None:
    checks = {"model": "ok", "label_studio": "connection refused", "token": "not checked"}
    service.hooks.state = Readiness(False, checks)
    response = service.client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "checks": checks}
    assert service.client.get("/health").status_code == 200  # alive all the same


def test_ready_is_503_when_the_check_itself_fails(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    service.hooks.fail_readiness = True
    with caplog.at_level(logging.ERROR, logger="service.app"):
        response = service.client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "ready": False,
        "checks": {"readiness": "check failed: RuntimeError"},
    }
    assert "boom" not in response.text
    assert "readiness check failed" in caplog.text


def test_lifespan_is_run(db_path: Path) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("start")
        yield
        events.append("stop")

    with SQLiteJobQueue(db_path, max_attempts=MAX_ATTEMPTS) as queue:
        app = make_app(settings(), queue, FakeHooks(), Metrics(queue), lifespan=lifespan)
        with TestClient(app) as client:
            assert events == ["start"]
            assert client.get("/health").status_code == 200
    assert events == ["start", "stop"]


# --------------------------------------------------------------------------- metrics


def _scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_webhook_outcomes_and_jobs(make_service: MakeService) -> None:
    svc = make_service(max_body_bytes=5000)
    svc.post(webhook_body((1, 2, 3)))  # queued
    svc.post(webhook_body((3, 4)))  # queued (1 new, 1 repeat)
    svc.post(webhook_body((5,)), headers={})  # unauthorized
    svc.client.post("/webhook", content=b"{", headers=AUTH)  # bad_request
    svc.client.post("/webhook", content=b" " * 6000, headers=AUTH)  # too_large
    svc.post({"action": "PROJECT_UPDATED"})  # ignored
    svc.post(webhook_body((1,), project=99))  # ignored
    svc.post({"action": "TASKS_CREATED"})  # reconcile

    job = svc.queue.claim(1)[0]
    svc.queue.mark_done(job.id)

    values = _scrape(svc.client)

    def webhooks(outcome: str) -> float:
        return values[("ls_autoseg_webhooks_total", (("outcome", outcome),))]

    assert webhooks("queued") == 2
    assert webhooks("unauthorized") == 1
    assert webhooks("bad_request") == 1
    assert webhooks("too_large") == 1
    assert webhooks("ignored") == 2
    assert webhooks("reconcile") == 1
    assert webhooks("error") == 0
    assert values[("ls_autoseg_webhook_task_ids_total", ())] == 5
    # The gauge is read from the queue at scrape time.
    assert values[("ls_autoseg_jobs", (("state", "queued"),))] == 3
    assert values[("ls_autoseg_jobs", (("state", "done"),))] == 1
    assert values[("ls_autoseg_jobs", (("state", "failed"),))] == 0


def test_worker_metrics() -> None:
    metrics = Metrics()
    metrics.job_finished("done", 1.5)
    metrics.job_finished("done", 0.5)
    metrics.job_finished(JobState.FAILED, 3.0)
    metrics.job_retried()
    metrics.inference(batch_size=8, seconds=0.2)
    with pytest.raises(ValueError, match="final job state"):
        metrics.job_finished("running", 1.0)
    get = metrics.registry.get_sample_value
    assert get("ls_autoseg_jobs_finished_total", {"state": "done"}) == 2
    assert get("ls_autoseg_jobs_finished_total", {"state": "failed"}) == 1
    assert get("ls_autoseg_jobs_finished_total", {"state": "skipped"}) == 0
    assert get("ls_autoseg_job_retries_total") == 1
    assert get("ls_autoseg_job_seconds_count") == 3
    assert get("ls_autoseg_job_seconds_sum") == 5.0
    assert get("ls_autoseg_inference_seconds_count") == 1
    assert get("ls_autoseg_inference_batch_size_sum") == 8
    assert get("ls_autoseg_inference_batch_size_bucket", {"le": "8.0"}) == 1
    assert get("ls_autoseg_inference_batch_size_bucket", {"le": "4.0"}) == 0
    # Each Metrics has its own registry: a second one starts from zero.
    assert Metrics().registry.get_sample_value("ls_autoseg_job_retries_total") == 0


def test_metrics_scrape_survives_a_closed_queue(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    queue = SQLiteJobQueue(db_path, max_attempts=MAX_ATTEMPTS)
    metrics = Metrics(queue)
    queue.close()
    with caplog.at_level(logging.WARNING, logger="service.metrics"):
        assert metrics.registry.get_sample_value("ls_autoseg_jobs", {"state": "queued"}) is None
    assert metrics.registry.get_sample_value("ls_autoseg_job_retries_total") == 0
    assert "cannot read job counts" in caplog.text


# --------------------------------------------------------------------------- secrets


def test_no_secret_or_payload_in_logs_or_responses(
    make_service: MakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    svc = make_service(max_body_bytes=50_000)
    svc.post(webhook_body((1, 2)))
    svc.post(webhook_body((1, 2)))
    svc.post(webhook_body((3,)), headers={"X-Webhook-Secret": SECRET + "!"})
    svc.post(webhook_body((3,)), headers={"X-Webhook-Secret": SECRET[:5]})
    svc.post(webhook_body((4,), project=55))
    svc.post(webhook_body(tuple(range(1, 2000))))  # too large
    svc.post({"action": "TASKS_CREATED", "project": {"id": PROJECT_TOKEN}})
    svc.client.post("/webhook", content=json.dumps(webhook_body())[:-3], headers=AUTH)
    svc.post({"action": "TASKS_CREATED", "project": {"id": 3, "token": PROJECT_TOKEN}})
    svc.responses.append(svc.client.get("/metrics").text)
    svc.responses.append(svc.client.get("/ready").text)

    assert caplog.records  # the checks below would pass vacuously otherwise
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in (SECRET, SECRET[:5], PROJECT_TOKEN, TASK_PASSWORD, IMAGE_URL):
            assert secret not in text, record.getMessage()
    for text in svc.responses:
        for secret in (SECRET, PROJECT_TOKEN, TASK_PASSWORD, IMAGE_URL):
            assert secret not in text


# --------------------------------------------------------------------------- the schema

TC = "TASKS_CREATED"
EVENTS: list[tuple[str, bytes, WebhookEvent]] = [
    (
        "tasks",
        b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1}, {"id": 2}]}',
        WebhookEvent(TC, 3, (1, 2)),
    ),
    ("no-tasks", b'{"action": "TASKS_CREATED", "project": {"id": 3}}', WebhookEvent(TC, 3, None)),
    (
        "empty-tasks",
        b'{"action": "TASKS_CREATED", "project": {"id": 3, "title": "x"}, "tasks": []}',
        WebhookEvent(TC, 3, ()),
    ),
    ("nothing", b'{"action": "TASKS_CREATED"}', WebhookEvent(TC, None, None)),
    (
        "largest-id",
        b'{"tasks": [], "action": "TASKS_CREATED", "project": {"id": 9223372036854775807}}',
        WebhookEvent(TC, 2**63 - 1, ()),
    ),
    (
        "other-action-of-any-shape",
        b'{"action": "ANNOTATION_CREATED", "project": 3, "tasks": "x"}',
        WebhookEvent("ANNOTATION_CREATED", None, None),
    ),
    (
        "other-action-well-formed",
        b'{"action": "ANNOTATION_CREATED", "project": {"id": 3}, "tasks": [{"id": 1}]}',
        WebhookEvent("ANNOTATION_CREATED", None, None),
    ),
    # Python's json reads (and writes) NaN and lone surrogates; msgspec refuses them.
    (
        "nan-in-task-data",
        b'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1, "x": NaN}]}',
        WebhookEvent(TC, 3, (1,)),
    ),
    (
        "lone-surrogates-in-task-data",
        rb'{"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 1, "t": "\ud800",'
        rb' "\udc00": 1}]}',
        WebhookEvent(TC, 3, (1,)),
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [(b, e) for _, b, e in EVENTS], ids=[i for i, _, _ in EVENTS]
)
def test_decode_event_reads_the_ids(body: bytes, expected: WebhookEvent) -> None:
    assert decode_event(body) == expected
