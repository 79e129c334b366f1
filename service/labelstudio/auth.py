"""Label Studio tokens, and the authentication of a request as an ``httpx.Auth`` flow.

A legacy key is sent as ``Authorization: Token <key>``. A Personal Access Token (a JWT refresh
token) is exchanged at ``POST /api/token/refresh/`` for an access token (5 minutes in Label
Studio) sent as ``Bearer``. The access token is refreshed ``ACCESS_REFRESH_MARGIN_S`` before it
expires, once for all the requests waiting on it; when Label Studio answers 401 to one that
looked fresh (a clock or a restarted server), the flow refreshes once and sends the request a
second time, as httpx's own Auth flows do.

Whether a request carries the token at all is the transport's choice: only requests to Label
Studio's own origin do (``service.labelstudio.transport``). Tokens never appear in messages or
logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal

import httpx

from service.errors import AuthError
from service.labelstudio.parse import (
    _content_kind,
    _error_detail,
    _is_json,
    _json,
    _object,
    _opt_str,
)

log = logging.getLogger(__name__)

TokenKind = Literal["pat", "legacy"]
"""How a token is sent once ``auto`` is resolved (``service.constants.TokenType``)."""

REFRESH_PATH = "/api/token/refresh/"
ACCESS_REFRESH_MARGIN_S = 30.0  # refresh a PAT's access token this long before it expires
DEFAULT_ACCESS_LIFETIME_S = 300.0  # Label Studio's access tokens live 5 minutes

# answers to the refresh that are reported (as AuthError), not retried
_REFRESH_REFUSALS = frozenset({400, 401, 403, 404, 405})
_LEGACY_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{40}$")

_NEW_PAT_HINT = (
    "create a new Personal Access Token in Label Studio under Account & Settings -> "
    "Personal Access Token"
)

PostWithoutToken = Callable[[str, Any, frozenset[int]], Awaitable[httpx.Response]]
"""``post(path, json_body, allow)``: a POST to Label Studio without a token, retried as any
request; it returns the answers in ``allow`` instead of raising for them."""


def _jwt_payload(token: str) -> dict[str, Any] | None:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def detect_token_type(token: str) -> TokenKind:
    """A JWT whose payload says ``"token_type": "refresh"`` is a PAT; anything else is legacy."""
    payload = _jwt_payload(token.strip())
    return "pat" if payload is not None and payload.get("token_type") == "refresh" else "legacy"


def _access_lifetime_s(access: str) -> float:
    """Lifetime from the access JWT's own ``exp - iat`` (immune to clock skew between hosts)."""
    payload = _jwt_payload(access) or {}
    exp, iat = payload.get("exp"), payload.get("iat")
    if isinstance(exp, int | float) and isinstance(iat, int | float) and exp > iat:
        return float(exp - iat)
    if isinstance(exp, int | float):
        return max(0.0, float(exp) - time.time())
    return DEFAULT_ACCESS_LIFETIME_S


class Credentials:
    """One client's token and, for a PAT, the access token all its requests share."""

    def __init__(
        self, token: str, token_type: TokenKind, *, base_url: str, post: PostWithoutToken
    ) -> None:
        self.token_type = token_type
        self._token = token
        self._base_url = base_url
        self._post = post
        self._access: str | None = None
        self._access_expires_at = 0.0  # time.monotonic() after which the access token is stale
        self._refresh_lock = asyncio.Lock()

    @property
    def is_jwt(self) -> bool:
        """The token is a JWT, whatever it is sent as (a PAT sent as legacy is refused)."""
        return _jwt_payload(self._token) is not None

    def flow(self) -> LabelStudioAuth:
        """The authentication of one call; its retries share one refresh after a 401."""
        return LabelStudioAuth(self)

    async def authorization(self) -> str:
        """The ``Authorization`` header's value (a PAT's access token may be refreshed first)."""
        if self.token_type == "legacy":
            return f"Token {self._token}"
        return f"Bearer {await self.access_token()}"

    async def access_token(self, *, stale: str | None = None) -> str:
        """A valid access token for the PAT; ``stale`` is one the server just refused."""
        access = self._access
        if stale is None and access is not None and time.monotonic() < self._access_expires_at:
            return access
        async with self._refresh_lock:
            access = self._access
            fresh = time.monotonic() < self._access_expires_at
            if access is not None and fresh and access != stale:
                return access  # another request refreshed while this one waited
            return await self._refresh_access()

    async def _refresh_access(self) -> str:
        response = await self._post(REFRESH_PATH, {"refresh": self._token}, _REFRESH_REFUSALS)
        status = response.status_code
        if status != 200 or not _is_json(response):
            raise AuthError(self._refresh_refused_message(response), status)
        access = _opt_str(_object(_json(response), "token refresh"), "access")
        if not access:
            raise AuthError(f"POST {REFRESH_PATH} answered without an access token", status)
        lifetime = _access_lifetime_s(access)
        margin = min(ACCESS_REFRESH_MARGIN_S, lifetime / 2)
        self._access = access
        self._access_expires_at = time.monotonic() + lifetime - margin
        log.debug("refreshed the Label Studio access token (valid %.0f s)", lifetime)
        return access

    def _refresh_refused_message(self, response: httpx.Response) -> str:
        status = response.status_code
        if status in (404, 405) or not _is_json(response):
            return (
                f"{self._base_url} answered {status} {_content_kind(response)} to "
                "POST /api/token/refresh/: either the URL is not Label Studio, or this Label "
                "Studio is too old for Personal Access Tokens (use its legacy token with token "
                "type 'legacy')."
            )
        detail = _error_detail(response) or f"HTTP {status}"
        if _LEGACY_TOKEN_RE.match(self._token):
            return (
                f"Label Studio refused the token as a Personal Access Token ({detail}): it looks "
                "like a legacy token (40 hex characters). Use token type 'legacy' or 'auto'."
            )
        return (
            f"Label Studio refused the Personal Access Token at POST /api/token/refresh/ "
            f"({detail}): it was revoked, has expired, or belongs to another Label Studio "
            f"server: {_NEW_PAT_HINT}."
        )


class LabelStudioAuth(httpx.Auth):
    """The ``httpx.Auth`` flow of one call (async clients only): the token goes along, and a
    PAT's refused access token is refreshed and the request sent again, once per call (its
    retries after a 429 or 5xx included)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._refreshed_on_401 = False

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        credentials = self._credentials
        request.headers["Authorization"] = await credentials.authorization()
        response = yield request
        if response.status_code != 401 or credentials.token_type != "pat" or self._refreshed_on_401:
            return
        self._refreshed_on_401 = True
        await response.aread()  # the refusal is short: free its connection for the refresh
        stale = request.headers["Authorization"].removeprefix("Bearer ")
        await credentials.access_token(stale=stale)
        request.headers["Authorization"] = await credentials.authorization()
        yield request
