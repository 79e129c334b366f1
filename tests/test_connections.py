"""The deadline per request (service/connections.py) under a real uvicorn on 127.0.0.1, with
raw sockets that stall where a slow or hostile client would; ``serve`` itself is tested with
the same clients in tests/test_connections_real.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from stalled_clients import closed_within, stall
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.connections import deadline_protocol
from service.local.lsserver import free_port

DEADLINE_S = 0.6
STALLED = 300


async def echo(request: Request) -> Response:
    try:
        body = await request.body()
    except ClientDisconnect:
        request.app.state.disconnects += 1
        return Response(status_code=400)
    return JSONResponse({"size": len(body)})


async def slow(request: Request) -> Response:
    await asyncio.sleep(DEADLINE_S * 2)  # the app's own time is not the client's
    return JSONResponse({"slow": True})


@contextlib.asynccontextmanager
async def running(timeout_s: float = DEADLINE_S) -> AsyncIterator[tuple[int, Starlette]]:
    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/slow", slow)])
    app.state.disconnects = 0
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="off",
        http=deadline_protocol(timeout_s),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port, app
    finally:
        # force_exit: do not wait for connections a failing test left stalled.
        server.should_exit = server.force_exit = True
        await task


PARTIAL_REQUEST_LINE = b"POST /ec"
PARTIAL_HEADERS = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
PARTIAL_BODY = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"


def test_stalled_requests_do_not_delay_a_good_one_and_are_closed_after_the_deadline() -> None:
    async def run() -> None:
        async with running() as (port, _):
            opened = time.monotonic()
            stalled = [await stall(port, PARTIAL_REQUEST_LINE) for _ in range(STALLED)]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                started = time.perf_counter()
                response = await client.post("/echo", content=b"hello", timeout=5)
                assert time.perf_counter() - started < 1.0
                assert response.json() == {"size": 5}
            assert time.monotonic() - opened < DEADLINE_S, "too slow to open the sockets"
            closed = await asyncio.gather(
                *(closed_within(reader, DEADLINE_S + 2) for reader, _ in stalled)
            )
            assert all(closed), f"{closed.count(False)} stalled connection(s) still open"
            for _, writer in stalled:
                writer.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "sent",
    [PARTIAL_REQUEST_LINE, PARTIAL_HEADERS, PARTIAL_BODY],
    ids=["request-line", "headers", "body"],
)
def test_a_request_that_stops_arriving_is_closed_after_the_deadline(sent: bytes) -> None:
    async def run() -> None:
        async with running() as (port, app):
            reader, writer = await stall(port, sent)
            assert not await closed_within(reader, DEADLINE_S / 2)  # not before the deadline
            assert await closed_within(reader, DEADLINE_S + 2)
            writer.close()
            await asyncio.sleep(0.05)
            assert app.state.disconnects == (1 if sent is PARTIAL_BODY else 0)

    asyncio.run(run())


def test_a_trickle_of_header_bytes_does_not_extend_the_deadline() -> None:
    async def run() -> None:
        async with running() as (port, _):
            reader, writer = await stall(port, b"POST /echo HTTP/1.1\r\n")
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                for _ in range(int(DEADLINE_S * 4 / 0.1)):
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    if reader.at_eof() or writer.is_closing():
                        break
            assert await closed_within(reader, 1.0)
            assert time.monotonic() - started < DEADLINE_S + 1.0
            writer.close()

    asyncio.run(run())


def test_a_slow_answer_and_a_second_request_on_the_connection_are_not_cut() -> None:
    async def run() -> None:
        async with (
            running() as (port, _),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        ):
            assert (await client.get("/slow", timeout=5)).json() == {"slow": True}
            # The same keep-alive connection: a new deadline for the next request.
            await asyncio.sleep(DEADLINE_S / 2)
            response = await client.post("/echo", content=b"ab", timeout=5)
            assert response.json() == {"size": 2}

    asyncio.run(run())


def test_the_deadline_must_be_positive() -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="request_timeout_s"):
            deadline_protocol(bad)
