"""The webhook intake: ``POST /webhook`` turns a ``TASKS_CREATED`` body into queued task ids.

Label Studio sends each ``TASKS_CREATED`` webhook once, with a 1 s timeout, and never
retries. So the handler does the least that makes the event safe: it checks the shared
secret, reads the project id and task ids, records them durably in the queue's inbox (in
bounded rows; the worker's claims turn them into one job per task, repeats dropped),
wakes the worker and answers. Everything slow happens in the worker.

Answers (the app's route table is in ``service/app.py``)::

    401 bad secret, 413 too large, 400 malformed, 503 queue unavailable;
    200 {"queued": n} (n task ids made durable) | 200 {"ignored": ...}
    | 202 {"reconcile": project id or "all"} (sent without payload)

The body is parsed once, here, into a :class:`WebhookEvent` by one msgspec schema
(:func:`decode_event`); only ids leave this module: no URL or other field of the payload is
used, and no payload or secret is logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Final, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.config import Config, MissingEnv
from service.constants import SECRET_HEADER, TASKS_CREATED, WEBHOOK_PATH
from service.errors import BadWebhook, ConfigError, RetryableError
from service.intake.base import IntakeHooks
from service.metrics import Metrics
from service.queue import JobQueue

log = logging.getLogger(__name__)

# Bodies above this are decoded in a worker thread: msgspec takes milliseconds for a
# 5000-task body, and one it refuses goes through json.loads, tens of milliseconds, which
# would stall every other request on the event loop.
PARSE_IN_THREAD_BYTES: Final = 256 * 1024
# Bound on the "logged once" memory for unconfigured projects.
_MAX_REMEMBERED_PROJECTS: Final = 1024
_MAX_ID: Final = 2**63 - 1  # SQLite INTEGER


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


# --------------------------------------------------------------------------- the body


@dataclass(frozen=True)
class WebhookEvent:
    """A webhook body reduced to what we use.

    ``task_ids`` is None when the body carried no ``tasks`` (webhook created with
    ``send_payload: false``); ``project`` is None when it carried no ``project``.
    """

    action: str
    project: int | None
    task_ids: tuple[int, ...] | None


_Action = Annotated[str, msgspec.Meta(min_length=1)]
_Id = Annotated[int, msgspec.Meta(ge=1, le=_MAX_ID)]  # msgspec never takes a bool for an int


class _Envelope(msgspec.Struct):
    """What the body of every action must hold."""

    action: _Action


class _Task(msgspec.Struct):
    id: _Id


class _Project(msgspec.Struct):
    id: _Id


class _Body(_Envelope):
    """The schema: the fields we use, typed; msgspec skips everything else without building
    objects. Only a ``TASKS_CREATED`` body is held to ``project`` and ``tasks``, judged in
    this order. UNSET, not None: an explicit null is refused."""

    project: _Project | msgspec.UnsetType = msgspec.UNSET
    tasks: list[_Task] | msgspec.UnsetType = msgspec.UNSET


# What each place of the schema must be, by its path with list indices written "[]". The
# client is told the place, never the value found there.
_MUST_BE: Final = {
    "": "a JSON object",
    "action": "a non-empty string",
    "project": "an object",
    "project.id": "a positive integer",
    "tasks": "a list",
    "tasks[]": "an object",
    "tasks[].id": "a positive integer",
}
# msgspec's ValidationError says "<what> - at `$.tasks[3].id`" (no "at" for the body
# itself), and names a missing field as "Object missing required field `id`".
_AT: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING: Final = re.compile(r"^Object missing required field `(?P<field>\w+)`")
_INDEX: Final = re.compile(r"\[\d+\]")
_DECODER: Final = msgspec.json.Decoder(_Body)

_Struct = TypeVar("_Struct", bound=msgspec.Struct)


def decode_event(body: bytes) -> WebhookEvent:
    """Bytes -> :class:`WebhookEvent`; raises :class:`BadWebhook`.

    A body that fits the schema is decoded by msgspec straight into the ids (~10x faster than
    ``json.loads`` for a 5000-task body: the handler's biggest cost), every action's body in
    one pass. A body msgspec refuses is read again by ``json.loads`` (Python's json, which
    Label Studio writes with: NaN and lone surrogates in task data pass, as they always did),
    and the same schema is applied to what it read, to name the first place that does not fit.
    """
    try:
        decoded = _DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included
        decoded = _judge(_load(body))
    return _event(decoded)


def _load(body: bytes) -> object:
    try:
        return json.loads(body)
    except RecursionError:
        raise BadWebhook("body is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        # ``from None``: the decoder's message quotes the document.
        raise BadWebhook("body is not valid JSON") from None


def _judge(payload: object) -> _Body:
    """The schema applied to a decoded body: the action first, then (for ``TASKS_CREATED``
    only) the schema's fields in its order, whatever order the body wrote them in."""
    action = _fit(payload, _Envelope).action
    if action != TASKS_CREATED:
        return _Body(action=action)
    assert isinstance(payload, dict)  # _Envelope took it
    fields = {name: payload[name] for name in _Body.__struct_fields__ if name in payload}
    return _fit(fields, _Body)


def _fit(value: object, schema: type[_Struct]) -> _Struct:
    try:
        try:
            return msgspec.convert(value, schema)
        except UnicodeEncodeError:
            return msgspec.convert(_without_surrogates(value), schema)
    except msgspec.ValidationError as exc:
        raise BadWebhook(_message(str(exc))) from None


def _without_surrogates(value: object) -> object:
    """``value`` with each lone surrogate (json.loads reads "\\ud800") as "?": msgspec cannot
    look at such a str where the schema wants another type, or as a key. No answer changes:
    a str stays a str, and a non-empty one non-empty."""
    return json.loads(json.dumps(value, ensure_ascii=False).encode("utf-8", "replace"))


def _message(error: str) -> str:
    """msgspec's error -> the client's message: the place in the body and what it must be."""
    at = _AT.search(error)
    path = at["path"] if at else ""
    missing = _MISSING.match(error)
    if missing:
        path = f"{path}.{missing['field']}" if path else missing["field"]
    must_be = _MUST_BE.get(_INDEX.sub("[]", path))
    if must_be is None:  # not a place of the schema: say nothing more specific
        return "body does not fit the webhook schema"
    return f"{path or 'body'} must be {must_be}"


def _event(body: _Body) -> WebhookEvent:
    if body.action != TASKS_CREATED:
        return WebhookEvent(action=body.action, project=None, task_ids=None)
    project = None if isinstance(body.project, msgspec.UnsetType) else body.project.id
    if isinstance(body.tasks, msgspec.UnsetType):
        return WebhookEvent(action=body.action, project=project, task_ids=None)
    if project is None:
        raise BadWebhook("tasks came without project.id")
    ids = tuple(task.id for task in body.tasks)
    return WebhookEvent(action=body.action, project=project, task_ids=ids)


# --------------------------------------------------------------------------- the handler


class WebhookIntake:
    """The :class:`~service.intake.base.Intake` of Label Studio's webhook: ``POST /webhook``.

    Raises ConfigError for settings that would leave the webhook open.
    """

    def __init__(
        self, settings: WebhookSettings, queue: JobQueue, hooks: IntakeHooks, metrics: Metrics
    ) -> None:
        self.settings = settings.check()
        self._secret = settings.secret.encode("utf-8") if settings.secret else None
        self._queue = queue
        self._hooks = hooks
        self._metrics = metrics
        # Per intake, not per module: one app per process in production, a fresh one per test.
        self._unconfigured_seen: set[int] = set()

    def routes(self) -> Sequence[BaseRoute]:
        return [Route(WEBHOOK_PATH, self.handle, methods=["POST"])]

    async def handle(self, request: Request) -> Response:
        """``POST /webhook``: the body's task ids are durable in the queue before we answer."""
        client = request.client.host if request.client else "?"
        refused = self._refuse_early(request, client)
        if refused is not None:
            return refused
        body = await self._read_body(request, client)
        if isinstance(body, Response):
            return body
        try:
            if len(body) > PARSE_IN_THREAD_BYTES:
                event = await asyncio.to_thread(decode_event, body)
            else:
                event = decode_event(body)
        except BadWebhook as exc:
            log.warning("webhook from %s: bad request: %s", client, exc)
            return self._refusal("bad_request", 400, str(exc))
        return await self._answer(event)

    def _refusal(self, outcome: str, status: int, message: str) -> Response:
        self._metrics.webhook(outcome)
        return JSONResponse({"error": message}, status_code=status)

    def _too_large(self) -> Response:
        return self._refusal(
            "too_large", 413, f"body larger than {self.settings.max_body_bytes} bytes"
        )

    def _unauthorized(self, request: Request) -> str | None:
        """None if the request may pass, else why not (for the log, not the client)."""
        if self._secret is None:
            return None
        provided = request.headers.get(SECRET_HEADER)
        if provided is None:
            return f"no {SECRET_HEADER} header"
        # Headers arrive as latin-1 decoded bytes: compare the raw bytes, so a non-ASCII
        # secret works and compare_digest never sees non-ASCII str.
        if not hmac.compare_digest(provided.encode("latin-1"), self._secret):
            return f"wrong {SECRET_HEADER}"
        return None

    def _refuse_early(self, request: Request, client: str) -> Response | None:
        """The answer to a request refused on its headers alone, before its body is read."""
        refused = self._unauthorized(request)
        if refused is not None:
            log.warning("webhook from %s refused: %s", client, refused)
            return self._refusal("unauthorized", 401, f"missing or wrong {SECRET_HEADER} header")
        declared = request.headers.get("content-length")
        if declared is None:
            return None
        if not (declared.isascii() and declared.isdigit()):
            return self._refusal("bad_request", 400, "invalid Content-Length")
        if int(declared) > self.settings.max_body_bytes:
            log.warning("webhook from %s refused: Content-Length %s too large", client, declared)
            return self._too_large()
        return None

    async def _read_body(self, request: Request, client: str) -> bytes | Response:
        """The body, or the answer when it grows over the limit or the client goes away."""
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async with aclosing(request.stream()) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if size > limit:
                        log.warning("webhook from %s refused: body over %d bytes", client, limit)
                        return self._too_large()
                    chunks.append(chunk)
        except ClientDisconnect:
            log.warning("webhook from %s: client went away before the body was read", client)
            return self._refusal("bad_request", 400, "client disconnected")
        return b"".join(chunks)

    async def _answer(self, event: WebhookEvent) -> Response:
        if event.action != TASKS_CREATED:
            log.debug("webhook action %s ignored", event.action)
            self._metrics.webhook("ignored")
            return JSONResponse({"ignored": event.action})
        if event.project is not None and self._ignore_project(event.project):
            self._metrics.webhook("ignored")
            return JSONResponse({"ignored": event.action, "reason": "project not configured"})
        if event.task_ids is None:
            return self._reconcile(event.project)
        assert event.project is not None  # decode_event guarantees it when tasks are given
        return await self._accept(event.project, event.task_ids)

    def _ignore_project(self, project: int) -> bool:
        if project in self.settings.projects:
            return False
        seen = self._unconfigured_seen
        if project not in seen and len(seen) < _MAX_REMEMBERED_PROJECTS:
            seen.add(project)
            log.warning(
                "webhook for project %d, which is not in the config's projects: ignored "
                "(logged once per project)",
                project,
            )
        return True

    def _reconcile(self, project: int | None) -> Response:
        # send_payload: false: we are told something was created, not what.
        log.info(
            "TASKS_CREATED without tasks: reconcile %s",
            "all projects" if project is None else f"project {project}",
        )
        self._hooks.request_reconcile(project)
        self._metrics.webhook("reconcile")
        return JSONResponse({"reconcile": "all" if project is None else project}, status_code=202)

    async def _accept(self, project: int, ids: tuple[int, ...]) -> Response:
        try:
            # Durable before we answer: Label Studio will never send this event again.
            accepted = await asyncio.to_thread(
                self._queue.accept, project, ids, self.settings.model_version
            )
        except (RetryableError, ConfigError) as exc:
            log.error(
                "project %d: cannot queue %d task(s) from a webhook: %s", project, len(ids), exc
            )
            # Label Studio never sends this event again: a reconcile of the project, retried
            # until the queue takes writes, finds these tasks soon, not an interval later.
            self._hooks.request_reconcile(project)
            return self._refusal("error", 503, "job queue unavailable")
        self._metrics.webhook("queued")
        self._metrics.task_ids_accepted(accepted)
        if accepted:
            try:
                self._hooks.wake()
            except Exception:
                # The jobs are durable; the worker finds them on its next poll.
                log.exception("project %d: waking the worker failed", project)
        return JSONResponse({"queued": accepted})
