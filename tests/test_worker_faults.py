"""The worker under faults a real Label Studio cannot show on demand: a connection refused for
a while, 503s and timeouts on single requests, a POST that lands but times out, a token that
stops working. Label Studio is an ``httpx.MockTransport`` here; the queue, the model (an exact
fake), the codec and the client are the real ones, and every prediction posted is decoded and
compared with the mask the image must give. The same faults against a real Label Studio are
in tests/test_faults_real.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import ModelConfig, PredictionConfig, WorkerConfig
from service.labelstudio.client import LabelStudioClient
from service.metrics import NoMetrics
from service.model.torchscript import SegmentationModel
from service.queue import JobState, SQLiteJobQueue
from service.results import BrushTarget, decode_result
from service.worker import Worker, WorkerSettings

PROJECT = 7
TASK_RE = re.compile(r"^/api/tasks/(\d+)/$")
PREDICTION_RE = re.compile(r"^/api/predictions/(\d+)/$")
INVALID_TOKEN = {"detail": "Invalid token."}
TARGET = BrushTarget(PROJECT, "tag", "image", "image", {"red": "label_a"})


def fake_client(handler: Callable[..., Any], **options: Any) -> LabelStudioClient:
    """A real client whose Label Studio is ``handler`` (an httpx.MockTransport handler)."""
    return LabelStudioClient(
        "http://ls.test",
        "0123456789abcdef0123456789abcdef01234567",
        transport=httpx.MockTransport(handler),
        **options,
    )


def make_worker(
    queue: SQLiteJobQueue,
    client: LabelStudioClient,
    model: SegmentationModel,
    metrics: Any = None,
    **settings: Any,
) -> Worker:
    """A worker on the fake project; ``settings`` are WorkerSettings' (prediction,
    outage_limit_s, bulk_predictions: "off" unless given, so that faults of single posts are
    what these tests inject) and WorkerConfig's fields."""
    settings.setdefault("bulk_predictions", "off")
    outer = {
        k: settings.pop(k)
        for k in ("prediction", "outage_limit_s", "bulk_predictions")
        if k in settings
    }
    worker = WorkerConfig(**settings)
    return Worker(
        queue,
        client,
        model,
        {PROJECT: TARGET},
        WorkerSettings(worker=worker, **outer),
        metrics=metrics,
    )


