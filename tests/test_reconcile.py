"""The Reconciler loop (intake/reconcile.py) on the real SQLite queue, with Label Studio's task
list replayed by httpx.MockTransport (the real server is used in test_service_real.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest

from service.config import ReconcileConfig
from service.errors import RetryableError
from service.intake import reconcile as reconcile_module
from service.intake.reconcile import Reconciler
from service.labelstudio.client import LabelStudioClient
from service.queue import JobState, SQLiteJobQueue

UNTOUCHED = {7: [11, 12, 13], 8: [21]}  # project -> tasks Label Studio lists as untouched


def label_studio(
    asked: list[int], broken: set[int], on_ask: Callable[[int], None] = lambda project: None
) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        project = int(request.url.params["project"])
        asked.append(project)
        on_ask(project)
        if project in broken:
            return httpx.Response(400, json={"detail": "bad query"})
        items = json.loads(request.url.params["query"])["filters"]["items"]
        after = next((i["value"] for i in items if i["filter"] == "filter:tasks:id"), 0)
        tasks = [{"id": t, "project": project, "data": {}} for t in UNTOUCHED[project] if t > after]
        return httpx.Response(200, json={"tasks": tasks, "total": len(tasks)})

    return httpx.MockTransport(handler)


def run_reconciler(
    tmp_path: Path,
    settings: ReconcileConfig,
    requests: list[int | None],
    broken: set[int],
    during_pass: list[int | None] | None = None,
) -> tuple[SQLiteJobQueue, list[int], int]:
    """Run a Reconciler of projects 7 and 8 for 0.3 s after ``requests``; ``during_pass`` are
    requested while Label Studio answers its first task read."""
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3)
    asked: list[int] = []
    woken = 0

    def on_new() -> None:
        nonlocal woken
        woken += 1

    async def run() -> None:
        later = list(during_pass or [])

        def on_ask(project: int) -> None:
            while later:
                reconciler.request(later.pop())

        transport = label_studio(asked, broken, on_ask)
        async with LabelStudioClient("http://ls.test", "0" * 40, transport=transport) as ls:
            reconciler = Reconciler(ls, queue, [7, 8], "v1", settings, on_new)
            for project in requests:
                reconciler.request(project)
            loop = asyncio.create_task(reconciler.run())
            await asyncio.sleep(0.3)
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop

    asyncio.run(run())
    return queue, asked, woken


def test_start_up_pass_queues_every_configured_project(tmp_path: Path) -> None:
    queue, asked, woken = run_reconciler(tmp_path, ReconcileConfig(), [], set())
    with queue:
        assert sorted(asked) == [7, 8]
        assert queue.counts()[JobState.QUEUED] == 4
        assert queue.get(7, 13, "v1") is not None and queue.get(8, 21, "v1") is not None
    assert woken == 2


def test_requests_name_one_project_and_unconfigured_ones_are_ignored(tmp_path: Path) -> None:
    settings = ReconcileConfig(on_startup=False)
    queue, asked, woken = run_reconciler(tmp_path, settings, [8, 99], set())
    with queue:
        assert asked == [8]  # 99 is not configured: Label Studio is not even asked
        assert queue.counts()[JobState.QUEUED] == 1
    assert woken == 1


def test_a_burst_of_requests_for_one_project_is_one_pass(tmp_path: Path) -> None:
    settings = ReconcileConfig(on_startup=False)
    queue, asked, woken = run_reconciler(tmp_path, settings, [8] * 200, set())
    with queue:
        assert asked == [8]
        assert queue.counts()[JobState.QUEUED] == 1
    assert woken == 1


def test_a_pending_all_covers_every_project(tmp_path: Path) -> None:
    settings = ReconcileConfig(on_startup=False)
    requests: list[int | None] = [8, None, 7, 8, None, 7]
    queue, asked, woken = run_reconciler(tmp_path, settings, requests, set())
    with queue:
        assert asked == [7, 8]  # one pass each, in config order
        assert queue.counts()[JobState.QUEUED] == 4
    assert woken == 2


def test_requests_during_a_pass_merge_into_one_pass_after_it(tmp_path: Path) -> None:
    # The running pass may have read past the tasks these requests announce.
    settings = ReconcileConfig(on_startup=False)
    queue, asked, _ = run_reconciler(tmp_path, settings, [7], set(), during_pass=[8, 7, 8, 7])
    with queue:
        assert asked == [7, 7, 8]
        assert queue.counts()[JobState.QUEUED] == 4


def test_a_failing_project_does_not_stop_the_others(tmp_path: Path) -> None:
    queue, asked, woken = run_reconciler(tmp_path, ReconcileConfig(), [], {7})
    with queue:
        assert sorted(asked) == [7, 8]
        assert queue.counts()[JobState.QUEUED] == 1
    assert woken == 1


class FailingOnce(SQLiteJobQueue):
    """The real queue, whose first ``enqueue`` fails as a queue that is away does."""

    failed = False

    def enqueue(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
        if not self.failed:
            self.failed = True
            raise RetryableError("the job queue is unreachable (enqueue): connection refused")
        return super().enqueue(project, task_ids, model_version)


def test_a_pass_the_queue_refused_comes_again_soon_and_a_bad_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a webhook refused with 503 asks for: its project's pass, while the queue is away.
    monkeypatch.setattr(reconcile_module, "RETRY_FAILED_S", 0.05)
    queue = FailingOnce(tmp_path / "jobs.sqlite3", max_attempts=3)
    asked: list[int] = []
    settings = ReconcileConfig(on_startup=False, interval_s=3600)

    async def run() -> None:
        transport = label_studio(asked, broken={8})
        async with LabelStudioClient("http://ls.test", "0" * 40, transport=transport) as ls:
            reconciler = Reconciler(ls, queue, [7, 8], "v1", settings, lambda: None)
            reconciler.request(7)
            reconciler.request(8)  # Label Studio answers 400: not retried
            loop = asyncio.create_task(reconciler.run())
            await asyncio.sleep(0.4)
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop

    asyncio.run(run())
    with queue:
        assert asked.count(7) == 2 and asked.count(8) == 1, asked
        assert sorted(job.task for job in queue.claim(10)) == UNTOUCHED[7]


def test_the_start_up_pass_runs_even_right_after_another_instances_pass(tmp_path: Path) -> None:
    # A serve restarted soon after its last pass (or a second instance on a shared queue):
    # the periodic turn is taken, but tasks imported while it was down must not wait.
    with SQLiteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3) as earlier:
        assert earlier.take_turn("reconcile", ReconcileConfig().interval_s)
    queue, asked, _ = run_reconciler(tmp_path, ReconcileConfig(), [], set())
    with queue:
        assert sorted(asked) == [7, 8]
        assert queue.counts()[JobState.QUEUED] == 4
