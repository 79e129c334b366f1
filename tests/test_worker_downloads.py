"""Slow image hosts: a download has a deadline, and downloads never take the slots that Label
Studio's API calls need. Label Studio is ``test_worker_faults``' MockTransport fake; the image
host beside it trickles its answer a few bytes at a time, as a hostile or broken host can.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_worker_faults import (
    PROJECT,
    FakeLabelStudio,
    assert_one_correct_prediction_each,
    fake_client,
    make_worker,
)

from service.commands.ops import status
from service.config import Config, ModelConfig, PredictionConfig
from service.errors import DownloadTimeout
from service.model.torchscript import SegmentationModel
from service.queue import JobState, SQLiteJobQueue, open_queue

# A public address literal: the image host is "another host" to every check of the client.
SLOW_HOST = "93.184.215.14"
SLOW = [1, 2, 3, 4]  # as many as ``concurrency``: enough to take every shared slot
FAST = [5, 6, 7, 8, 9, 10]


class TricklingHost(FakeLabelStudio):
    """Label Studio for every task, and a host that sends the slow tasks' images a byte at a
    time, for ever; records when each slow download began and each prediction was posted."""

    def __init__(self, tasks: list[int]) -> None:
        super().__init__(tasks=tasks)
        self.slow_started: list[float] = []
        self.posted_at: dict[int, float] = {}

    def task_json(self, task_id: int) -> dict[str, Any]:
        task = super().task_json(task_id)
        if task_id in SLOW:
            # credentials and a signature, neither of which may reach a job's reason
            task["data"]["image"] = f"http://user:secret@{SLOW_HOST}/img/{task_id}.png?sig=abc"
        return task

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == SLOW_HOST:
            self.slow_started.append(time.monotonic())
            return httpx.Response(200, headers={"Content-Type": "image/png"}, content=_trickle())
        response = self.handler(request)
        if request.method == "POST" and request.url.path == "/api/predictions/":
            self.posted_at[int(response.json()["task"])] = time.monotonic()
        return response


async def _trickle() -> AsyncIterator[bytes]:
    yield b"\x89PNG"
    while True:
        await asyncio.sleep(0.02)
        yield b"\0"


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteJobQueue]:
    with SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3) as queue:
        yield queue


def test_slow_image_hosts_time_out_and_fail_while_the_other_tasks_flow(
    queue: SQLiteJobQueue, colour_model: Callable[..., ModelConfig]
) -> None:
    model = SegmentationModel.load(colour_model(channels=1))
    fake = TricklingHost(SLOW + FAST)
    deadline_s = 0.6

    async def main() -> None:
        client = fake_client(
            fake.async_handler, retries=1, backoff_s=0.001, download_timeout_s=deadline_s
        )
        worker = make_worker(
            queue,
            client,
            model,
            prediction=PredictionConfig(min_pixels=0, prob_upsample=False),
            concurrency=len(SLOW),
            retry_base_s=0.01,
            outage_probe_s=0.02,
            idle_poll_s=0.02,
            settle_s=0,
        )
        queue.enqueue(PROJECT, SLOW, "v1")  # first: claimed (and downloading) before the rest
        queue.enqueue(PROJECT, FAST, "v1")
        async with client:
            await asyncio.wait_for(worker.run_until_idle(), 20)

    asyncio.run(main())
    assert_one_correct_prediction_each(fake, FAST)
    # The others were predicted while the slow downloads still hung: not after their deadline.
    first_slow = min(fake.slow_started)
    assert max(fake.posted_at.values()) < first_slow + deadline_s, (
        fake.posted_at,
        first_slow,
    )
    for task in SLOW:
        job = queue.get(PROJECT, task, "v1")
        assert job is not None and job.state is JobState.FAILED, job
        assert job.attempts == 3
        assert job.reason == (
            f"gave up after 3 attempts: download of http://{SLOW_HOST}/img/{task}.png took over "
            f"{deadline_s:g} s"
        )
        assert task not in fake.predictions
    assert len(fake.slow_started) == 3 * len(SLOW)  # one download per attempt


def test_the_deadline_covers_the_whole_download_and_is_retryable() -> None:
    async def trickle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_trickle())

    async def main() -> None:
        async with fake_client(trickle, download_timeout_s=30) as client:
            began = time.monotonic()
            with pytest.raises(DownloadTimeout) as raised:
                url = f"https://{SLOW_HOST}/a.png?X-Amz-Signature=s"
                await client.files.download(1, url, timeout_s=0.2)
            assert time.monotonic() - began < 2
            assert str(raised.value) == f"download of https://{SLOW_HOST}/a.png took over 0.2 s"

    asyncio.run(main())


def test_status_lists_the_jobs_waiting_for_a_retry_with_their_last_reason(tmp_path: Path) -> None:
    config = Config(
        source=tmp_path / "config.yaml",
        model=ModelConfig(path=tmp_path / "m.pt", labels=("a",)),
        state_dir=tmp_path / "state",
    )
    reason = f"download of http://{SLOW_HOST}/img/1.png took over 60 s"
    with open_queue(config) as queue:
        queue.enqueue(PROJECT, [1, 2, 3], "v1")
        slow, failing = queue.claim(2)
        queue.retry_later(slow.id, reason, 30)
        queue.mark_failed(failing.id, "bad image")
    out = io.StringIO()
    counts = status(config, out)
    assert counts[JobState.QUEUED] == 2 and counts[JobState.FAILED] == 1
    lines = out.getvalue().splitlines()
    waiting = lines.index("waiting for a retry:")
    assert re.fullmatch(
        rf"  next try \S+ \S+ project {PROJECT} task 1 \(attempts 1\): {re.escape(reason)}",
        lines[waiting + 1],
    ), lines
    assert lines[waiting + 2] == "recent failures:", lines
    assert lines[waiting + 3].endswith(f"project {PROJECT} task 2 (attempts 1): bad image")