def red_block(task_id: int) -> tuple[bytes, np.ndarray]:
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[task_id % 10 : task_id % 10 + 8, 4:20, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue(), image[..., 0] > 127


@dataclass
class FakeLabelStudio:
    """Tasks, their images and the predictions posted; ``fault`` decides each answer."""

    tasks: list[int]
    predictions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    down: bool = False
    revoked: bool = False
    broken: set[int] = field(default_factory=set)  # reading these tasks answers 500
    down_after: int | None = None  # go down once this many predictions are stored
    bulk_cheap: bool = True  # import/predictions runs its batched path (the flag on)
    import_batch: int = 500  # its PREDICTION_IMPORT_BATCH_SIZE
    late: list[httpx.Request] = field(default_factory=list)  # "timeout-late" requests
    deleted: list[int] = field(default_factory=list)  # predictions deleted, by id
    history: list[tuple[int, int]] = field(default_factory=list)  # (task, id) of every store
    # (method, path regex) -> answers to give first: an int status, "timeout", "timeout-after"
    # (apply the request, then time out), "timeout-late" (time out, and apply the request
    # just before the next post for one of its tasks) or "refused"
    faults: dict[tuple[str, str], list[object]] = field(default_factory=dict)

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if self.revoked:
            return httpx.Response(401, json=INVALID_TOKEN)
        after: str | None = None
        for (method, pattern), answers in self.faults.items():
            if answers and method == request.method and re.search(pattern, path):
                answer = answers.pop(0)
                if answer == "refused":
                    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
                if answer == "timeout":
                    raise httpx.ReadTimeout("timed out", request=request)
                if answer == "timeout-after":
                    after = "timeout"
                    break
                if answer == "timeout-late":  # applied only just before the next post
                    self.late.append(request)
                    raise httpx.ReadTimeout("timed out, stored later", request=request)
                assert isinstance(answer, int)
                return httpx.Response(answer, json={"detail": "injected"})
        if self.late and request.method == "POST" and "predictions" in path:
            # a late one lands just before the next post for one of its tasks
            for stashed in [r for r in self.late if posted_tasks(r) & posted_tasks(request)]:
                self.answer(stashed)
                self.late.remove(stashed)
        response = self.answer(request)
        if after == "timeout":
            raise httpx.ReadTimeout("timed out after the server applied it", request=request)
        return response

    def task_json(self, task_id: int) -> dict[str, Any]:
        predictions = self.predictions.get(task_id, [])
        return {
            "id": task_id,
            "project": PROJECT,
            "data": {"image": f"/data/upload/{PROJECT}/{task_id}.png"},
            "annotations": [],
            "predictions": predictions,
            "total_annotations": 0,
            "cancelled_annotations": 0,
            "total_predictions": len(predictions),
        }

    def answer(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if (match := PREDICTION_RE.match(path)) and request.method == "DELETE":
            gone = int(match.group(1))
            self.deleted.append(gone)
            for task, posted in self.predictions.items():
                self.predictions[task] = [p for p in posted if p["id"] != gone]
            return httpx.Response(204)
        if path == "/api/current-user/whoami":
            return httpx.Response(200, json={"id": 1, "email": "ops@example.com"})
        if match := TASK_RE.match(path):
            task_id = int(match.group(1))
            if task_id in self.broken:
                return httpx.Response(500, json={"detail": "injected"})
            if task_id not in self.tasks:
                return httpx.Response(404, json={"detail": "Not found."})
            return httpx.Response(200, json=self.task_json(task_id))
        if path == "/api/tasks/" and request.method == "GET":
            assert request.url.params["project"] == str(PROJECT)
            query = json.loads(request.url.params["query"])
            wanted = query.get("selectedItems", {}).get("included") or self.tasks
            if self.broken & set(wanted):
                return httpx.Response(500, json={"detail": "injected"})
            listed = [t for t in sorted(wanted) if t in self.tasks]
            if "include" in request.url.params:  # lean: filtered, no lists (as 1.23.2 does)
                assert "fields" not in request.url.params
                listed = [t for t in listed if self.untouched(t, query["filters"]["items"])]
                tasks = [self.lean_json(t, request.url.params["include"]) for t in listed]
            else:
                assert request.url.params["fields"] == "all"
                tasks = [self.task_json(t) for t in listed]
            return httpx.Response(200, json={"total": len(tasks), "tasks": tasks})
        if path.startswith(f"/data/upload/{PROJECT}/"):
            data, _ = red_block(int(path.rsplit("/", 1)[1].split(".")[0]))
            return httpx.Response(200, content=data, headers={"Content-Type": "image/png"})
        if path == "/api/predictions/" and request.method == "POST":
            body = json.loads(request.content)
            self.store(body)
            return httpx.Response(201, json=self.predictions[body["task"]][-1])
        if path == f"/api/projects/{PROJECT}/import/predictions" and request.method == "POST":
            # As 1.23.2 does: with the flag, ids checked and stored a batch at a time (a bad id
            # fails the call after the batches before it were stored); without it, all checked
            # first. It answers no ids.
            items = json.loads(request.content)
            size = self.import_batch if self.bulk_cheap else len(items)
            created = 0
            for start in range(0, len(items), size):
                batch = items[start : start + size]
                unknown = [item["task"] for item in batch if item["task"] not in self.tasks]
                if unknown:
                    detail = f'"task" field: task ID {unknown[0]} not found in project'
                    if not self.bulk_cheap:
                        detail = "corresponding task ID couldn't be retrieved"
                    return httpx.Response(400, json={"validation_errors": [detail]})
                for item in batch:
                    self.store({**item, "project": PROJECT, "bulk": True})
                    created += 1
            return httpx.Response(201, json={"created": created})
        return httpx.Response(404, json={"detail": f"no route {path}"})

    def lean_json(self, task_id: int, include: str) -> dict[str, Any]:
        full = self.task_json(task_id)
        return {key: full[key] for key in include.split(",")}

    def untouched(self, task_id: int, filters: list[dict[str, Any]]) -> bool:
        """Label Studio's filters: counters equal 0, versions compared as substrings."""
        task = self.task_json(task_id)
        for item in filters:
            column = item["filter"].removeprefix("filter:tasks:")
            if column == "id":
                assert item["operator"] == "greater"
                if not task_id > item["value"]:
                    return False
            elif column == "predictions_model_versions":
                assert item["operator"] == "not_contains"
                versions = [p.get("model_version", "") for p in task["predictions"]]
                if any(v in version for v in item["value"] for version in versions):
                    return False
            else:
                assert item["operator"] == "equal"
                if task[column] != item["value"]:
                    return False
        return True

    def store(self, body: dict[str, Any]) -> None:
        stored = {**body, "id": 1000 + len(self.history)}
        self.history.append((body["task"], stored["id"]))
        self.predictions.setdefault(body["task"], []).append(stored)
        if self.down_after is not None and len(self.predictions) >= self.down_after:
            self.down, self.down_after = True, None


def posted_tasks(request: httpx.Request) -> set[int]:
    """The tasks a post of predictions (one, or a bulk list) is for."""
    body = json.loads(request.content)
    return {item["task"] for item in (body if isinstance(body, list) else [body])}


@dataclass
class Outages(NoMetrics):
    """Worker metrics that keep only the outage changes."""

    changes: list[bool] = field(default_factory=list)

    def outage(self, active: bool) -> None:
        self.changes.append(active)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteJobQueue]:
    with SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=4) as queue:
        yield queue


