"""Unit tests of service.labelstudio for what a real Label Studio cannot do on demand.

Retries, timeouts, refusing connections, 429, access tokens that expire mid-run, concurrency,
other hosts and presigned redirects: ``httpx.MockTransport`` plays the network. Everything else
is tested against a real Label Studio in test_labelstudio_real.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.errors import (
    AuthError,
    ImageError,
    LabelStudioError,
    LabelStudioUnavailable,
    NotFoundError,
)
from service.labelstudio import PredictionIn
from service.labelstudio.auth import detect_token_type
from service.labelstudio.client import LabelStudioClient
from service.labelstudio.webhooks import ensure_webhook

LS = "http://ls.test"
LEGACY = "0123456789abcdef0123456789abcdef01234567"

Handler = (
    Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]
)


def jwt(payload: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


PAT = jwt({"token_type": "refresh", "exp": 8102758071, "iat": 1795558071, "user_id": "1"})


def access_token(n: int, lifetime: float = 300) -> str:
    return jwt({"token_type": "access", "iat": 1000, "exp": 1000 + lifetime, "jti": str(n)})


def ls_error(status: int, detail: str, **extra: Any) -> httpx.Response:
    body = {"id": "x", "status_code": status, "version": "1.23.2", "detail": detail}
    body["exc_info"] = None
    return httpx.Response(status, json={**body, **extra})


@dataclass
class Sleeps:
    """Stands in for asyncio.sleep: records the delays, waits for none."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


PUBLIC_IP = "93.184.216.34"


async def public_dns(host: str, port: int) -> list[str]:
    """Every name is one public address: these tests are about Label Studio, not hosts."""
    return [PUBLIC_IP]


def named(request: httpx.Request) -> httpx.URL:
    """The URL as the task gave it: downloads connect to the checked address, the name goes in
    the Host header."""
    return request.url.copy_with(netloc=request.headers["host"].encode())


def client(
    handler: Handler,
    token: str = LEGACY,
    sleeps: Sleeps | None = None,
    **kwargs: Any,
) -> LabelStudioClient:
    kwargs.setdefault("retries", 3)
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("resolver", public_dns)
    return LabelStudioClient(
        kwargs.pop("base_url", LS),
        token,
        transport=httpx.MockTransport(handler),
        sleep=sleeps or Sleeps(),
        **kwargs,
    )


WHOAMI = {"id": 1, "email": "admin@example.com", "username": ""}


# -- retries --------------------------------------------------------------------------------


def test_503_then_success_retries_once_with_backoff() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return ls_error(503, "Service Unavailable")
        return httpx.Response(200, json=WHOAMI)

    sleeps = Sleeps()

    async def run() -> str:
        async with client(handler, sleeps=sleeps, backoff_s=0.2) as ls:
            return await ls.verify()

    assert asyncio.run(run()) == "admin@example.com"
    assert len(calls) == 2
    assert len(sleeps.delays) == 1
    assert 0.1 <= sleeps.delays[0] <= 0.2  # backoff_s with jitter in [1/2, 1]


def test_5xx_exhausted_backs_off_exponentially_then_unavailable() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return ls_error(502, "Bad Gateway")

    sleeps = Sleeps()

    async def run() -> None:
        async with client(handler, sleeps=sleeps, retries=4, backoff_s=1.0, max_backoff_s=5) as ls:
            await ls.get_project(3)

    with pytest.raises(LabelStudioUnavailable, match=r"after 5 tries.*502") as info:
        asyncio.run(run())
    assert "/api/projects/3/" in str(info.value)
    assert len(calls) == 5
    ceilings = [1.0, 2.0, 4.0, 5.0]  # doubling, capped at max_backoff_s
    assert len(sleeps.delays) == 4
    for delay, ceiling in zip(sleeps.delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_timeouts_are_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(200, json=WHOAMI)

    async def run() -> str:
        async with client(handler) as ls:
            return await ls.verify()

    assert asyncio.run(run()) == "admin@example.com"
    assert len(calls) == 3


def test_connection_errors_exhausted_raise_unavailable() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("Connection refused", request=request)

    async def run() -> None:
        async with client(handler, retries=2) as ls:
            await ls.verify()

    with pytest.raises(LabelStudioUnavailable, match=r"after 3 tries.*cannot connect"):
        asyncio.run(run())
    assert len(calls) == 3


def test_429_honours_retry_after_capped_by_max_backoff() -> None:
    answers = [
        httpx.Response(429, headers={"Retry-After": "2"}, json={"detail": "slow down"}),
        httpx.Response(429, headers={"Retry-After": "120"}, json={"detail": "slow down"}),
        httpx.Response(200, json=WHOAMI),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    sleeps = Sleeps()

    async def run() -> str:
        async with client(handler, sleeps=sleeps, max_backoff_s=30) as ls:
            return await ls.verify()

    assert asyncio.run(run()) == "admin@example.com"
    assert sleeps.delays == [2.0, 30.0]


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, LabelStudioError), (404, NotFoundError), (409, LabelStudioError)],
)
def test_other_4xx_are_not_retried(status: int, error: type[LabelStudioError]) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        traceback = "Traceback (most recent call last): SECRET-TRACE"
        return ls_error(
            status,
            "Validation error",
            exc_info=traceback,
            validation_errors={"title": ["too short"]},
        )

    async def run() -> None:
        async with client(handler) as ls:
            await ls.create_project("p", "<View/>")

    with pytest.raises(error) as info:
        asyncio.run(run())
    assert len(calls) == 1
    assert info.value.status_code == status
    assert "too short" in str(info.value)
    assert "SECRET-TRACE" not in str(info.value)


