"""The decoded pixels a worker holds at once are bounded (``worker.max_inflight_megapixels``):
the budget's own rules, then a worker given a backlog of large images."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from test_worker_faults import PROJECT, FakeLabelStudio, Run, fake_client, make_worker, until
from test_worker_faults import run as run  # the fixture, found by its name

from service.config import ModelConfig, PredictionConfig
from service.model.images import image_size
from service.model.torchscript import SegmentationModel
from service.queue import JobState, SQLiteJobQueue
from service.results.brush import decode_result
from service.worker import Worker
from service.worker.budget import PixelBudget


async def _settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_budget_is_never_exceeded_and_grants_in_arrival_order() -> None:
    async def main() -> None:
        budget = PixelBudget(10)
        await budget.acquire(1, 6)
        second = asyncio.create_task(budget.acquire(2, 6))  # does not fit beside 1
        third = asyncio.create_task(budget.acquire(3, 3))  # would fit, but 2 came first
        await _settled()
        assert not second.done() and not third.done()
        assert budget.in_use == 6
        budget.release(1)
        await _settled()
        assert second.done() and third.done()
        assert budget.in_use == 9 and budget.peak == 9
        budget.release(2)
        budget.release(3)
        budget.release(3)  # a second release is a no-op
        assert budget.in_use == 0 and budget.peak <= budget.capacity

    asyncio.run(main())


def test_a_request_over_the_whole_budget_runs_alone_and_never_deadlocks() -> None:
    async def main() -> None:
        budget = PixelBudget(10)
        await budget.acquire(1, 25)  # nothing held: granted at once
        assert budget.in_use == 25
        small = asyncio.create_task(budget.acquire(2, 1))
        await _settled()
        assert not small.done()  # nothing beside the oversized one
        budget.release(1)
        await asyncio.wait_for(small, 1)
        big = asyncio.create_task(budget.acquire(3, 25))
        await _settled()
        assert not big.done()  # waits for the small one to end
        budget.release(2)
        await asyncio.wait_for(big, 1)
        assert budget.in_use == 25

    asyncio.run(main())


def test_a_cancelled_request_leaves_the_line_and_holds_nothing() -> None:
    async def main() -> None:
        budget = PixelBudget(10)
        await budget.acquire(1, 8)
        blocked = asyncio.create_task(budget.acquire(2, 8))
        behind = asyncio.create_task(budget.acquire(3, 2))  # fits, but waits behind 2
        await _settled()
        blocked.cancel()
        await _settled()
        assert blocked.cancelled()
        assert behind.done()  # the line moved on
        assert not budget.holds(2) and budget.waiting == 0
        assert budget.in_use == 10
        budget.release(1)
        budget.release(3)
        assert budget.in_use == 0

    asyncio.run(main())


def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` (its pixels never follow)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_image_size_reads_the_header_only() -> None:
    assert image_size(_png_header(10000, 9000)) == (10000, 9000)  # 270 MB decoded
    # Past Pillow's decompression-bomb limit, or no image: decoding says why.
    assert image_size(_png_header(30000, 20000)) is None
    assert image_size(b"not an image") is None


# -------------------------------------------------------------------- a worker's backlog

SIDE = 1000  # 1 megapixel each
BIG = [1, 2, 3, 4, 5, 6, 7, 8]
HUGE = 9  # 2000x1500: more than the whole budget of the test


def _image(task: int) -> np.ndarray:
    height, width = (1500, 2000) if task == HUGE else (SIDE, SIDE)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    top = 50 * task
    image[top : top + 100, 100:400, 0] = 255
    return image


class LargeImages(FakeLabelStudio):
    def answer(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith(f"/data/upload/{PROJECT}/"):
            buf = io.BytesIO()
            Image.fromarray(_image(int(path.rsplit("/", 1)[1].split(".")[0]))).save(buf, "PNG")
            return httpx.Response(
                200, content=buf.getvalue(), headers={"Content-Type": "image/png"}
            )
        return super().answer(request)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteJobQueue]:
    with SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3) as queue:
        yield queue


@pytest.mark.parametrize("tasks", [BIG, [*BIG, HUGE]], ids=["large", "large-and-oversized"])
def test_a_backlog_of_large_images_is_predicted_within_the_pixel_budget(
    queue: SQLiteJobQueue, run: Run, tasks: list[int]
) -> None:
    fake = LargeImages(tasks)
    budget_mp = 2.5  # two of the large images at once; the oversized one alone
    workers: list[Worker] = []

    async def capture(fake: FakeLabelStudio, worker: Worker) -> None:
        workers.append(worker)

    run(fake, during=capture, max_inflight_megapixels=budget_mp)
    (pixels,) = (worker.pixels for worker in workers)
    assert pixels.in_use == 0  # every job gave its pixels back
    for task in tasks:
        job = queue.get(PROJECT, task, "v1")
        assert job is not None and job.state is JobState.DONE, job
        posted = fake.predictions.get(task, [])
        assert len(posted) == 1, f"task {task}: {len(posted)} predictions"
        decoded = dict(decode_result(r) for r in posted[0]["result"])
        np.testing.assert_array_equal(decoded["label_a"] > 0, _image(task)[..., 0] > 127)
    alone = max(_image(t).shape[0] * _image(t).shape[1] for t in tasks)
    assert pixels.peak <= max(budget_mp * 1e6, alone), pixels.peak
    assert pixels.peak >= 2 * SIDE * SIDE or HUGE in tasks  # the budget was used, not 1 by 1


def test_a_shutdown_while_jobs_wait_for_pixels_gives_every_pixel_and_job_back(
    queue: SQLiteJobQueue, colour_model: Callable[..., ModelConfig]
) -> None:
    model = SegmentationModel.load(colour_model(channels=1))
    fake = LargeImages(BIG)
    # One image at a time (1 megapixel): the others wait in line when the stop comes.
    settings = {"max_inflight_megapixels": 1, "shutdown_grace_s": 0, "settle_s": 0}

    async def main() -> PixelBudget:
        client = fake_client(fake.handler, timeout_s=10, retries=1, backoff_s=0.001)
        prediction = PredictionConfig(min_pixels=0, prob_upsample=False)
        worker = make_worker(queue, client, model, prediction=prediction, **settings)
        queue.enqueue(PROJECT, BIG, "v1")
        stop = asyncio.Event()
        async with client:
            runner = asyncio.create_task(worker.run(stop))
            await until(lambda: worker.pixels.waiting > 0)
            stop.set()
            await asyncio.wait_for(runner, 10)
        return worker.pixels

    pixels = asyncio.run(main())
    assert pixels.in_use == 0 and pixels.waiting == 0
    assert pixels.peak <= SIDE * SIDE
    states = {queue.get(PROJECT, task, "v1").state for task in BIG}  # type: ignore[union-attr]
    assert states <= {JobState.QUEUED, JobState.DONE}, states
    assert JobState.QUEUED in states  # the waiting ones went back unspent