Run = Callable[..., Any]


@pytest.fixture
def run(queue: SQLiteJobQueue, colour_model: Callable[..., ModelConfig]) -> Run:
    """Run a worker against ``fake`` until ``until(fake)`` holds (or a timeout)."""
    model = SegmentationModel.load(colour_model(channels=1))

    def go(
        fake: FakeLabelStudio,
        during: Callable[[FakeLabelStudio, Worker], Any] | None = None,
        **settings: Any,
    ) -> Outages:
        outages = Outages()

        async def main() -> None:
            client = fake_client(fake.handler, timeout_s=5, retries=1, backoff_s=0.001)
            worker = make_worker(
                queue,
                client,
                model,
                outages,
                prediction=PredictionConfig(min_pixels=0, prob_upsample=False),
                retry_base_s=0.01,
                outage_probe_s=0.02,
                idle_poll_s=0.02,
                settle_s=0,
                **settings,
            )
            queue.enqueue(PROJECT, fake.tasks, "v1")
            stop = asyncio.Event()
            runner = asyncio.create_task(worker.run(stop))
            try:
                if during is not None:
                    await during(fake, worker)
                async with asyncio.timeout(20):
                    while queue.pending() or worker.busy:
                        assert not runner.done(), runner
                        await asyncio.sleep(0.01)
            finally:
                stop.set()
                await runner
                await client.aclose()

        asyncio.run(main())
        return outages

    return go


def assert_one_correct_prediction_each(fake: FakeLabelStudio, tasks: list[int]) -> None:
    for task in tasks:
        posted = fake.predictions.get(task, [])
        assert len(posted) == 1, f"task {task}: {len(posted)} predictions"
        assert posted[0]["project"] == PROJECT  # spares Label Studio its lookup of the task
        decoded = dict(decode_result(r) for r in posted[0]["result"])
        np.testing.assert_array_equal(decoded["label_a"] > 0, red_block(task)[1])


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_label_studio_down_mid_run_spends_no_attempts_and_resumes(
    run: Run, queue: SQLiteJobQueue
) -> None:
    # Down right after the second prediction is stored: the rest meet the outage.
    fake = FakeLabelStudio(tasks=list(range(1, 13)), down_after=2)

    async def outage(fake: FakeLabelStudio, worker: Worker) -> None:
        await until(lambda: worker.outage is not None)
        # Down for many probe intervals: far more than the queue's 4 attempts would allow.
        await asyncio.sleep(0.5)
        failed = [j for t in fake.tasks if (j := queue.get(PROJECT, t, "v1")) and j.reason]
        assert queue.counts()[JobState.FAILED] == 0, [(j.state, j.reason) for j in failed]
        assert "Connection refused" in worker.outage
        fake.down = False

    outages = run(fake, during=outage)
    assert_one_correct_prediction_each(fake, fake.tasks)
    counts = queue.counts()
    assert counts[JobState.DONE] == 12 and counts[JobState.FAILED] == 0
    assert outages.changes == [True, False]
    assert max(queue.get(PROJECT, t, "v1").attempts for t in fake.tasks) <= 2  # type: ignore[union-attr]


