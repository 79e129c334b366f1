"""A fault-injecting reverse proxy between the service and a real Label Studio.

The service is configured with the proxy's URL; the proxy forwards every request to Label
Studio unchanged, unless a rule says otherwise. Rules match a method and a path regex and act
on the next ``count`` matching requests:

- ``status``: answer this HTTP status without forwarding (a 500, a 503);
- ``delay``: wait ``seconds`` and then forward (a slow Label Studio);
- ``late``: forward, then wait ``seconds`` before answering (the request is applied but the
  answer comes after the client gave up);
- ``hold``: forward, then do not answer until :meth:`FaultProxy.release` (kill the client
  while it waits: a POST that landed but was never acknowledged).

:meth:`FaultProxy.down` closes the listening socket (connections refused, as when Label
Studio is down) and :meth:`FaultProxy.up` opens it again on the same port. Every request is
logged in :attr:`FaultProxy.seen`. Runs uvicorn in a thread; binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.local import lsserver

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
_ANSWER_DROP = {"content-encoding", "content-length", "transfer-encoding", "connection"}


@dataclass
class Rule:
    method: str
    path: str  # regex, searched in the request path
    action: str  # status | delay | late | hold
    value: float = 0.0  # the status code or the seconds
    count: int = 1_000_000

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and method == self.method and re.search(self.path, path) is not None


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = lsserver.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules: list[Rule] = []
        self.seen: list[tuple[float, str, str]] = []  # (time.monotonic(), method, path)
        self.held = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- control (from the test's thread) ----------------------------------------------------

    def rule(
        self, method: str, path: str, action: str, value: float = 0, count: int = 1_000_000
    ) -> None:
        with self._lock:
            self.rules.append(Rule(method, path, action, value, count))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def release(self) -> None:
        """Answer every held request now (and the ones still to come)."""
        self._release.set()

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for _, m, p in self.seen if m == method and re.search(path, p))

    def up(self) -> None:
        app = Starlette(
            routes=[
                Route(
                    "/{path:path}", self._forward, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]
                )
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fault proxy did not start")
            time.sleep(0.02)

    def down(self) -> None:
        """Stop listening: new connections are refused until :meth:`up`."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._server = self._thread = None

    # -- the proxy itself -------------------------------------------------------------------

    async def _forward(self, request: Request) -> Response:
        method, path = request.method, request.url.path
        with self._lock:
            self.seen.append((time.monotonic(), method, path))
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            if rule is not None:
                rule.count -= 1
        if rule is not None and rule.action == "status":
            return JSONResponse({"detail": "injected by the fault proxy"}, int(rule.value))
        if rule is not None and rule.action == "delay":
            await asyncio.sleep(rule.value)
        answer = await self._send_upstream(request)
        if rule is not None and rule.action == "late":
            await asyncio.sleep(rule.value)
        if rule is not None and rule.action == "hold":
            with self._lock:
                self.held += 1
            while not self._release.is_set():
                await asyncio.sleep(0.05)
        return answer

    async def _send_upstream(self, request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        async with httpx.AsyncClient(timeout=120) as client:
            upstream = await client.request(
                request.method,
                self.upstream + request.url.path,
                params=request.url.query,
                headers=headers,
                content=await request.body(),
            )
        kept = {k: v for k, v in upstream.headers.items() if k.lower() not in _ANSWER_DROP}
        return Response(upstream.content, status_code=upstream.status_code, headers=kept)
