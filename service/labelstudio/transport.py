"""How a request goes to Label Studio and how its answer comes back.

``Sender`` owns the ``httpx.AsyncClient``: it retries connection errors, timeouts, 429 and 5xx
with exponential backoff and jitter (or ``Retry-After``), never follows redirects on its own,
reads error answers only up to ``_ERROR_BODY_MAX_BYTES``, and maps the answers it does not
return to ``service.errors`` (the table is in the ``service.labelstudio`` docstring). Downloads
follow up to ``_MAX_REDIRECTS`` redirects by hand and stop at ``max_bytes``.

The token goes only to Label Studio's own origin (scheme, host and port of the base URL): other
hosts and presigned URLs are fetched without it, and once a download's redirects leave Label
Studio the token never comes back for that download. Every hop of a download is first checked
by ``urls`` (file paths only on Label Studio, public or allowed addresses elsewhere) and goes to
the address that was checked.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

from service.config.settings import url_problem
from service.constants import TOKEN_TYPES, TokenType
from service.errors import (
    AuthError,
    ConfigError,
    ImageError,
    LabelStudioError,
    LabelStudioUnavailable,
    NotFoundError,
    RefusedURL,
)
from service.labelstudio.auth import _NEW_PAT_HINT, Credentials, detect_token_type
from service.labelstudio.parse import _content_kind, _error_detail, _is_json
from service.labelstudio.urls import ImageHosts, label_studio_path_problem, shown_url

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_ERROR_BODY_MAX_BYTES = 256 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

_LEGACY_DISABLED_HINT = (
    "legacy tokens are disabled for this Label Studio organization: use a Personal Access Token "
    "(Account & Settings -> Personal Access Token), or let an administrator enable legacy tokens "
    "in Organization settings -> API Tokens (POST /api/jwt/settings "
    '{"legacy_api_tokens_enabled": true})'
)


class Sender:
    """Sends requests to one Label Studio; checks its URL and token first (ConfigError)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        token_type: TokenType,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        transport: httpx.AsyncBaseTransport | None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        image_hosts: ImageHosts | None = None,
    ) -> None:
        base = base_url.strip().rstrip("/")
        problem = url_problem(base)
        if problem:
            raise ConfigError(f"Label Studio URL {problem}")
        token = token.strip()
        if not token:
            raise ConfigError("the Label Studio token is empty")
        if token_type not in TOKEN_TYPES:
            raise ConfigError(
                f"token type must be {', '.join(TOKEN_TYPES[:-1])} or {TOKEN_TYPES[-1]},"
                f" got {token_type!r}"
            )
        self.base_url = base
        self._base = httpx.URL(base)
        self._origin = _origin(self._base)
        self.credentials = Credentials(
            token,
            detect_token_type(token) if token_type == "auto" else token_type,
            base_url=base,
            post=self._post_without_token,
        )
        self._retries = max(0, retries)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._random = random.Random()
        self._image_hosts = image_hosts or ImageHosts()
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
            # Label Studio sets a session cookie on token-authenticated requests; keeping it
            # would authenticate later requests by cookie and hide token problems.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            headers={"User-Agent": "ls-autoseg", "Accept": "application/json"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, path: str) -> str:
        return self.base_url + path

    def data_url(self, path: str) -> httpx.URL:
        """A root-relative task URL. Label Studio served under a path prefix writes the prefix
        into its upload URLs; the base URL carries it too, so it must not be doubled."""
        prefix = self._base.path.rstrip("/")
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return httpx.URL(f"{self._origin_str()}{path}")
        return httpx.URL(f"{self.base_url}{path}")

    def _origin_str(self) -> str:
        scheme, host, port = self._origin
        return f"{scheme}://{host}:{port}" if ":" not in host else f"{scheme}://[{host}]:{port}"

    def is_label_studio(self, url: httpx.URL) -> bool:
        return _origin(url) == self._origin

    async def _post_without_token(
        self, path: str, json_body: Any, allow: frozenset[int]
    ) -> httpx.Response:
        return await self.send("POST", self.url(path), auth=False, json_body=json_body, allow=allow)

    async def send(
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
        headers: Mapping[str, str] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """One request with retries. Returns 1xx-3xx and ``allow``-ed answers, raises for the
        rest. With ``stream`` the returned response is open: the caller closes it."""
        label = shown if shown is not None else shown_url(str(url))
        flow = self.credentials.flow() if auth else None
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                url,
                params=params,
                json=json_body,
                files=files,
                headers=headers,
                extensions=extensions,
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
                    raise self.error(method, url, response, external=external, shown=label)
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

    def error(
        self,
        method: str,
        url: str | httpx.URL,
        response: httpx.Response,
        *,
        external: bool = False,
        shown: str | None = None,
    ) -> LabelStudioError:
        status = response.status_code
        label = shown if shown is not None else shown_url(str(url))
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
        if self.credentials.token_type == "legacy":
            if self.credentials.is_jwt:
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

    async def fetch(self, target: httpx.URL, shown: str, max_bytes: int) -> bytes:
        """GET a file, following redirects by hand with the token only while on Label Studio's
        origin; ``shown`` names it in messages, over ``max_bytes`` raises ImageError."""
        with_auth = self.is_label_studio(target)
        for hop in range(_MAX_REDIRECTS + 1):
            where = shown if hop == 0 else f"{shown} (redirected to {shown_url(str(target))})"
            connect_to, headers, extensions = await self._checked(target, where)
            response = await self.send(
                "GET",
                connect_to,
                auth=with_auth,
                stream=True,
                external=not with_auth,
                shown=shown,
                headers=headers,
                extensions=extensions,
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
                    with_auth = with_auth and self.is_label_studio(target)
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

    async def _checked(
        self, target: httpx.URL, where: str
    ) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
        """Where to send one hop of a download, with its Host header and TLS name; RefusedURL
        for a URL that task data must not make us fetch (``urls``).

        A ``user:password@`` goes in an Authorization header, never in the URL sent: httpx
        logs URLs whole."""
        on_label_studio = self.is_label_studio(target)
        headers: dict[str, str] = {}
        if target.userinfo:
            if not on_label_studio:  # there the token's header wins
                pair = f"{target.username}:{target.password}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
            target = target.copy_with(userinfo=b"")
        if on_label_studio:
            problem = label_studio_path_problem(target, self._base.path)
            if problem is not None:
                raise RefusedURL(f"GET {where}: refused: {problem}")
            return target, headers, {}
        if target.scheme not in ("http", "https"):
            raise RefusedURL(f"GET {where}: refused: only http and https URLs are fetched")
        address = await self._image_hosts.address(target, where)
        if address is None:
            return target, headers, {}
        # Connect to the address just checked: resolving the name again would let a second
        # DNS answer point somewhere else. The name still goes in Host and in TLS (SNI and
        # certificate check).
        headers["Host"] = target.netloc.decode("ascii")
        extensions = {"sni_hostname": target.raw_host.decode("ascii")}
        return target.copy_with(host=address), headers, extensions


# ---------------------------------------------------------------------------------------------
# Answers and errors


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
        target = f" {shown_url(url)}" if url else ""
        detail = _error_detail(response) or "forbidden"
        raise LabelStudioError(f"Label Studio refused the webhook{target} (403: {detail})", 403)
    return response


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