def test_revoked_token_keeps_the_jobs_queued_with_the_reason_and_resumes(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 7)), revoked=True)

    async def fix_token(fake: FakeLabelStudio, worker: Worker) -> None:
        await until(lambda: worker.outage is not None)
        await asyncio.sleep(0.3)
        counts = queue.counts()
        assert counts[JobState.FAILED] == 0 and counts[JobState.DONE] == 0
        assert "refused the legacy token" in (worker.outage or "")
        waiting = [queue.get(PROJECT, t, "v1") for t in fake.tasks]
        assert any(j and j.reason and "waiting for Label Studio" in j.reason for j in waiting)
        fake.revoked = False  # a valid token again

    outages = run(fake, during=fix_token)
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert outages.changes == [True, False]


def test_a_normal_run_reads_tasks_in_groups_and_posts_one_by_one(
    run: Run, queue: SQLiteJobQueue
) -> None:
    """Label Studio spends ~60 ms of CPU on GET /api/tasks/{id}/, 3-8 ms per task in a list
    read; its bulk import recounts the whole project on each call, so posts go one by one."""
    fake = FakeLabelStudio(tasks=list(range(1, 17)))
    run(fake, batch_wait_s=0.5)
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert [r for r in fake.requests if TASK_RE.match(r.split()[1])] == []
    assert fake.requests.count("POST /api/predictions/") == 16
    assert not any("import/predictions" in r for r in fake.requests)
    group_reads = fake.requests.count("GET /api/tasks/")
    # 16 tasks, model batches of 4: a read before the model and one before each post group.
    assert 2 <= group_reads <= 2 * 4
    reasons = [str(queue.get(PROJECT, t, "v1").reason) for t in fake.tasks]  # type: ignore[union-attr]
    assert all(re.fullmatch(r"prediction 10\d\d", r) for r in reasons), reasons


def test_503s_and_timeouts_are_retried_with_attempts_counted(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 9)))
    fake.faults = {
        # The lean and then the full group read fail (twice each: through the client's one
        # retry); Label Studio answers verify, so the tasks are read one by one, and task
        # 3's read fails too.
        ("GET", r"^/api/tasks/$"): [503, 503, 503, 503],
        ("GET", r"^/api/tasks/3/$"): [503, 503],
        ("GET", r"^/data/upload/7/5\.png$"): ["timeout", "timeout"],
        ("POST", r"^/api/predictions/$"): [500],  # one-try POST: the job retries
    }
    outages = run(fake)
    assert_one_correct_prediction_each(fake, fake.tasks)
    attempts = {t: queue.get(PROJECT, t, "v1").attempts for t in fake.tasks}  # type: ignore[union-attr]
    assert attempts[3] >= 2 and attempts[5] >= 2, attempts
    assert sum(a >= 2 for a in attempts.values()) >= 3, attempts  # + the 500's job
    assert max(attempts.values()) <= 3, attempts
    assert outages.changes == []  # Label Studio answered verify: no outage


def test_a_post_that_landed_but_timed_out_is_not_posted_again(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=[1, 2, 3])
    fake.faults = {("POST", r"^/api/predictions/$"): ["timeout-after"]}
    run(fake)
    assert_one_correct_prediction_each(fake, fake.tasks)
    jobs = [queue.get(PROJECT, t, "v1") for t in fake.tasks]
    # The timed-out POST had landed: the retry's re-check finds it and posts nothing.
    assert sorted(str(j.reason)[:10] for j in jobs if j) == ["exists", "prediction", "prediction"]


