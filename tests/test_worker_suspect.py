"""Jobs a crash left running (``recover`` marks them suspect) go through the worker alone: in
their task read, their download and their model batch, so that a job that kills the process
again takes no neighbour with it. Label Studio is the fake of tests/test_worker_faults.py; the
same with a real process killed is in tests/test_faults_real.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from test_worker_faults import (
    PROJECT,
    FakeLabelStudio,
    assert_one_correct_prediction_each,
    fake_client,
    make_worker,
)

from service.config import ModelConfig, PredictionConfig
from service.model.torchscript import SegmentationModel
from service.queue import Job, JobState, SQLiteJobQueue


class CountingQueue(SQLiteJobQueue):
    claims = 0

    def claim(self, limit: int) -> list[Job]:
        self.claims += 1
        return super().claim(limit)


def test_jobs_left_running_by_a_crash_are_read_and_batched_alone_then_the_rest_together(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    path = tmp_path / "jobs.sqlite3"
    fake = FakeLabelStudio(tasks=list(range(1, 10)))
    with SQLiteJobQueue(path, max_attempts=4) as crashed:
        crashed.enqueue(PROJECT, fake.tasks, "v1")
        assert [job.task for job in crashed.claim(3)] == [1, 2, 3]  # then the process died
    model = SegmentationModel.load(colour_model(channels=1, batch_size=4))
    batches: list[int] = []
    real = model.predict_each

    def recording(images: Any, prediction: Any) -> Any:
        batches.append(len(images))
        return real(images, prediction)

    model.predict_each = recording  # type: ignore[method-assign]
    reads: list[list[int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/tasks/" and request.method == "GET":
            query = json.loads(request.url.params["query"])
            reads.append(sorted(query["selectedItems"]["included"]))
        return fake.handler(request)

    with CountingQueue(path, max_attempts=4) as queue:
        assert queue.recover() == 3

        async def main() -> None:
            async with fake_client(handler) as client:
                worker = make_worker(
                    queue,
                    client,
                    model,
                    prediction=PredictionConfig(min_pixels=0, prob_upsample=False),
                    settle_s=0,
                    idle_poll_s=1.0,
                    batch_wait_s=0.2,
                )
                await worker.run_until_idle()

        asyncio.run(main())
        jobs = [queue.get(PROJECT, task, "v1") for task in fake.tasks]
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert [j.state for j in jobs if j] == [JobState.DONE] * 9
    assert [j.attempts for j in jobs if j] == [2, 2, 2] + [1] * 6
    assert not any(j.suspect for j in jobs if j)
    # Each suspect job read (before the model, then before its post) and batched on its own.
    assert reads[:6] == [[1], [1], [2], [2], [3], [3]]
    assert batches[:3] == [1, 1, 1]
    # The other six are claimed, read and batched together as usual.
    assert reads[6] == [4, 5, 6, 7, 8, 9]
    assert sum(batches[3:]) == 6 and max(batches[3:]) > 1
    # While a suspect job runs the worker waits for it instead of asking the queue again.
    assert queue.claims <= 8, queue.claims