# -- access tokens from a PAT -----------------------------------------------------------------


@dataclass
class FakeAuthServer:
    """Issues access tokens for PAT and accepts only the ones it still considers valid."""

    lifetime: float = 300
    refresh_delay: float = 0.0
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    api_calls: list[str] = field(default_factory=list)
    refused: int = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/token/refresh/":
            assert "authorization" not in request.headers
            assert json.loads(request.content) == {"refresh": PAT}
            await asyncio.sleep(self.refresh_delay)
            token = access_token(len(self.issued), self.lifetime)
            self.issued.append(token)
            return httpx.Response(200, json={"access": token})
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.api_calls.append(bearer)
        if bearer not in self.issued or bearer in self.revoked:
            self.refused += 1
            return ls_error(401, "Authentication credentials were not provided.")
        return httpx.Response(200, json=WHOAMI)


def test_pat_is_detected_and_exchanged_for_a_bearer_access_token() -> None:
    server = FakeAuthServer()

    async def run() -> None:
        async with client(server, token=PAT) as ls:
            assert ls.token_type == "pat"
            await ls.verify()
            await ls.verify()

    asyncio.run(run())
    assert len(server.issued) == 1  # cached for its lifetime
    assert server.api_calls == [server.issued[0]] * 2


def test_access_token_near_expiry_is_refreshed_before_use() -> None:
    # a 1 s lifetime: the client treats it as stale after half of it (margin is min(30 s, 1/2))
    server = FakeAuthServer(lifetime=1.0)

    async def run() -> None:
        async with client(server, token=PAT) as ls:
            await ls.verify()
            await asyncio.sleep(0.6)
            server.revoked.add(server.issued[0])  # the server would now refuse it
            await ls.verify()

    asyncio.run(run())
    assert len(server.issued) == 2
    assert server.refused == 0  # refreshed before use, not after a 401
    assert server.api_calls == server.issued


def test_401_triggers_exactly_one_refresh_then_success() -> None:
    server = FakeAuthServer()

    async def run() -> None:
        async with client(server, token=PAT) as ls:
            await ls.verify()
            server.revoked.add(server.issued[0])  # e.g. Label Studio restarted with a new key
            await ls.verify()

    asyncio.run(run())
    assert len(server.issued) == 2
    assert server.refused == 1
    assert server.api_calls == [server.issued[0], server.issued[0], server.issued[1]]


def test_401_after_a_fresh_refresh_gives_up_with_auth_error() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/api/token/refresh/":
            return httpx.Response(200, json={"access": access_token(len(calls))})
        return ls_error(401, "Authentication credentials were not provided.")

    async def run() -> None:
        async with client(handler, token=PAT) as ls:
            await ls.verify()

    with pytest.raises(AuthError, match="Personal Access Tokens may be disabled") as info:
        asyncio.run(run())
    assert info.value.status_code == 401
    assert calls == ["/api/token/refresh/", "/api/current-user/whoami"] * 2
    assert PAT not in str(info.value)


def test_concurrent_requests_share_one_refresh() -> None:
    server = FakeAuthServer(refresh_delay=0.05)

    async def run() -> None:
        async with client(server, token=PAT) as ls:
            await asyncio.gather(*(ls.verify() for _ in range(10)))
            server.revoked.add(server.issued[0])
            await asyncio.gather(*(ls.verify() for _ in range(10)))

    asyncio.run(run())
    assert len(server.issued) == 2  # one at start, one after the 401s, not one per request
    assert server.refused == 10


def test_token_type_detection() -> None:
    assert detect_token_type(PAT) == "pat"
    assert detect_token_type(LEGACY) == "legacy"
    assert detect_token_type(access_token(1)) == "legacy"  # not a refresh token
    assert detect_token_type("not.a.jwt") == "legacy"


def test_html_401_names_the_url_not_the_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, html="<html>proxy login</html>")

    async def run() -> None:
        async with client(handler) as ls:
            await ls.verify()

    with pytest.raises(AuthError, match="check the URL") as info:
        asyncio.run(run())
    assert LEGACY not in str(info.value)


