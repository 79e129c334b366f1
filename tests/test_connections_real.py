"""Stalled connections against the real ``ls-autoseg serve`` and a real Label Studio 1.23.2:
300 clients that send part of a request line and stop must neither delay a good webhook past
Label Studio's 1 s timeout nor stay open past ``server.request_timeout_s``. All sockets are on
127.0.0.1, bounded in number and time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from ls_fixtures import tasks_of
from service_harness import (
    SECRET,
    HarnessService,
    MakeClient,
    assert_correct,
    make_env,
    upload,
    wait_for_predictions,
)
from stalled_clients import closed_within, stall

from service.config import ModelConfig
from service.local import lsserver

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

STALLED = 300
REQUEST_TIMEOUT_S = 4.0
LABEL_STUDIO_WEBHOOK_TIMEOUT_S = 1.0


def test_stalled_connections_neither_delay_webhooks_nor_stay_open(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    colour_model: Callable[..., ModelConfig],
) -> None:
    model = colour_model(channels=2)
    env = make_env(
        tmp_path, label_studio, ls_client, model, server={"request_timeout_s": REQUEST_TIMEOUT_S}
    )
    try:
        check_stalled_connections(env.service, env.project, ls_client)
    finally:
        env.service.kill()


def check_stalled_connections(service: HarnessService, project: int, ls_client: MakeClient) -> None:
    service.start()
    url = f"{service.url}/webhook"
    port = httpx.URL(service.url).port
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(3)])
    body = {
        "action": "TASKS_CREATED",
        "project": {"id": project},
        "tasks": [{"id": task.id} for task in tasks_of(ls_client, project)],
    }

    async def run() -> tuple[float, list[bool]]:
        opened = time.monotonic()
        # Part of a request line, and then nothing.
        stalled = [await stall(port, b"POST /webh") for _ in range(STALLED)]
        try:
            async with httpx.AsyncClient(headers={"X-Webhook-Secret": SECRET}) as client:
                # The webhook again (a repeat adds no job): timed as Label Studio times it.
                started = time.perf_counter()
                response = await client.post(url, json=body, timeout=10)
                took = time.perf_counter() - started
                assert response.json() == {"queued": 3}
                # Nested just under the recursion limit, through the real server's stack.
                deep = b"[" * 990 + b"]" * 990
                tasks = b'{"action": "TASKS_CREATED", "project": {"id": 1}, "tasks": %s}' % deep
                refused = await client.post(url, content=tasks, timeout=10)
                assert refused.status_code == 400, refused.text
            # Label Studio's own webhook, sent while the stalled clients hold on.
            pictures.update(
                await asyncio.to_thread(
                    upload, ls_client, project, [f"img_{i}.png" for i in range(3, 6)]
                )
            )
            left = max(REQUEST_TIMEOUT_S + 3.0 - (time.monotonic() - opened), 0.1)
            closed = await asyncio.gather(*(closed_within(r, left) for r, _ in stalled))
        finally:
            for _, writer in stalled:
                writer.close()
        return took, closed

    took, closed = asyncio.run(run())
    assert took < LABEL_STUDIO_WEBHOOK_TIMEOUT_S, f"the webhook took {took:.2f} s"
    assert all(closed), f"{closed.count(False)} of {STALLED} stalled connections still open"
    tasks = wait_for_predictions(ls_client, project, 6)
    assert len(tasks) == 6
    assert_correct(tasks, pictures, set())
    assert service.alive()
    assert httpx.get(f"{service.url}/health", timeout=5).status_code == 200
    assert "did not arrive within" in service.tail(1000)