def test_a_task_that_keeps_failing_fails_alone_with_a_readable_reason(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 7)), broken={4})
    run(fake)
    assert_one_correct_prediction_each(fake, [1, 2, 3, 5, 6])
    failed = queue.get(PROJECT, 4, "v1")
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.reason == (
        "gave up after 4 attempts: GET http://ls.test/api/tasks/4/ failed after 2 tries: "
        "Label Studio HTTP 500 (injected)"
    )


def test_backfill_gives_up_on_a_long_outage_and_keeps_the_jobs(
    queue: SQLiteJobQueue, colour_model: Callable[..., ModelConfig]
) -> None:
    from service.errors import LabelStudioUnavailable

    fake = FakeLabelStudio(tasks=[1, 2], down=True)
    model = SegmentationModel.load(colour_model(channels=1))

    async def main() -> None:
        async with fake_client(fake.handler, retries=0) as client:
            worker = make_worker(
                queue,
                client,
                model,
                prediction=PredictionConfig(min_pixels=0),
                outage_probe_s=0.02,
                outage_limit_s=0.2,
                idle_poll_s=0.02,
                settle_s=0,
            )
            queue.enqueue(PROJECT, fake.tasks, "v1")
            with pytest.raises(LabelStudioUnavailable, match=r"giving up .*Connection refused"):
                await worker.run_until_idle()

    asyncio.run(main())
    counts = queue.counts()
    assert counts[JobState.QUEUED] == 2 and counts[JobState.FAILED] == 0