def test_session_cookies_are_not_kept() -> None:
    cookies: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cookies.append(request.headers.get("cookie"))
        return httpx.Response(200, json=WHOAMI, headers={"set-cookie": "sessionid=abc; Path=/"})

    async def run() -> None:
        async with client(handler) as ls:
            await ls.verify()
            await ls.verify()

    asyncio.run(run())
    assert cookies == [None, None]


# -- downloads ------------------------------------------------------------------------------


@dataclass
class Hosts:
    """Label Studio at ls.test plus other hosts; records every request's auth header."""

    seen: list[tuple[str, str | None]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = named(request)
        self.seen.append((str(url), request.headers.get("authorization")))
        if url.host == "ls.test":
            if url.path.startswith("/tasks/7/resolve/"):
                uri = base64.urlsafe_b64decode(url.params["fileuri"]).decode()
                if uri == "s3://bucket/a b.png":
                    signed = "https://bucket.s3.test/a%20b.png?X-Amz-Signature=SIGNED"
                    return httpx.Response(303, headers={"location": signed})
                if uri == "gs://bucket/proxied.png":
                    return httpx.Response(200, content=b"proxied bytes")
                return httpx.Response(404)
            if request.headers.get("authorization") != f"Token {LEGACY}":
                return ls_error(401, "Authentication credentials were not provided.")
            return httpx.Response(200, content=f"ls:{url.path}".encode())
        if url.host == "bucket.s3.test":
            if url.path == "/expired.png":
                return httpx.Response(403, text="<Error>Request has expired</Error>")
            return httpx.Response(200, content=b"s3 bytes")
        if url.host == "cdn.test":
            if url.path == "/back-to-ls.png":
                return httpx.Response(302, headers={"location": "http://ls.test/data/upload/1/x"})
            return httpx.Response(200, content=b"cdn bytes")
        raise AssertionError(f"unexpected host {url.host}")


def test_relative_and_same_host_urls_are_fetched_with_the_token() -> None:
    hosts = Hosts()

    async def run() -> list[bytes]:
        async with client(hosts) as ls:
            return [
                await ls.files.download(1, "/data/upload/1/abc-img_0.jpg"),
                await ls.files.download(1, "http://ls.test/data/upload/1/abc-img_0.jpg"),
                await ls.files.download(1, "/data/local-files/?d=images/a.png"),
            ]

    assert asyncio.run(run()) == [b"ls:/data/upload/1/abc-img_0.jpg"] * 2 + [
        b"ls:/data/local-files/"
    ]
    assert [auth for _, auth in hosts.seen] == [f"Token {LEGACY}"] * 3
    assert hosts.seen[2][0] == "http://ls.test/data/local-files/?d=images/a.png"


def test_url_prefix_is_not_doubled() -> None:
    hosts = Hosts()

    async def run() -> None:
        async with client(hosts, base_url="http://ls.test/label-studio/") as ls:
            await ls.files.download(
                1, "/label-studio/data/upload/1/a.png"
            )  # as Label Studio writes it
            await ls.files.download(1, "/data/upload/1/b.png")

    asyncio.run(run())
    assert [url for url, _ in hosts.seen] == [
        "http://ls.test/label-studio/data/upload/1/a.png",
        "http://ls.test/label-studio/data/upload/1/b.png",
    ]


def test_the_token_never_goes_to_another_host() -> None:
    hosts = Hosts()

    async def run() -> bytes:
        async with client(hosts, retries=0) as ls:
            assert await ls.files.download(1, "https://cdn.test/img.png") == b"cdn bytes"
            # a redirect back to Label Studio does not bring the token back
            return await ls.files.download(1, "https://cdn.test/back-to-ls.png")

    with pytest.raises(LabelStudioError) as info:
        asyncio.run(run())
    assert info.value.status_code == 401
    assert [auth for _, auth in hosts.seen] == [None, None, None]
    assert hosts.seen[-1][0] == "http://ls.test/data/upload/1/x"


def test_cloud_uri_resolves_and_follows_presigned_redirect_without_auth() -> None:
    hosts = Hosts()

    async def run() -> list[bytes]:
        async with client(hosts) as ls:
            return [
                await ls.files.download(7, "s3://bucket/a b.png"),
                await ls.files.download(7, "gs://bucket/proxied.png"),
            ]

    assert asyncio.run(run()) == [b"s3 bytes", b"proxied bytes"]
    resolve, presigned, proxied = hosts.seen
    assert resolve[0].startswith("http://ls.test/tasks/7/resolve/?fileuri=")
    assert resolve[1] == f"Token {LEGACY}"
    assert presigned == ("https://bucket.s3.test/a%20b.png?X-Amz-Signature=SIGNED", None)
    assert proxied[1] == f"Token {LEGACY}"


def test_download_errors_name_the_path_but_not_the_signature() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        fileuri = request.url.params.get("fileuri", "")
        if base64.urlsafe_b64decode(fileuri).decode() == "s3://bucket/expired.png":
            signed = "https://bucket.s3.test/expired.png?X-Amz-Signature=SIGNED"
            return httpx.Response(303, headers={"location": signed})
        return Hosts()(request)

    async def run(url: str) -> bytes:
        async with client(handler) as ls:
            return await ls.files.download(7, url)

    with pytest.raises(LabelStudioError) as info:
        asyncio.run(run("s3://bucket/expired.png"))
    assert info.value.status_code == 403
    assert not isinstance(info.value, AuthError)  # the storage refused, not Label Studio
    assert "s3://bucket/expired.png" in str(info.value)
    assert "SIGNED" not in str(info.value)

    with pytest.raises(NotFoundError, match="could not resolve"):
        asyncio.run(run("s3://elsewhere/x.png"))  # Hosts answers 404 for unknown URIs


def test_download_size_is_capped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/declared.png":
            return httpx.Response(200, content=b"x" * 100)  # sets Content-Length

        async def chunks() -> Any:
            for _ in range(10):
                yield b"x" * 10

        return httpx.Response(200, content=chunks())  # streamed, no Content-Length

    async def run(path: str) -> bytes:
        async with client(handler) as ls:
            return await ls.files.download(1, f"https://cdn.test{path}", max_bytes=50)

    with pytest.raises(ImageError, match="100 bytes, over the 50-byte limit"):
        asyncio.run(run("/declared.png"))
    with pytest.raises(ImageError, match="over the 50-byte limit"):
        asyncio.run(run("/streamed.png"))


def test_monotonic_clock_is_used_for_expiry() -> None:
    # The access token's lifetime comes from its own exp - iat, so a skewed local clock (here:
    # exp far in the past by wall time) does not make every request refresh.
    server = FakeAuthServer()

    async def run() -> None:
        async with client(server, token=PAT) as ls:
            for _ in range(3):
                await ls.verify()

    asyncio.run(run())
    assert time.time() > 1000 + 300  # the issued tokens' exp
    assert len(server.issued) == 1


def test_webhook_refused_by_ssrf_protection_is_not_an_auth_error() -> None:
    # The session's Label Studio runs with SSRF protection off, so these answers are replayed.
    answers = {
        "http://127.0.0.1:8000/hook": ls_error(
            403,
            "The provided URL was not allowed. URLs must use http:// or https://, and must not "
            "resolve to local or private network addresses when SSRF protection applies.",
        ),
        "http://autoseg:8000/hook": ls_error(500, "Can't resolve hostname autoseg"),
    }
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        url = json.loads(request.content)["url"]
        calls.append(url)
        return answers[url]

    async def run(url: str) -> None:
        async with client(handler) as ls:
            await ls.create_webhook(1, url, {}, ["TASKS_CREATED"])

    with pytest.raises(LabelStudioError, match="refused the webhook") as info:
        asyncio.run(run("http://127.0.0.1:8000/hook"))
    assert info.value.status_code == 403
    assert not isinstance(info.value, AuthError)
    with pytest.raises(LabelStudioError, match="resolve hostname") as info:
        asyncio.run(run("http://autoseg:8000/hook"))
    assert info.value.status_code == 500
    assert not isinstance(info.value, LabelStudioUnavailable)
    assert calls == ["http://127.0.0.1:8000/hook", "http://autoseg:8000/hook"]  # no retries


def test_create_prediction_without_retry_tries_once() -> None:
    """A POST that timed out may have been applied: the worker checks before trying again."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ReadTimeout("slow", request=request)

    async def run() -> None:
        async with client(handler) as ls:
            with pytest.raises(LabelStudioUnavailable, match="failed after 1 tries"):
                await ls.create_prediction(PredictionIn(1, [], 0.5, "v"), retry=False)
            assert calls == ["/api/predictions/"]
            calls.clear()
            with pytest.raises(LabelStudioUnavailable, match="failed after 4 tries"):
                await ls.create_prediction(PredictionIn(1, [], 0.5, "v"))
            assert len(calls) == 4

    asyncio.run(run())


def test_ensure_webhook_explains_ssrf_protection() -> None:
    # The session's Label Studio runs with SSRF protection off: its 403 is replayed here.
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=[])
        return httpx.Response(403, json={"detail": "The provided URL was not allowed."})

    async def run() -> None:
        async with client(handler) as ls:
            await ensure_webhook(ls, 1, "http://127.0.0.1:9/webhook", "s")

    with pytest.raises(LabelStudioError, match="SSRF_PROTECTION_ENABLED=false") as info:
        asyncio.run(run())
    assert info.value.status_code == 403
