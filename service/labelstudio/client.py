"""``LabelStudioClient``: Label Studio's API, one method per call ls-autoseg makes.

Each method sends through ``transport.Sender`` (retries, the token, errors mapped as the
``service.labelstudio`` docstring draws them) and parses the answer with ``parse`` into the
values of ``types``; nothing outside this package sees Label Studio's raw JSON.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from service.config import LabelStudioConfig
from service.constants import TokenType
from service.errors import LabelStudioError
from service.labelstudio.disk import DiskFiles
from service.labelstudio.files import Files
from service.labelstudio.parse import (
    _content_kind,
    _error_detail,
    _int_list,
    _is_json,
    _json,
    _list,
    _object,
    _opt_int,
    _opt_str,
    _parse_annotation,
    _parse_project,
    _parse_task,
    _parse_webhook,
    _req_int,
)
from service.labelstudio.queries import LEAN_FIELDS, untouched_query
from service.labelstudio.transport import Sender, _webhook_refused
from service.labelstudio.types import (
    MAX_FILES_PER_IMPORT,
    MAX_TASKS_PER_READ,
    Annotation,
    PredictionIn,
    Project,
    Task,
    Webhook,
)
from service.labelstudio.urls import ImageHosts, Resolver, system_resolver

# How the batched ``import/predictions`` of 1.23.2 refuses task 0 (``bulk_is_cheap``); its
# legacy path says "couldn't be retrieved" or "Invalid task ID 0 - task not found".
_BATCHED_IMPORT_REFUSAL = "task ID 0 not found in project"


class LabelStudioClient:
    """Async client for one Label Studio server; use as ``async with LabelStudioClient(...)``.

    ``retries`` is the number of retries after the first try (connection errors, timeouts, 429
    and 5xx only). Note that a POST retried after a timeout or 5xx may have been applied once
    already: callers that must not duplicate (predictions) compare before they create again.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        token_type: TokenType = LabelStudioConfig.token_type,
        *,
        timeout_s: float = LabelStudioConfig.timeout_s,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        allowed_image_hosts: Sequence[str] = LabelStudioConfig.allowed_image_hosts,
        resolver: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        download_timeout_s: float = LabelStudioConfig.download_timeout_s,
        media_root: Path | None = LabelStudioConfig.media_root,
        local_files_root: Path | None = LabelStudioConfig.local_files_root,
    ) -> None:
        self._sender = Sender(
            base_url,
            token,
            token_type,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            transport=transport,
            sleep=sleep,
            image_hosts=ImageHosts(tuple(allowed_image_hosts), resolver),
        )
        self.base_url = self._sender.base_url
        self.token_type = self._sender.credentials.token_type
        # Task data URLs -> bytes: ``client.files.download(task_id, url)``, ``.serves(url)``.
        # Read from disk where ``media_root`` / ``local_files_root`` reach Label Studio's files.
        self.files = Files(
            self._sender, download_timeout_s, DiskFiles(media_root, local_files_root)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._sender.aclose()

    def _url(self, path: str) -> str:
        return self._sender.url(path)

    # -- account ------------------------------------------------------------------------------

    async def verify(self, *, retries: int | None = None) -> str:
        """Check the URL and the token; return the user's email (or username).

        ``retries`` overrides the client's own (a health probe wants an answer now)."""
        body = await self._whoami(retries)
        who = _opt_str(body, "email") or _opt_str(body, "username")
        if not who:
            raise LabelStudioError("Label Studio's whoami answer has no email or username")
        return who

    async def user_id(self) -> int:
        """The id of the token's user: what Label Studio writes as ``completed_by`` on the
        annotations this client creates."""
        user = _opt_int(await self._whoami(None), "id")
        if user is None:
            raise LabelStudioError("Label Studio's whoami answer has no user id")
        return user

    async def _whoami(self, retries: int | None) -> Mapping[str, Any]:
        url = self._url("/api/current-user/whoami")
        response = await self._sender.send("GET", url, allow=frozenset({404}), retries=retries)
        if response.status_code == 404 or not _is_json(response):
            raise LabelStudioError(
                f"{self.base_url} does not look like Label Studio: GET /api/current-user/whoami "
                f"answered {response.status_code} {_content_kind(response)}. Check the URL "
                "(scheme, host, port, and any path prefix Label Studio is served under).",
                response.status_code,
            )
        return _object(_json(response), "whoami")

    async def create_pat(self, *, replace_existing: bool = False) -> str:
        """Create a Personal Access Token for the authenticated user (tests, quickstart).

        Label Studio allows one live PAT per user (409 otherwise). With ``replace_existing``
        the user's existing PATs are revoked (blacklisted) first: clients using them stop
        working once their current access token expires.
        """
        url = self._url("/api/token/")
        response = await self._sender.send("POST", url, allow=frozenset({409}))
        if response.status_code == 409:
            if not replace_existing:
                raise LabelStudioError(
                    "this user already has a Personal Access Token (Label Studio allows one); "
                    "revoke it in Account & Settings or pass replace_existing=True",
                    409,
                )
            listed = _json(await self._sender.send("GET", url))
            for item in listed if isinstance(listed, list) else []:
                truncated = _opt_str(_object(item, "token"), "token")
                if truncated:
                    await self._sender.send(
                        "POST",
                        self._url("/api/token/blacklist/"),
                        json_body={"refresh": truncated},
                        allow=frozenset({404}),  # already revoked
                    )
            response = await self._sender.send("POST", url)
        token = _opt_str(_object(_json(response), "token"), "token")
        if not token:
            raise LabelStudioError("Label Studio's answer to POST /api/token/ has no token")
        return token

    # -- projects and tasks -------------------------------------------------------------------

    async def get_project(self, project_id: int) -> Project:
        response = await self._sender.send("GET", self._url(f"/api/projects/{int(project_id)}/"))
        return _parse_project(_json(response))

    async def list_projects(self) -> list[Project]:
        """Every project the user can see, a page at a time."""
        projects: list[Project] = []
        page = 1
        while True:
            response = await self._sender.send(
                "GET", self._url("/api/projects/"), params={"page": page, "page_size": 100}
            )
            body = _object(_json(response), "project list")
            projects.extend(_parse_project(raw) for raw in _list(body.get("results"), "results"))
            if not body.get("next"):
                return projects
            page += 1

    async def create_project(self, title: str, label_config: str) -> Project:
        response = await self._sender.send(
            "POST",
            self._url("/api/projects/"),
            json_body={"title": title, "label_config": label_config},
        )
        return _parse_project(_json(response))

    async def iter_tasks(
        self,
        project_id: int,
        *,
        page_size: int = 100,
        fields_all: bool = False,
        query: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Task]:
        """Every task of the project, in id order, a page at a time.

        ``fields_all`` adds full annotation/prediction lists (heavier pages); ``query`` is a
        Data Manager query, e.g. ``{"filters": {"conjunction": "and", "items": [...]}}``.
        """
        page, seen = 1, 0
        while True:
            tasks, total = await self.task_page(
                project_id, page=page, page_size=page_size, fields_all=fields_all, query=query
            )
            if tasks is None:
                return  # tasks were deleted while paging: the end came early
            for task in tasks:
                yield task
            seen += len(tasks)
            if not tasks or (total is not None and seen >= total):
                return
            page += 1

    async def task_page(
        self,
        project_id: int,
        *,
        page: int = 1,
        page_size: int = 100,
        fields_all: bool = False,
        query: Mapping[str, Any] | None = None,
        include: str | None = None,
    ) -> tuple[list[Task] | None, int | None]:
        """One page of the task list and the total if Label Studio gave it; ``None`` for a
        page past the end (Label Studio answers 404 "Invalid page."). ``include``: only these
        fields (comma-separated, e.g. ``queries.LEAN_FIELDS``), a lighter read."""
        url = self._url("/api/tasks/")
        params: dict[str, str | int] = {
            "project": int(project_id),
            "page_size": int(page_size),
            "page": int(page),
        }
        if fields_all:
            params["fields"] = "all"
        if include is not None:
            params["include"] = include
        if query is not None:
            params["query"] = json.dumps(query, separators=(",", ":"))
        response = await self._sender.send("GET", url, params=params, allow=frozenset({404}))
        if response.status_code == 404:
            if page > 1 and _error_detail(response) == "Invalid page.":
                return None, None
            raise self._sender.error("GET", url, response)
        body = _json(response)
        if isinstance(body, list):
            raw_tasks, total = body, None
        else:
            listing = _object(body, "task list")
            raw_tasks = _list(listing.get("tasks"), "tasks")
            total = _opt_int(listing, "total")
        return [_parse_task(raw) for raw in raw_tasks], total

    async def get_tasks(self, project_id: int, task_ids: Sequence[int]) -> dict[int, Task]:
        """The given tasks of one project, with annotations and predictions, by id, read
        ``MAX_TASKS_PER_READ`` per request. Ids missing from the answer are not in the project
        (deleted, another project's, or not committed yet): ask ``get_task`` which it is.

        One list request costs Label Studio 3-8 ms of CPU per task where ``GET
        /api/tasks/{id}/`` costs ~60 ms (measured on 1.23.2).
        """
        return await self._tasks_by_id(
            project_id,
            task_ids,
            lambda chunk: {
                "fields_all": True,
                "query": {"selectedItems": {"all": False, "included": chunk}},
            },
        )

    async def untouched_tasks(
        self, project_id: int, task_ids: Sequence[int], model_version: str
    ) -> dict[int, Task]:
        """Of the given tasks of one project, those nobody annotated or skipped and with no
        prediction whose model_version contains ``model_version``, by id, read lean
        (``queries.LEAN_FIELDS``, no annotation or prediction lists). A task missing from
        the answer may still need work (see ``queries.untouched_query``): read it in full."""
        return await self._tasks_by_id(
            project_id,
            task_ids,
            lambda chunk: {
                "include": LEAN_FIELDS,
                "query": untouched_query(model_version, ids=chunk),
            },
        )

    async def _tasks_by_id(
        self,
        project_id: int,
        task_ids: Sequence[int],
        page: Callable[[list[int]], dict[str, Any]],
    ) -> dict[int, Task]:
        """The tasks among ``task_ids`` that a list read with ``page(chunk)``'s arguments
        returns, ``MAX_TASKS_PER_READ`` ids a request."""
        wanted = list(dict.fromkeys(int(task_id) for task_id in task_ids))
        found: dict[int, Task] = {}
        for start in range(0, len(wanted), MAX_TASKS_PER_READ):
            chunk = wanted[start : start + MAX_TASKS_PER_READ]
            tasks, _ = await self.task_page(project_id, page_size=len(chunk), **page(chunk))
            for task in tasks or []:
                if task.id in chunk:
                    found[task.id] = task
        return found

    async def get_task(self, task_id: int) -> Task:
        """One task with its annotations and predictions."""
        response = await self._sender.send("GET", self._url(f"/api/tasks/{int(task_id)}/"))
        return _parse_task(_json(response))

    async def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        """Import tasks given as JSON (``{"data": {...}, ...}``); return the new task ids."""
        if not tasks:
            return []
        response = await self._sender.send(
            "POST",
            self._url(f"/api/projects/{int(project_id)}/import"),
            params={"return_task_ids": "true"},
            json_body=[dict(task) for task in tasks],
        )
        return _int_list(_object(_json(response), "import").get("task_ids"), "task_ids")

    async def upload_files(
        self, project_id: int, files: Sequence[tuple[str, bytes]], *, commit: bool = True
    ) -> list[int]:
        """Upload files (``(name, bytes)``) as tasks, 100 per request.

        With ``commit`` (the API's import) the new task ids are returned. Without it, the files
        are only stored and their file-upload ids returned; ``reimport`` then creates the tasks,
        as the web UI's import dialog does.
        """
        url = self._url(f"/api/projects/{int(project_id)}/import")
        params = {"return_task_ids": "true"}
        if not commit:
            params["commit_to_project"] = "false"
        ids: list[int] = []
        for start in range(0, len(files), MAX_FILES_PER_IMPORT):
            chunk = files[start : start + MAX_FILES_PER_IMPORT]
            # one field name per file: Label Studio keeps only the last file of a field name
            parts = [
                (
                    f"file{i}",
                    (name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"),
                )
                for i, (name, data) in enumerate(chunk)
            ]
            body = _object(
                _json(await self._sender.send("POST", url, params=params, files=parts)), "import"
            )
            key = "task_ids" if commit else "file_upload_ids"
            ids.extend(_int_list(body.get(key), key))
        return ids

    async def reimport(self, project_id: int, file_upload_ids: Sequence[int]) -> int:
        """Create tasks from uploaded-but-uncommitted files (the web UI's second import step).

        Returns the number of tasks created. Label Studio emits TASKS_CREATED inside this
        request's database transaction.
        """
        response = await self._sender.send(
            "POST",
            self._url(f"/api/projects/{int(project_id)}/reimport"),
            json_body={"file_upload_ids": list(file_upload_ids), "files_as_tasks_list": False},
        )
        return _opt_int(_object(_json(response), "reimport"), "task_count") or 0

    # -- predictions and annotations ----------------------------------------------------------

    async def create_prediction(
        self, prediction: PredictionIn, *, retry: bool = True, project: int | None = None
    ) -> int:
        """Create one prediction. ``retry=False`` makes one try only: a POST that timed out
        may have been applied, so a caller that must not duplicate checks and tries again.
        ``project``: the task's project, if known; Label Studio 1.23.2 looks it up (1-2
        queries and a warning) when the body lacks it."""
        body = prediction.to_json()
        if project is not None:
            body["project"] = int(project)
        response = await self._sender.send(
            "POST",
            self._url("/api/predictions/"),
            json_body=body,
            retries=None if retry else 0,
        )
        return _req_int(_object(_json(response), "prediction"), "id")

    async def import_predictions(
        self, project_id: int, items: Sequence[PredictionIn], *, retry: bool = True
    ) -> int:
        """Bulk-create predictions; return how many Label Studio created. ``retry=False``: one
        try only (see ``create_prediction``).

        Without ``constants.BULK_PREDICTIONS_FLAG`` on Label Studio (1.23.2), each call
        recounts the annotations and predictions of every task of the project (~0.5 ms of its
        CPU per task: 3.1 s at 6000), and predictions that do not fit the label config are
        silently dropped, so the count can be smaller than ``len(items)``: callers must
        compare. With it, ids are checked and stored in batches of its
        ``PREDICTION_IMPORT_BATCH_SIZE`` (500), only the tasks sent are recounted, nothing is
        checked against the label config, and a bad id fails the call after the batches before
        it were stored. Either way one task outside the project fails the call
        (LabelStudioError, 400).
        """
        if not items:
            return 0
        response = await self._sender.send(
            "POST",
            self._url(f"/api/projects/{int(project_id)}/import/predictions"),
            json_body=[item.to_json() for item in items],
            retries=None if retry else 0,
        )
        return _req_int(_object(_json(response), "import"), "created")

    async def bulk_is_cheap(self, project_id: int) -> bool:
        """Whether Label Studio's ``import/predictions`` runs its batched path
        (``constants.BULK_PREDICTIONS_FLAG`` set) for this project.

        Asked with one prediction for task 0, which no project holds: both paths refuse it
        with a 400 and store nothing, the batched one saying ``task ID 0 not found in
        project``, the legacy one otherwise (checked against 1.23.2 in the tests)."""
        url = self._url(f"/api/projects/{int(project_id)}/import/predictions")
        response = await self._sender.send(
            "POST",
            url,
            json_body=[{"task": 0, "result": [], "model_version": "ls-autoseg-probe"}],
            allow=frozenset({400}),
        )
        if response.status_code != 400:
            raise LabelStudioError(
                f"POST {url}: a prediction for task 0 answered {response.status_code}, not 400",
                status_code=response.status_code,
            )
        return _BATCHED_IMPORT_REFUSAL in response.text

    async def delete_prediction(self, prediction_id: int) -> None:
        await self._sender.send("DELETE", self._url(f"/api/predictions/{int(prediction_id)}/"))

    async def create_annotation(
        self, task_id: int, result: list[dict[str, Any]], **extra: Any
    ) -> Annotation:
        response = await self._sender.send(
            "POST",
            self._url(f"/api/tasks/{int(task_id)}/annotations/"),
            json_body={**extra, "result": result},
        )
        return _parse_annotation(_json(response))

    async def delete_annotation(self, annotation_id: int) -> None:
        await self._sender.send("DELETE", self._url(f"/api/annotations/{int(annotation_id)}/"))

    # -- webhooks -----------------------------------------------------------------------------

    async def list_webhooks(self, project_id: int) -> list[Webhook]:
        response = await self._sender.send(
            "GET", self._url("/api/webhooks/"), params={"project": int(project_id)}
        )
        return [_parse_webhook(item) for item in _list(_json(response), "webhooks")]

    async def create_webhook(
        self,
        project_id: int,
        url: str,
        headers: Mapping[str, str],
        actions: Sequence[str],
    ) -> Webhook:
        """Create an active webhook that sends payloads for ``actions`` only.

        With SSRF protection on (Label Studio >= 1.23.1), a loopback/private ``url`` is refused
        with 403: raised as LabelStudioError (not AuthError) with ``status_code`` 403; a host
        Label Studio cannot resolve gives ``status_code`` 500.
        """
        response = await self._sender.send(
            "POST",
            self._url("/api/webhooks/"),
            allow=frozenset({403}),
            json_body={
                "project": int(project_id),
                "url": url,
                "headers": dict(headers),
                "actions": list(actions),
                # defaults to true even when actions are given
                "send_for_all_actions": False,
                "send_payload": True,
                "is_active": True,
            },
        )
        return _parse_webhook(_json(_webhook_refused(response, url)))

    async def update_webhook(
        self,
        webhook_id: int,
        *,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        actions: Sequence[str] | None = None,
        is_active: bool = True,
        send_payload: bool = True,
    ) -> Webhook:
        """PATCH a webhook. Label Studio clears the actions of a PATCH that leaves them out, so
        the current ones are read and sent again when ``actions`` is None."""
        hook_url = self._url(f"/api/webhooks/{int(webhook_id)}/")
        if actions is None:
            actions = _parse_webhook(_json(await self._sender.send("GET", hook_url))).actions
        fields: dict[str, Any] = {
            "actions": list(actions),
            "send_for_all_actions": False,
            "send_payload": send_payload,
            "is_active": is_active,
        }
        if url is not None:
            fields["url"] = url
        if headers is not None:
            fields["headers"] = dict(headers)
        response = await self._sender.send(
            "PATCH", hook_url, json_body=fields, allow=frozenset({403})
        )
        return _parse_webhook(_json(_webhook_refused(response, url)))

    async def delete_webhook(self, webhook_id: int) -> None:
        await self._sender.send("DELETE", self._url(f"/api/webhooks/{int(webhook_id)}/"))
