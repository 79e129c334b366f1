"""Outage detection on its own: a job's failure vs Label Studio as a whole being unusable.
Label Studio is an ``httpx.MockTransport`` answering ``whoami``; the client is the real one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import pytest

from service.errors import AuthError, ImageError, LabelStudioUnavailable
from service.labelstudio.client import LabelStudioClient
from service.metrics import NoMetrics
from service.worker.outage import OutageWatch


@dataclass
class Whoami:
    """Label Studio's ``whoami``: refused while ``down``; counts the calls."""

    down: bool = False
    calls: int = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/current-user/whoami"
        self.calls += 1
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(200, json={"id": 1, "email": "ops@example.com"})


@dataclass
class Outages(NoMetrics):
    changes: list[bool] = field(default_factory=list)

    def outage(self, active: bool) -> None:
        self.changes.append(active)


def client(whoami: Whoami) -> LabelStudioClient:
    return LabelStudioClient(
        "http://ls.test",
        "0123456789abcdef0123456789abcdef01234567",
        transport=httpx.MockTransport(whoami.handler),
        backoff_s=0.001,
    )


def test_a_failure_is_an_outage_only_when_verify_fails_too() -> None:
    whoami, metrics = Whoami(), Outages()

    async def main() -> None:
        async with client(whoami) as ls:
            watch = OutageWatch(ls, metrics, probe_s=0.01)
            # Not a retryable or auth error: the job's own failure, Label Studio not asked.
            assert not await watch.explains(ImageError("corrupt image"))
            assert whoami.calls == 0
            # Retryable, but Label Studio answers: the job's failure, no outage.
            assert not await watch.explains(LabelStudioUnavailable("HTTP 503"))
            assert whoami.calls == 1 and watch.reason is None
            whoami.down = True
            failures = [LabelStudioUnavailable("HTTP 503"), AuthError("401")] * 3
            answers = await asyncio.gather(*(watch.explains(exc) for exc in failures))
            assert answers == [True] * 6
            assert "Connection refused" in (watch.reason or "")

    asyncio.run(main())
    assert whoami.calls == 1 + 2  # one verify (and its one retry) for six failing jobs
    assert metrics.changes == [True]


def test_a_probe_ends_the_outage_once_label_studio_answers() -> None:
    whoami, metrics = Whoami(down=True), Outages()

    async def main() -> None:
        async with client(whoami) as ls:
            watch = OutageWatch(ls, metrics, probe_s=0.01)
            assert await watch.explains(LabelStudioUnavailable("timeout"))
            await watch.probe(asyncio.Event())
            assert watch.reason is not None  # still down
            whoami.down = False
            await watch.probe(asyncio.Event())
            assert watch.reason is None

    asyncio.run(main())
    assert metrics.changes == [True, False]


def test_a_probe_gives_up_after_limit_s_and_a_stop_skips_it() -> None:
    whoami = Whoami(down=True)
    now = [100.0]

    async def main() -> None:
        async with client(whoami) as ls:
            watch = OutageWatch(ls, NoMetrics(), probe_s=0.01, limit_s=60, clock=lambda: now[0])
            assert await watch.explains(LabelStudioUnavailable("timeout"))
            calls = whoami.calls
            stop = asyncio.Event()
            stop.set()
            await watch.probe(stop)
            assert whoami.calls == calls  # stopping: no probe sent
            now[0] += 59
            await watch.probe(asyncio.Event())  # down 59 s: keeps waiting
            now[0] += 1
            with pytest.raises(LabelStudioUnavailable, match=r"unusable for 60 s, giving up"):
                await watch.probe(asyncio.Event())

    asyncio.run(main())
