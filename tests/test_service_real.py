"""The webhook service end to end: a real Label Studio sends TASKS_CREATED to a real
``ls-autoseg serve`` process, which posts predictions back. No manual step anywhere.

The model is an exact fake (red -> label_a, green -> label_b), so every prediction read back
is decoded and compared with the mask the image must give (tests/service_harness.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
from ls_fixtures import brush_result, tasks_of
from PIL import Image
from service_harness import (
    SECRET,
    MakeClient,
    ServiceEnv,
    assert_correct,
    make_env,
    upload,
    wait_for_predictions,
)

from service.config import ModelConfig
from service.labelstudio import PredictionIn
from service.labelstudio.queries import untouched_query
from service.local import lsserver

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


@pytest.fixture
def env(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    colour_model: Callable[..., ModelConfig],
) -> Iterator[ServiceEnv]:
    env = make_env(tmp_path, label_studio, ls_client, colour_model(channels=2))
    yield env
    env.service.kill()


def test_api_and_ui_imports_get_exactly_one_correct_prediction_each(
    env: ServiceEnv, ls_client: MakeClient
) -> None:
    service, project = env.service, env.project
    service.start()
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(6)])
    # The web UI's two steps: the webhook fires inside the import transaction.
    pictures |= upload(ls_client, project, [f"ui_{i}.png" for i in range(6, 12)], commit=False)

    # A task imported with an annotation must get no prediction.
    async def annotated_import() -> int:
        async with ls_client() as ls:
            tasks = [t async for t in ls.iter_tasks(project)]
            some = tasks[0]
            (task_id,) = await ls.import_tasks(
                project, [{"data": {"image": some.data["image"]}, "annotations": [{"result": []}]}]
            )
            return task_id

    annotated = asyncio.run(annotated_import())
    tasks = wait_for_predictions(ls_client, project, 12)
    assert len(tasks) == 13
    assert_correct(tasks, pictures, {annotated})

    # The same webhook delivered again (twice) adds nothing.
    body = {
        "action": "TASKS_CREATED",
        "project": {"id": project},
        "tasks": [{"id": t.id} for t in tasks],
    }
    for _ in range(2):
        answer = service.webhook(body)
        # Accepted again (made durable as given); the queue keeps one job per task.
        assert answer.status_code == 200 and answer.json()["queued"] == len(tasks)
    time.sleep(2)
    assert_correct(tasks_of(ls_client, project), pictures, {annotated})

    # Wrong secret and malformed bodies are refused; the service stays ready.
    assert service.webhook(body, secret="wrong").status_code == 401
    assert service.webhook(body, secret=None).status_code == 401
    bad = httpx.post(
        f"{service.url}/webhook", content=b"{not json", headers={"X-Webhook-Secret": SECRET}
    )
    assert bad.status_code == 400
    assert httpx.get(f"{service.url}/ready", timeout=5).status_code == 200
    assert service.stop() == 0
    log = service.log.read_text()
    assert SECRET not in log


def test_reconcile_covers_imports_while_the_service_was_down(
    env: ServiceEnv, ls_client: MakeClient
) -> None:
    service, project = env.service, env.project
    # Imported while nothing listens: Label Studio's webhooks are lost for good.
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(5)])

    # One task already holds another model's prediction: it still needs one of ours.
    async def other_model() -> int:
        async with ls_client() as ls:
            first = min([t.id async for t in ls.iter_tasks(project)])
            await ls.create_prediction(PredictionIn(first, brush_result(), 0.5, "other-v0"))
            return first

    other = asyncio.run(other_model())
    service.start()
    deadline = time.monotonic() + 90
    while True:
        tasks = tasks_of(ls_client, project)
        ours = [t for t in tasks if any(p.model_version == "svc-v1" for p in t.predictions or ())]
        if len(ours) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (mixed,) = [t for t in tasks if t.id == other]
    assert sorted(p.model_version for p in mixed.predictions or ()) == ["other-v0", "svc-v1"]
    mixed = dataclasses.replace(
        mixed, predictions=tuple(p for p in mixed.predictions or () if p.model_version == "svc-v1")
    )
    assert_correct([mixed, *(t for t in tasks if t.id != other)], pictures, set())
    assert service.stop() == 0

    # The filter itself: by version, exactly (the worker's check never saw these).
    async def untouched(version: str) -> set[int]:
        async with ls_client() as ls:
            return {t.id async for t in ls.iter_tasks(project, query=untouched_query(version))}

    assert asyncio.run(untouched("svc-v1")) == set()
    assert asyncio.run(untouched("other-v0")) == {t.id for t in tasks} - {other}


def test_sigkill_in_a_burst_then_restart_loses_and_duplicates_nothing(
    env: ServiceEnv, ls_client: MakeClient
) -> None:
    service, project = env.service, env.project
    service.start()
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(40)])
    # Kill as soon as the first predictions land: the rest are queued or in flight.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(t.total_predictions for t in tasks_of(ls_client, project)):
            break
        time.sleep(0.1)
    service.stop(signal.SIGKILL)
    service.start()
    tasks = wait_for_predictions(ls_client, project, 40)
    assert_correct(tasks, pictures, set())
    counts, text = service.status()
    # A job killed after its POST but before being marked done ends "skipped: exists" on the
    # restart: still exactly one prediction, as assert_correct checked.
    assert counts["queued"] == counts["running"] == counts["failed"] == 0, text
    assert counts["done"] + counts["skipped"] == 40, text
    assert service.stop() == 0


def test_sigterm_exits_zero_with_work_in_flight(env: ServiceEnv, ls_client: MakeClient) -> None:
    service, project = env.service, env.project
    service.start()
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(20)])
    assert service.stop(signal.SIGTERM) == 0
    service.start()
    tasks = wait_for_predictions(ls_client, project, 20)
    assert_correct(tasks, pictures, set())
    assert service.stop(signal.SIGINT) == 0


def test_backfill_predicts_existing_tasks_and_reports_failures(
    env: ServiceEnv, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    service, project, config = env.service, env.project, env.config
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(3)])
    black = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(black, format="PNG")

    async def more() -> tuple[int, int]:
        async with ls_client() as ls:
            empty, broken = await ls.upload_files(
                project, [("black.png", black.getvalue()), ("broken.png", b"\x89PNG not really")]
            )
            return empty, broken

    empty, broken = asyncio.run(more())
    old = {k: os.environ.get(k) for k in ("LABEL_STUDIO_TOKEN", "LS_AUTOSEG_WEBHOOK_SECRET")}
    os.environ.update({k: v for k, v in service.env.items() if k in old})
    try:
        code = main(["backfill", "--config", str(config)])
        status_code = main(["status", "--config", str(config)])
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = capsys.readouterr().out
    assert code == 1  # one task failed
    assert status_code == 0
    assert "backfill done: done 4, failed 1" in out
    assert f"task {broken} (attempts 1): task {broken} image: not a JPEG, PNG" in out
    tasks = {t.id: t for t in tasks_of(ls_client, project)}
    assert tasks[broken].total_predictions == 0
    (prediction,) = tasks[empty].predictions or ()
    assert prediction.result == ()  # the model saw it and found nothing
    del tasks[empty], tasks[broken]
    assert_correct(list(tasks.values()), pictures, set())


def test_reconcile_pages_by_id_while_tasks_leave_the_filter(
    tmp_path: Path, ls_client: MakeClient
) -> None:
    """The worker predicts queued tasks while reconcile pages on; page numbers would shift
    over tasks never seen (found by the memory benchmark: 100 of 5000 missed)."""
    from ls_fixtures import new_brush_project

    from service.intake.reconcile import reconcile
    from service.queue import SQLiteJobQueue

    class FastWorkerQueue(SQLiteJobQueue):
        """Predicts every task the moment it is queued, as a fast worker would."""

        def enqueue(self, project: int, task_ids: Sequence[int], model_version: str) -> int:
            async def predict() -> None:
                async with ls_client() as ls:
                    for task in task_ids:
                        await ls.create_prediction(
                            PredictionIn(task, brush_result(), 0.5, model_version)
                        )

            asyncio.run(predict())
            return super().enqueue(project, task_ids, model_version)

    async def run() -> tuple[set[int], int]:
        async with ls_client() as ls:
            project = (await new_brush_project(ls)).id
            ids = await ls.import_tasks(project, [{"data": {"image": "/x.png"}}] * 9)
            # one already predicted by us, one annotated: neither is reconciled
            await ls.create_prediction(PredictionIn(ids[4], brush_result(), 0.5, "svc-v1"))
            await ls.create_annotation(ids[7], brush_result())
            with FastWorkerQueue(tmp_path / "jobs.sqlite3", max_attempts=3) as queue:
                # reconcile runs in this loop; the queue's own loop runs in its thread
                new = await reconcile(ls, queue, project, "svc-v1", page_size=2)
                queued = {t for t in ids if queue.get(project, t, "svc-v1") is not None}
            return queued, new

    queued, new = asyncio.run(run())
    assert new == 7 and len(queued) == 7
