"""The async Label Studio (1.23.2) client: the only module that speaks Label Studio's HTTP API.

Label Studio's JSON is parsed once, here, into the frozen dataclasses below; nothing outside this
module sees a raw answer. Errors follow ``service.errors``::

    404                              -> NotFoundError
    401 / 403                        -> AuthError (the message names the likely cause and the fix);
                                        a 403 to a webhook (SSRF protection) -> LabelStudioError
    other 4xx                        -> LabelStudioError(status_code=...)
    connection error, timeout, 429, 5xx, after ``retries`` retries -> LabelStudioUnavailable
    (except 1.23.2's 500s that are really permanent: unknown upload -> NotFoundError,
    unresolvable webhook host -> LabelStudioError)
    download over ``max_bytes``      -> ImageError

Authentication: a Personal Access Token (a JWT refresh token) is exchanged at
``POST /api/token/refresh/`` for a 5-minute access token sent as ``Bearer``; a legacy key is sent
as ``Token``. Tokens never appear in messages or logs, and never go to a host other than Label
Studio's own (file downloads from other hosts and presigned URLs are fetched without them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import mimetypes
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from types import TracebackType
from typing import Any, Self

import httpx

from service.constants import HTTP_SCHEMES, TokenType
from service.errors import (
    AuthError,
    ConfigError,
    ImageError,
    LabelStudioError,
    LabelStudioUnavailable,
    NotFoundError,
)
from service.labelstudio.auth import _NEW_PAT_HINT, Credentials, detect_token_type
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
from service.labelstudio.types import (
    CLOUD_SCHEMES,
    DEFAULT_MAX_BYTES,
    MAX_FILES_PER_IMPORT,
    MAX_TASKS_PER_READ,
    Annotation,
    PredictionIn,
    Project,
    Task,
    Webhook,
)

log = logging.getLogger(__name__)


_MAX_REDIRECTS = 5
_ERROR_BODY_MAX_BYTES = 256 * 1024
_DETAIL_MAX_CHARS = 300
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

_LEGACY_DISABLED_HINT = (
    "legacy tokens are disabled for this Label Studio organization: use a Personal Access Token "
    "(Account & Settings -> Personal Access Token), or let an administrator enable legacy tokens "
    "in Organization settings -> API Tokens (POST /api/jwt/settings "
    '{"legacy_api_tokens_enabled": true})'
)


# ---------------------------------------------------------------------------------------------
# The client


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
        token_type: TokenType = "auto",
        *,
        timeout_s: float = 30.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        base = base_url.strip().rstrip("/")
        if not base.lower().startswith(HTTP_SCHEMES):
            raise ConfigError(
                f"Label Studio URL must start with http:// or https://, got {base_url!r}"
            )
        token = token.strip()
        if not token:
            raise ConfigError("the Label Studio token is empty")
        if token_type not in ("auto", "pat", "legacy"):
            raise ConfigError(f"token type must be auto, pat or legacy, got {token_type!r}")
        self.base_url = base
        self._base = httpx.URL(base)
        self._origin = _origin(self._base)
        self._credentials = Credentials(
            token,
            detect_token_type(token) if token_type == "auto" else token_type,
            base_url=base,
            post=self._post_without_token,
        )
        self.token_type = self._credentials.token_type
        self._retries = max(0, retries)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._random = random.Random()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
            # Label Studio sets a session cookie on token-authenticated requests; keeping it
            # would authenticate later requests by cookie and hide token problems.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            headers={"User-Agent": "ls-autoseg", "Accept": "application/json"},
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
        await self._http.aclose()

    # -- account ------------------------------------------------------------------------------

    async def verify(self, *, retries: int | None = None) -> str:
        """Check the URL and the token; return the user's email (or username).

        ``retries`` overrides the client's own (a health probe wants an answer now)."""
        url = self._url("/api/current-user/whoami")
        response = await self._send("GET", url, allow=frozenset({404}), retries=retries)
        if response.status_code == 404 or not _is_json(response):
            raise LabelStudioError(
                f"{self.base_url} does not look like Label Studio: GET /api/current-user/whoami "
                f"answered {response.status_code} {_content_kind(response)}. Check the URL "
                "(scheme, host, port, and any path prefix Label Studio is served under).",
                response.status_code,
            )
        body = _object(_json(response), "whoami")
        who = _opt_str(body, "email") or _opt_str(body, "username")
        if not who:
            raise LabelStudioError("Label Studio's whoami answer has no email or username")
        return who

    async def create_pat(self, *, replace_existing: bool = False) -> str:
        """Create a Personal Access Token for the authenticated user (tests, quickstart).

        Label Studio allows one live PAT per user (409 otherwise). With ``replace_existing``
        the user's existing PATs are revoked (blacklisted) first: clients using them stop
        working once their current access token expires.
        """
        url = self._url("/api/token/")
        response = await self._send("POST", url, allow=frozenset({409}))
        if response.status_code == 409:
            if not replace_existing:
                raise LabelStudioError(
                    "this user already has a Personal Access Token (Label Studio allows one); "
                    "revoke it in Account & Settings or pass replace_existing=True",
                    409,
                )
            listed = _json(await self._send("GET", url))
            for item in listed if isinstance(listed, list) else []:
                truncated = _opt_str(_object(item, "token"), "token")
                if truncated:
                    await self._send(
                        "POST",
                        self._url("/api/token/blacklist/"),
                        json_body={"refresh": truncated},
                        allow=frozenset({404}),  # already revoked
                    )
            response = await self._send("POST", url)
        token = _opt_str(_object(_json(response), "token"), "token")
        if not token:
            raise LabelStudioError("Label Studio's answer to POST /api/token/ has no token")
        return token

    # -- projects and tasks -------------------------------------------------------------------

    async def get_project(self, project_id: int) -> Project:
        response = await self._send("GET", self._url(f"/api/projects/{int(project_id)}/"))
        return _parse_project(_json(response))

    async def list_projects(self) -> list[Project]:
        """Every project the user can see, a page at a time."""
        projects: list[Project] = []
        page = 1
        while True:
            response = await self._send(
                "GET", self._url("/api/projects/"), params={"page": page, "page_size": 100}
            )
            body = _object(_json(response), "project list")
            projects.extend(_parse_project(raw) for raw in _list(body.get("results"), "results"))
            if not body.get("next"):
                return projects
            page += 1

    async def create_project(self, title: str, label_config: str) -> Project:
        response = await self._send(
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
    ) -> tuple[list[Task] | None, int | None]:
        """One page of the task list and the total if Label Studio gave it; ``None`` for a
        page past the end (Label Studio answers 404 "Invalid page.")."""
        url = self._url("/api/tasks/")
        params: dict[str, str | int] = {
            "project": int(project_id),
            "page_size": int(page_size),
            "page": int(page),
        }
        if fields_all:
            params["fields"] = "all"
        if query is not None:
            params["query"] = json.dumps(query, separators=(",", ":"))
        response = await self._send("GET", url, params=params, allow=frozenset({404}))
        if response.status_code == 404:
            if page > 1 and _error_detail(response) == "Invalid page.":
                return None, None
            raise self._error("GET", url, response)
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
        wanted = list(dict.fromkeys(int(task_id) for task_id in task_ids))
        found: dict[int, Task] = {}
        for start in range(0, len(wanted), MAX_TASKS_PER_READ):
            chunk = wanted[start : start + MAX_TASKS_PER_READ]
            tasks, _ = await self.task_page(
                project_id,
                page_size=len(chunk),
                fields_all=True,
                query={"selectedItems": {"all": False, "included": chunk}},
            )
            for task in tasks or []:
                if task.id in chunk:
                    found[task.id] = task
        return found

    async def get_task(self, task_id: int) -> Task:
        """One task with its annotations and predictions."""
        response = await self._send("GET", self._url(f"/api/tasks/{int(task_id)}/"))
        return _parse_task(_json(response))

    async def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        """Import tasks given as JSON (``{"data": {...}, ...}``); return the new task ids."""
        if not tasks:
            return []
        response = await self._send(
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
                _json(await self._send("POST", url, params=params, files=parts)), "import"
            )
            key = "task_ids" if commit else "file_upload_ids"
            ids.extend(_int_list(body.get(key), key))
        return ids

    async def reimport(self, project_id: int, file_upload_ids: Sequence[int]) -> int:
        """Create tasks from uploaded-but-uncommitted files (the web UI's second import step).

        Returns the number of tasks created. Label Studio emits TASKS_CREATED inside this
        request's database transaction.
        """
        response = await self._send(
            "POST",
            self._url(f"/api/projects/{int(project_id)}/reimport"),
            json_body={"file_upload_ids": list(file_upload_ids), "files_as_tasks_list": False},
        )
        return _opt_int(_object(_json(response), "reimport"), "task_count") or 0

    # -- predictions and annotations ----------------------------------------------------------

    async def create_prediction(self, prediction: PredictionIn, *, retry: bool = True) -> int:
        """Create one prediction. ``retry=False`` makes one try only: a POST that timed out
        may have been applied, so a caller that must not duplicate checks and tries again."""
        response = await self._send(
            "POST",
            self._url("/api/predictions/"),
            json_body=prediction.to_json(),
            retries=None if retry else 0,
        )
        return _req_int(_object(_json(response), "prediction"), "id")

    async def import_predictions(self, project_id: int, items: Sequence[PredictionIn]) -> int:
        """Bulk-create predictions; return how many Label Studio created.

        Label Studio 1.23.2 silently drops predictions that do not fit the label config, so the
        count can be smaller than ``len(items)``: callers must compare. One task outside the
        project fails the whole request (LabelStudioError, 400). Each call recounts the
        annotations and predictions of every task of the project (~0.5 ms of its CPU per
        predicted task): fine for a batch command, not for a stream of small batches.
        """
        if not items:
            return 0
        response = await self._send(
            "POST",
            self._url(f"/api/projects/{int(project_id)}/import/predictions"),
            json_body=[item.to_json() for item in items],
        )
        return _req_int(_object(_json(response), "import"), "created")

    async def delete_prediction(self, prediction_id: int) -> None:
        await self._send("DELETE", self._url(f"/api/predictions/{int(prediction_id)}/"))

    async def create_annotation(
        self, task_id: int, result: list[dict[str, Any]], **extra: Any
    ) -> Annotation:
        response = await self._send(
            "POST",
            self._url(f"/api/tasks/{int(task_id)}/annotations/"),
            json_body={**extra, "result": result},
        )
        return _parse_annotation(_json(response))

    async def delete_annotation(self, annotation_id: int) -> None:
        await self._send("DELETE", self._url(f"/api/annotations/{int(annotation_id)}/"))

    # -- webhooks -----------------------------------------------------------------------------

    async def list_webhooks(self, project_id: int) -> list[Webhook]:
        response = await self._send(
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
        response = await self._send(
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
            actions = _parse_webhook(_json(await self._send("GET", hook_url))).actions
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
        response = await self._send("PATCH", hook_url, json_body=fields, allow=frozenset({403}))
        return _parse_webhook(_json(_webhook_refused(response, url)))

    async def delete_webhook(self, webhook_id: int) -> None:
        await self._send("DELETE", self._url(f"/api/webhooks/{int(webhook_id)}/"))

    # -- files --------------------------------------------------------------------------------

    async def download(
        self, task_id: int, url: str, *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> bytes:
        """The bytes behind a task data URL.

        ``/data/upload/...``, ``/data/local-files/?d=...`` and absolute URLs on Label Studio's
        own host are fetched with the token; other http(s) hosts without it (also after a
        redirect back); ``s3://``, ``gs://`` and ``azure-blob://`` URIs through
        ``/tasks/{task_id}/resolve/``, whose presigned redirect is followed without the token.
        More than ``max_bytes`` raises ImageError.
        """
        url = url.strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in CLOUD_SCHEMES:
            return await self._download_cloud(task_id, url, max_bytes)
        shown = _strip_query(url)
        if url.startswith("/") and not url.startswith("//"):
            if url.startswith("/data/local-files"):
                shown = url  # ?d= is the file's path, not a secret
            return await self._fetch(self._data_url(url), shown, max_bytes)
        if scheme in ("http", "https"):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise LabelStudioError(f"task {task_id}: invalid image URL {shown}: {exc}") from exc
            return await self._fetch(target, shown, max_bytes)
        raise LabelStudioError(
            f"task {task_id}: cannot download {shown[:200]!r}: expected /data/..., http(s)://, "
            "s3://, gs:// or azure-blob://"
        )

    async def _download_cloud(self, task_id: int, uri: str, max_bytes: int) -> bytes:
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode("ascii")
        resolve = httpx.URL(
            self._url(f"/tasks/{int(task_id)}/resolve/"), params={"fileuri": fileuri}
        )
        try:
            # messages show the bucket and key, never the presigned URL's signature
            return await self._fetch(resolve, uri, max_bytes)
        except NotFoundError as exc:
            raise NotFoundError(
                f"task {task_id}: {uri} not found: Label Studio could not resolve it (no cloud "
                "storage of the project matches the bucket, or the task is gone), or the storage "
                f"has no such object ({exc})",
                404,
            ) from exc

    async def _fetch(self, target: httpx.URL, shown: str, max_bytes: int) -> bytes:
        with_auth = self._is_label_studio(target)
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self._send(
                "GET", target, auth=with_auth, stream=True, external=not with_auth, shown=shown
            )
            try:
                if response.status_code in _REDIRECT_CODES:
                    location = response.headers.get("location")
                    if not location:
                        raise LabelStudioError(
                            f"GET {shown}: redirect {response.status_code} without a Location",
                            response.status_code,
                        )
                    target = target.join(location)
                    # once off Label Studio's host, the token never comes back
                    with_auth = with_auth and self._is_label_studio(target)
                    continue
                if not 200 <= response.status_code < 300:
                    raise LabelStudioError(
                        f"GET {shown}: unexpected answer {response.status_code}",
                        response.status_code,
                    )
                return await _read_capped(response, max_bytes, shown)
            finally:
                await response.aclose()
        raise LabelStudioError(f"GET {shown}: more than {_MAX_REDIRECTS} redirects")

    # -- transport ----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _data_url(self, path: str) -> httpx.URL:
        """A root-relative task URL. Label Studio served under a path prefix writes the prefix
        into its upload URLs; the base URL carries it too, so it must not be doubled."""
        prefix = self._base.path.rstrip("/")
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return httpx.URL(f"{self._origin_str()}{path}")
        return httpx.URL(f"{self.base_url}{path}")

    def _origin_str(self) -> str:
        scheme, host, port = self._origin
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    def _is_label_studio(self, url: httpx.URL) -> bool:
        return _origin(url) == self._origin

    async def _post_without_token(
        self, path: str, json_body: Any, allow: frozenset[int]
    ) -> httpx.Response:
        return await self._send(
            "POST", self._url(path), auth=False, json_body=json_body, allow=allow
        )

    async def _send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        auth: bool = True,
        params: Mapping[str, str | int] | None = None,
        json_body: Any = None,
        files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
        allow: frozenset[int] = frozenset(),
        stream: bool = False,
        external: bool = False,
        shown: str | None = None,
        retries: int | None = None,
    ) -> httpx.Response:
        """One request with retries. Returns 1xx-3xx and ``allow``-ed answers, raises for the
        rest. With ``stream`` the returned response is open: the caller closes it."""
        label = shown if shown is not None else _strip_query(str(url))
        flow = self._credentials.flow() if auth else None
        attempt = 0
        while True:
            request = self._http.build_request(
                method, url, params=params, json=json_body, files=files
            )
            retry_after: float | None = None
            try:
                response = await self._http.send(request, stream=True, auth=flow)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                reason = _transport_reason(exc)
            except httpx.HTTPError as exc:
                raise LabelStudioError(f"{method} {label}: {type(exc).__name__}: {exc}") from exc
            else:
                status = response.status_code
                if status < 400 or status in allow:
                    if not stream:
                        try:
                            await response.aread()
                        finally:
                            await response.aclose()
                    return response
                response = await _read_error_body(response)
                if status != 429 and status < 500:
                    raise self._error(method, url, response, external=external, shown=label)
                permanent = _permanent_5xx(method, label, request, response)
                if permanent is not None:
                    raise permanent
                reason = f"HTTP {status}"
                detail = _error_detail(response)
                if detail:
                    reason += f" ({detail})"
                retry_after = _retry_after_s(response)
            if attempt >= (self._retries if retries is None else retries):
                where = "" if external else " Label Studio"
                raise LabelStudioUnavailable(
                    f"{method} {label} failed after {attempt + 1} tries:{where} {reason}"
                )
            delay = self._delay(attempt, retry_after)
            log.warning(
                "%s %s: %s; retry %d/%d in %.1f s",
                method,
                label,
                reason,
                attempt + 1,
                self._retries,
                delay,
            )
            await self._sleep(delay)
            attempt += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self._max_backoff_s)
        ceiling = min(self._max_backoff_s, self._backoff_s * (2.0**attempt))
        return ceiling * (0.5 + 0.5 * self._random.random())

    def _error(
        self,
        method: str,
        url: str | httpx.URL,
        response: httpx.Response,
        *,
        external: bool = False,
        shown: str | None = None,
    ) -> LabelStudioError:
        status = response.status_code
        label = shown if shown is not None else _strip_query(str(url))
        detail = _error_detail(response)
        if "html" in _content_kind(response) and not external:
            detail = f"{_content_kind(response)}; is {self.base_url} the Label Studio URL?"
        text = f"{method} {label}: {status}" + (f" {detail}" if detail else "")
        if status == 404:
            return NotFoundError(text, status)
        if status in (401, 403) and not external:
            return AuthError(self._auth_message(method, label, response), status)
        return LabelStudioError(text, status)

    def _auth_message(self, method: str, label: str, response: httpx.Response) -> str:
        status = response.status_code
        where = f"{method} {label}"
        if not _is_json(response):
            return (
                f"{where} answered {status} with {_content_kind(response)}, not Label Studio's "
                f"JSON: check the URL {self.base_url} (a proxy or login page may be in front of "
                "Label Studio)."
            )
        detail = _error_detail(response) or f"HTTP {status}"
        lowered = detail.lower()
        if "legacy token authentication has been disabled" in lowered:
            return f"Label Studio refused the token on {where} ({detail}): {_LEGACY_DISABLED_HINT}."
        if status == 403:
            return (
                f"Label Studio refused {where} (403: {detail}): the token's user lacks permission "
                "for this project or action; use a token of a user who has access."
            )
        if self.token_type == "legacy":
            if self._credentials.is_jwt:
                return (
                    f"Label Studio refused the token on {where} ({detail}): it is a Personal "
                    "Access Token (a JWT) but was sent as a legacy token. Use token type 'pat' "
                    "or 'auto'."
                )
            if "invalid token" in lowered:
                return (
                    f"Label Studio refused the legacy token on {where} ({detail}): it is wrong, "
                    "was reset, or belongs to another server. Copy it again from Account & "
                    f"Settings, or {_NEW_PAT_HINT} and use that."
                )
        elif "not provided" in lowered or "not valid" in lowered:
            return (
                f"Label Studio did not accept the access token obtained from the Personal Access "
                f"Token on {where} ({detail}): Personal Access Tokens may be disabled for this "
                "organization (Organization settings -> API Tokens, /api/jwt/settings "
                "api_tokens_enabled), or a proxy drops the Authorization header."
            )
        return f"Label Studio refused the token on {where} ({status}: {detail})."


# ---------------------------------------------------------------------------------------------
# HTTP helpers


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    scheme = url.scheme.lower()
    port = url.port if url.port is not None else (443 if scheme == "https" else 80)
    return scheme, url.host.lower(), port


def _permanent_5xx(
    method: str, label: str, request: httpx.Request, response: httpx.Response
) -> LabelStudioError | None:
    """500s of Label Studio 1.23.2 that retrying cannot fix.

    An unknown /data/upload/ file (its view calls ``has_permission`` on None) is a 404; a
    webhook URL whose host does not resolve (SSRF check on) is a bad request.
    """
    if response.status_code != 500:
        return None
    detail = _error_detail(response)
    if "/data/upload/" in request.url.path and "has_permission" in detail:
        return NotFoundError(f"{method} {label}: no such uploaded file", 404)
    if detail.startswith("Can't resolve hostname"):
        return LabelStudioError(f"{method} {label}: 500 {detail}", 500)
    return None


def _webhook_refused(response: httpx.Response, url: str | None) -> httpx.Response:
    """A 403 to a webhook is mostly SSRF protection refusing the URL: not a token problem."""
    if response.status_code == 403:
        target = f" {_strip_query(url)}" if url else ""
        detail = _error_detail(response) or "forbidden"
        raise LabelStudioError(f"Label Studio refused the webhook{target} (403: {detail})", 403)
    return response


def _strip_query(url: str) -> str:
    """A URL fit for messages: query strings may carry signatures."""
    return url.split("?", 1)[0].split("#", 1)[0]


async def _read_error_body(response: httpx.Response) -> httpx.Response:
    """Read an error answer (bounded: a 5xx to a download may be large) into a closed copy."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= _ERROR_BODY_MAX_BYTES:
                break
    except httpx.HTTPError:
        chunks = []
    finally:
        await response.aclose()
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=response.request
    )


async def _read_capped(response: httpx.Response, max_bytes: int, shown: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"{shown} is {int(declared)} bytes, over the {max_bytes}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise ImageError(f"{shown} is over the {max_bytes}-byte limit")
            chunks.append(chunk)
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise LabelStudioUnavailable(f"GET {shown}: {_transport_reason(exc)}") from exc
    return b"".join(chunks)


def _transport_reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})" if str(exc) else "cannot connect"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