def test_a_model_that_raises_fails_its_batch_with_the_reason_and_the_worker_goes_on(
    queue: SQLiteJobQueue, colour_model: Callable[..., ModelConfig]
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 7)))
    model = SegmentationModel.load(colour_model(channels=1, batch_size=2))
    real = model.predict_each
    calls = {"n": 0}

    def flaky(images: Any, prediction: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(images, prediction)

    model.predict_each = flaky  # type: ignore[method-assign]

    async def main() -> None:
        async with fake_client(fake.handler) as client:
            worker = make_worker(
                queue, client, model, prediction=PredictionConfig(min_pixels=0), settle_s=0
            )
            queue.enqueue(PROJECT, fake.tasks, "v1")
            await worker.run_until_idle()

    asyncio.run(main())
    jobs = [queue.get(PROJECT, t, "v1") for t in fake.tasks]
    failed = [j for j in jobs if j and j.state is JobState.FAILED]
    assert 1 <= len(failed) <= 2  # the first batch
    assert all(
        j.reason == "internal error in the model: RuntimeError: CUDA out of memory (simulated)"
        for j in failed
    )
    assert_one_correct_prediction_each(fake, [j.task for j in jobs if j and j not in failed])


def test_the_post_loop_survives_a_journal_error_and_posts_the_rest(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    class FlakyQueue(SQLiteJobQueue):
        failed_once = False

        def mark_done(self, job_id: int, reason: str | None = None) -> Any:
            if not self.failed_once:
                self.failed_once = True
                raise RuntimeError("journal write failed (simulated)")
            return super().mark_done(job_id, reason)

    fake = FakeLabelStudio(tasks=list(range(1, 9)))
    model = SegmentationModel.load(colour_model(channels=1, batch_size=2))

    async def main(queue: FlakyQueue) -> None:
        async with fake_client(fake.handler) as client:
            worker = make_worker(
                queue, client, model, prediction=PredictionConfig(min_pixels=0), settle_s=0
            )
            queue.enqueue(PROJECT, fake.tasks, "v1")
            stop = asyncio.Event()
            runner = asyncio.create_task(worker.run(stop))
            await until(lambda: queue.counts()[JobState.DONE] == 7 and worker.busy == 0)
            stop.set()
            await runner

    with FlakyQueue(tmp_path / "jobs.sqlite3", max_attempts=4) as queue:
        asyncio.run(main(queue))
        counts = queue.counts()
        # The one whose journal write failed is left running: the next start re-queues it.
        assert counts[JobState.RUNNING] == 1 and counts[JobState.FAILED] == 0
    assert_one_correct_prediction_each(fake, fake.tasks)


def test_a_full_worker_waits_for_a_free_slot_instead_of_polling_the_queue(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    """Jobs held up (posts not answered) fill the worker; the claim loop must then sleep."""
    calls = {"claim": 0, "next_due": 0}

    class CountingQueue(SQLiteJobQueue):
        def claim(self, limit: int) -> list[Any]:
            calls["claim"] += 1
            return super().claim(limit)

        def next_due(self) -> float | None:
            calls["next_due"] += 1
            return super().next_due()

    fake = FakeLabelStudio(tasks=list(range(1, 41)))
    model = SegmentationModel.load(colour_model(channels=1, batch_size=2))

    async def main() -> None:
        posts_may_answer = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                await posts_may_answer.wait()
            return fake.handler(request)

        with CountingQueue(tmp_path / "jobs.sqlite3", max_attempts=4) as queue:
            async with fake_client(handler) as client:
                worker = make_worker(
                    queue,
                    client,
                    model,
                    prediction=PredictionConfig(min_pixels=0),
                    concurrency=2,
                    settle_s=0,
                )
                queue.enqueue(PROJECT, fake.tasks, "v1")
                stop = asyncio.Event()
                runner = asyncio.create_task(worker.run(stop))
                await until(lambda: worker.busy == worker.held.capacity)
                before = dict(calls)
                await asyncio.sleep(0.5)
                assert calls["claim"] - before["claim"] <= 1
                assert calls["next_due"] - before["next_due"] <= 1
                posts_may_answer.set()
                await until(lambda: queue.pending() == 0 and worker.busy == 0)
                stop.set()
                await runner

    asyncio.run(main())
    assert len(fake.predictions) == 40


def test_a_job_is_posted_settle_s_after_it_was_queued_its_task_checked_then(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    """Label Studio sends TASKS_CREATED from inside the import: the worker reads and runs the
    model at once, but checks the task again and posts only once the import had its time."""
    import time

    fake = FakeLabelStudio(tasks=[1, 2])
    model = SegmentationModel.load(colour_model(channels=1))
    seen: list[tuple[float, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.time(), f"{request.method} {request.url.path}"))
        return fake.handler(request)

    async def main() -> float:
        with SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=4) as queue:
            async with fake_client(handler) as client:
                worker = make_worker(
                    queue, client, model, prediction=PredictionConfig(min_pixels=0), settle_s=0.5
                )
                queued_at = time.time()
                queue.enqueue(PROJECT, fake.tasks, "v1")
                await worker.run_until_idle()
                return queued_at

    queued_at = asyncio.run(main())
    reads = [at - queued_at for at, what in seen if what == "GET /api/tasks/"]
    posts = [at - queued_at for at, what in seen if what == "POST /api/predictions/"]
    assert reads[0] < 0.4  # the first read at once
    assert posts and min(posts) >= 0.45
    assert any(0.45 <= at <= min(posts) for at in reads)  # checked again just before
    assert_one_correct_prediction_each(fake, fake.tasks)


def test_a_task_not_visible_at_first_is_read_again_after_settle_s_spending_nothing(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    """The web UI's import: the webhook comes before the tasks are committed. No read of
    each task on its own, no attempt spent: the group read again once settle_s passed."""
    import time

    fake = FakeLabelStudio(tasks=[1, 2, 3])
    model = SegmentationModel.load(colour_model(channels=1))
    visible_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hidden = [3] if time.time() < visible_at[0] else []
        fake.tasks = [t for t in (1, 2, 3) if t not in hidden]
        return fake.handler(request)

    async def main() -> SQLiteJobQueue:
        queue = SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=4)
        async with fake_client(handler) as client:
            worker = make_worker(
                queue, client, model, prediction=PredictionConfig(min_pixels=0), settle_s=0.5
            )
            visible_at.append(time.time() + 0.3)
            queue.enqueue(PROJECT, [1, 2, 3], "v1")
            await worker.run_until_idle()
        return queue

    queue = asyncio.run(main())
    with queue:
        assert [r for r in fake.requests if TASK_RE.match(r.split()[1])] == []
        assert all(queue.get(PROJECT, t, "v1").attempts == 1 for t in (1, 2, 3))  # type: ignore[union-attr]
    assert_one_correct_prediction_each(fake, [1, 2, 3])
