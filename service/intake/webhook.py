"""The HTTP face of the always-on service: the webhook, health, readiness and metrics.

Label Studio sends each ``TASKS_CREATED`` webhook once, with a 1 s timeout, and never
retries. So the handler does the least that makes the event safe: it checks the shared
secret, reads the project id and task ids, records them durably in the queue's inbox (one
row per body; the worker's next claim turns them into one job per task, repeats dropped),
wakes the worker and answers. Everything slow happens in the worker.

Routes::

    POST /webhook   401 bad secret, 413 too large, 400 malformed, 503 queue unavailable;
                    200 {"queued": n} (n task ids made durable) | 200 {"ignored": ...}
                    | 202 {"reconcile": project id or "all"} (sent without payload)
    GET  /health    200 {"status": "alive"}: the process answers (liveness)
    GET  /ready     200/503 {"ready": bool, "checks": {...}}: model, Label Studio, token
    GET  /metrics   Prometheus text format

The body is parsed once, here, into a :class:`WebhookEvent`; only ids leave this module:
no URL or other field of the payload is used, and no payload or secret is logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Lifespan

from service.config import Config, MissingEnv
from service.constants import SECRET_HEADER, TASKS_CREATED
from service.errors import BadWebhook, ConfigError, RetryableError
from service.metrics import Metrics
from service.queue import JobQueue

log = logging.getLogger(__name__)

# Bodies above this are parsed in a worker thread: json.loads of a 5000-task import takes
# tens of milliseconds, which would stall every other request on the event loop.
PARSE_IN_THREAD_BYTES: Final = 256 * 1024
# Bound on the "logged once" memory for unconfigured projects.
_MAX_REMEMBERED_PROJECTS: Final = 1024
_MAX_ID: Final = 2**63  # SQLite INTEGER


@dataclass(frozen=True)
class WebhookSettings:
    """What the webhook handler needs from the configuration."""

    secret: str | None
    allow_unauthenticated: bool
    max_body_bytes: int
    projects: frozenset[int]
    model_version: str

    def check(self) -> WebhookSettings:
        """Refuse to serve an open webhook unless the config says so; return self."""
        if not self.secret and not self.allow_unauthenticated:
            raise ConfigError(
                "server.webhook_secret is not set: set it (and the same value as the "
                f"{SECRET_HEADER} header of the Label Studio webhook), "
                "or set server.allow_unauthenticated: true"
            )
        if self.max_body_bytes < 1:
            raise ConfigError(f"server.max_body_bytes must be >= 1, got {self.max_body_bytes}")
        return self

    @classmethod
    def from_config(cls, config: Config) -> WebhookSettings:
        """Settings from a loaded config, checked."""
        secret = config.server.webhook_secret
        if isinstance(secret, MissingEnv):
            # Written as ${NAME} means a secret is meant; serving without it would be a
            # silent downgrade, even where allow_unauthenticated is true.
            raise ConfigError(
                f"server.webhook_secret comes from ${{{secret.name}}} in {config.source}, "
                f"but the environment variable {secret.name} is not set"
            )
        return cls(
            secret=secret or None,
            allow_unauthenticated=config.server.allow_unauthenticated,
            max_body_bytes=config.server.max_body_bytes,
            projects=frozenset(project.id for project in config.projects),
            model_version=config.prediction.model_version,
        ).check()


@dataclass(frozen=True)
class Readiness:
    """The answer of ``GET /ready``: ready, and one line per check ("ok" or the reason)."""

    ready: bool
    checks: Mapping[str, str]


class ServiceHooks(Protocol):
    """What the app needs from the running service.

    ``wake`` and ``request_reconcile`` are called on the event loop: they must only signal
    (set an event, put on a queue), never block.
    """

    def wake(self) -> None:
        """New jobs are in the queue."""
        ...

    def request_reconcile(self, project: int | None) -> None:
        """Look for unprocessed tasks in ``project``, or in every configured one (None)."""
        ...

    async def readiness(self) -> Readiness: ...


@dataclass(frozen=True)
class WebhookEvent:
    """A webhook body reduced to what we use.

    ``task_ids`` is None when the body carried no ``tasks`` (webhook created with
    ``send_payload: false``); ``project`` is None when it carried no ``project``.
    """

    action: str
    project: int | None
    task_ids: tuple[int, ...] | None


def _positive_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < _MAX_ID


def parse_event(payload: object) -> WebhookEvent:
    """Validate a decoded webhook body. Only ``TASKS_CREATED`` is looked into further.

    Messages name the offending field but never echo its value.
    """
    if not isinstance(payload, dict):
        raise BadWebhook("body must be a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action:
        raise BadWebhook("action must be a non-empty string")
    if action != TASKS_CREATED:
        return WebhookEvent(action=action, project=None, task_ids=None)

    project: int | None = None
    if "project" in payload:
        raw_project = payload["project"]
        if not isinstance(raw_project, dict):
            raise BadWebhook("project must be an object")
        project_id = raw_project.get("id")
        if not _positive_id(project_id):
            raise BadWebhook("project.id must be a positive integer")
        assert isinstance(project_id, int)
        project = project_id

    task_ids: tuple[int, ...] | None = None
    if "tasks" in payload:
        tasks = payload["tasks"]
        if not isinstance(tasks, list):
            raise BadWebhook("tasks must be a list")
        ids: list[int] = []
        for index, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise BadWebhook(f"tasks[{index}] must be an object")
            task_id = task.get("id")
            if not _positive_id(task_id):
                raise BadWebhook(f"tasks[{index}].id must be a positive integer")
            assert isinstance(task_id, int)
            ids.append(task_id)
        if project is None:
            raise BadWebhook("tasks came without project.id")
        task_ids = tuple(ids)
    return WebhookEvent(action=action, project=project, task_ids=task_ids)


_Id = Annotated[int, msgspec.Meta(ge=1, le=_MAX_ID - 1)]


class _FastTask(msgspec.Struct):
    id: _Id


class _FastProject(msgspec.Struct):
    id: _Id


class _FastBody(msgspec.Struct):
    """The fields we use, typed: msgspec skips everything else without building objects."""

    action: Annotated[str, msgspec.Meta(min_length=1)]
    # UNSET, not None: an explicit null must take the slow path and its error message.
    project: _FastProject | msgspec.UnsetType = msgspec.UNSET
    tasks: list[_FastTask] | msgspec.UnsetType = msgspec.UNSET


_FAST_DECODER: Final = msgspec.json.Decoder(_FastBody)


def decode_event(body: bytes) -> WebhookEvent:
    """Bytes -> :class:`WebhookEvent`; raises :class:`BadWebhook`.

    A well-formed TASKS_CREATED body is decoded by msgspec into just the ids (~10x faster
    than ``json.loads`` for a 5000-task body: the handler's biggest cost); any body msgspec
    refuses, and every other action, goes through ``json.loads`` and :func:`parse_event`, so
    what is accepted and every error message stay as they were.
    """
    try:
        fast = _FAST_DECODER.decode(body)
    except msgspec.DecodeError:  # ValidationError included
        fast = None
    if fast is not None and fast.action == TASKS_CREATED and fast.project is not msgspec.UNSET:
        tasks = None if fast.tasks is msgspec.UNSET else tuple(task.id for task in fast.tasks)
        return WebhookEvent(action=fast.action, project=fast.project.id, task_ids=tasks)
    return _decode_slow(body)


def _decode_slow(body: bytes) -> WebhookEvent:
    try:
        payload = json.loads(body)
    except RecursionError:
        raise BadWebhook("body is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        # ``from None``: the decoder's message quotes the document.
        raise BadWebhook("body is not valid JSON") from None
    return parse_event(payload)


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    settings: WebhookSettings,
    queue: JobQueue,
    hooks: ServiceHooks,
    metrics: Metrics,
    *,
    lifespan: Lifespan[Starlette] | None = None,
) -> Starlette:
    """The ASGI app. Raises ConfigError for settings that would leave the webhook open."""
    settings.check()
    secret = settings.secret.encode("utf-8") if settings.secret else None
    # Per app, not per module: one app per process in production, a fresh one per test.
    unconfigured_seen: set[int] = set()

    def authorized(request: Request) -> str | None:
        """None if the request may pass, else why not (for the log, not the client)."""
        if secret is None:
            return None
        provided = request.headers.get(SECRET_HEADER)
        if provided is None:
            return f"no {SECRET_HEADER} header"
        # Headers arrive as latin-1 decoded bytes: compare the raw bytes, so a non-ASCII
        # secret works and compare_digest never sees non-ASCII str.
        if not hmac.compare_digest(provided.encode("latin-1"), secret):
            return f"wrong {SECRET_HEADER}"
        return None

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    def ignore_project(project: int) -> bool:
        if project in settings.projects:
            return False
        if project not in unconfigured_seen and len(unconfigured_seen) < _MAX_REMEMBERED_PROJECTS:
            unconfigured_seen.add(project)
            log.warning(
                "webhook for project %d, which is not in the config's projects: ignored "
                "(logged once per project)",
                project,
            )
        return True

    async def webhook(request: Request) -> Response:
        client = request.client.host if request.client else "?"
        refused = authorized(request)
        if refused is not None:
            log.warning("webhook from %s refused: %s", client, refused)
            metrics.webhook("unauthorized")
            return _error(401, f"missing or wrong {SECRET_HEADER} header")

        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                metrics.webhook("bad_request")
                return _error(400, "invalid Content-Length")
            if int(declared) > settings.max_body_bytes:
                log.warning(
                    "webhook from %s refused: Content-Length %s too large", client, declared
                )
                metrics.webhook("too_large")
                return _error(413, f"body larger than {settings.max_body_bytes} bytes")
        try:
            body = await read_body(request)
        except _TooLarge:
            log.warning(
                "webhook from %s refused: body over %d bytes", client, settings.max_body_bytes
            )
            metrics.webhook("too_large")
            return _error(413, f"body larger than {settings.max_body_bytes} bytes")
        except ClientDisconnect:
            log.warning("webhook from %s: client went away before the body was read", client)
            metrics.webhook("bad_request")
            return _error(400, "client disconnected")

        try:
            if len(body) > PARSE_IN_THREAD_BYTES:
                event = await asyncio.to_thread(decode_event, body)
            else:
                event = decode_event(body)
        except BadWebhook as exc:
            log.warning("webhook from %s: bad request: %s", client, exc)
            metrics.webhook("bad_request")
            return _error(400, str(exc))

        if event.action != TASKS_CREATED:
            log.debug("webhook action %s ignored", event.action)
            metrics.webhook("ignored")
            return JSONResponse({"ignored": event.action})
        if event.project is not None and ignore_project(event.project):
            metrics.webhook("ignored")
            return JSONResponse({"ignored": event.action, "reason": "project not configured"})

        if event.task_ids is None:
            # send_payload: false: we are told something was created, not what.
            log.info(
                "TASKS_CREATED without tasks: reconcile %s",
                "all projects" if event.project is None else f"project {event.project}",
            )
            hooks.request_reconcile(event.project)
            metrics.webhook("reconcile")
            return JSONResponse(
                {"reconcile": "all" if event.project is None else event.project}, status_code=202
            )

        assert event.project is not None  # parse_event guarantees it when tasks are given
        ids = event.task_ids
        try:
            # Durable before we answer: Label Studio will never send this event again.
            accepted = await asyncio.to_thread(
                queue.accept, event.project, ids, settings.model_version
            )
        except (RetryableError, ConfigError) as exc:
            log.error(
                "project %d: cannot queue %d task(s) from a webhook: %s",
                event.project,
                len(ids),
                exc,
            )
            metrics.webhook("error")
            return _error(503, "job queue unavailable")
        metrics.webhook("queued")
        metrics.task_ids_accepted(accepted)
        if accepted:
            try:
                hooks.wake()
            except Exception:
                # The jobs are durable; the worker finds them on its next poll.
                log.exception("project %d: waking the worker failed", event.project)
        return JSONResponse({"queued": accepted})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def ready(request: Request) -> Response:
        try:
            state = await hooks.readiness()
        except Exception as exc:
            log.exception("readiness check failed")
            state = Readiness(False, {"readiness": f"check failed: {type(exc).__name__}"})
        body: dict[str, Any] = {"ready": state.ready, "checks": dict(state.checks)}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        # The job gauge queries SQLite, which may wait on a lock: keep it off the loop.
        text = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return Starlette(
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
