"""The webhook service end to end: a real Label Studio sends TASKS_CREATED to a real
``ls-autoseg serve`` process, which posts predictions back. No manual step anywhere.

The model is an exact fake (red -> label_a, green -> label_b), so every prediction read back
is decoded and compared with the mask the image must give.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import model_section
from ls_fixtures import new_brush_project, tasks_of
from PIL import Image

from service import lsserver
from service.config import ModelConfig
from service.labelstudio import LabelStudioClient, Task
from service.results import decode_result

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

MakeClient = Callable[..., LabelStudioClient]
SECRET = "test-webhook-secret-4f1c"


def picture(seed: int) -> tuple[bytes, np.ndarray]:
    """A PNG with a red block and a green band; returns the bytes and the RGB pixels."""
    rng = np.random.default_rng(seed)
    image = np.zeros((40 + seed % 7, 56 + seed % 5, 3), dtype=np.uint8)
    y, x = int(rng.integers(0, 20)), int(rng.integers(0, 30))
    image[y : y + 12, x : x + 18, 0] = 255
    image[3 : 9 + seed % 4, 20:50, 1] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue(), image


class ServiceProcess:
    """``ls-autoseg serve`` in a subprocess, as an operator runs it."""

    def __init__(self, config: Path, port: int, log: Path, token: str) -> None:
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.env = {**os.environ, "LABEL_STUDIO_TOKEN": token, "LS_AUTOSEG_WEBHOOK_SECRET": SECRET}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--config", str(self.config)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"service not ready:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def webhook(self, body: object, secret: str | None = SECRET) -> httpx.Response:
        headers = {"X-Webhook-Secret": secret} if secret is not None else {}
        return httpx.post(f"{self.url}/webhook", json=body, headers=headers, timeout=10)


@pytest.fixture
def env(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    colour_model: Callable[..., ModelConfig],
) -> Iterator[dict[str, object]]:
    async def make_project() -> int:
        async with ls_client() as ls:
            return (await new_brush_project(ls)).id

    project = asyncio.run(make_project())
    model = colour_model(channels=2)
    port = lsserver.free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "label_studio": {"url": label_studio.url, "token": "${LABEL_STUDIO_TOKEN}"},
                "model": model_section(model, labels=["red", "green"], batch_size=4),
                "prediction": {"model_version": "svc-v1", "min_pixels": 0},
                "projects": [{"id": project, "label_map": {"red": "label_a", "green": "label_b"}}],
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "webhook_secret": "${LS_AUTOSEG_WEBHOOK_SECRET}",
                },
                "state_dir": str(tmp_path / "state"),
                "reconcile": {"on_startup": True, "interval_s": 3600},
            }
        )
    )
    service = ServiceProcess(config, port, tmp_path / "service.log", label_studio.legacy_token)
    # Register the webhook the way an operator does.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "hook",
            "--config",
            str(config),
            "--url",
            f"{service.url}/webhook",
        ],
        env=service.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    yield {"project": project, "service": service, "config": config}
    if service.process and service.process.poll() is None:
        service.process.kill()
        service.process.wait()


def wait_for_predictions(
    ls_client: MakeClient, project: int, expected: int, timeout: float = 90
) -> list[Task]:
    deadline = time.monotonic() + timeout
    while True:
        tasks = tasks_of(ls_client, project)
        if sum(1 for t in tasks if t.total_predictions) >= expected or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def assert_correct(tasks: list[Task], pictures: dict[str, np.ndarray], annotated: set[int]) -> None:
    from service.naming import image_file_name

    for task in tasks:
        predictions = task.predictions or ()
        if task.id in annotated:
            assert predictions == (), f"annotated task {task.id} got a prediction"
            continue
        assert len(predictions) == 1, f"task {task.id} has {len(predictions)} predictions"
        (prediction,) = predictions
        assert prediction.model_version == "svc-v1"
        image = pictures[image_file_name(task.data["image"])]
        decoded = dict(decode_result(r) for r in prediction.result)
        np.testing.assert_array_equal(decoded["label_a"] > 0, image[..., 0] > 127)
        np.testing.assert_array_equal(decoded["label_b"] > 0, image[..., 1] > 127)


def upload(
    ls_client: MakeClient, project: int, names: list[str], commit: bool = True
) -> dict[str, np.ndarray]:
    files, pictures = [], {}
    for name in names:
        data, pixels = picture(int(name.split("_")[1].split(".")[0]))
        files.append((name, data))
        pictures[name] = pixels

    async def run() -> None:
        async with ls_client() as ls:
            ids = await ls.upload_files(project, files, commit=commit)
            if not commit:
                await ls.reimport(project, ids)

    asyncio.run(run())
    return pictures


def test_api_and_ui_imports_get_exactly_one_correct_prediction_each(
    env: dict[str, object], ls_client: MakeClient
) -> None:
    service, project = env["service"], env["project"]
    assert isinstance(service, ServiceProcess) and isinstance(project, int)
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
        assert answer.status_code == 200 and answer.json()["queued"] == 0
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
    env: dict[str, object], ls_client: MakeClient
) -> None:
    service, project = env["service"], env["project"]
    assert isinstance(service, ServiceProcess) and isinstance(project, int)
    # Imported while nothing listens: Label Studio's webhooks are lost for good.
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(5)])
    service.start()
    tasks = wait_for_predictions(ls_client, project, 5)
    assert_correct(tasks, pictures, set())
    assert service.stop() == 0


def test_sigkill_in_a_burst_then_restart_loses_and_duplicates_nothing(
    env: dict[str, object], ls_client: MakeClient
) -> None:
    service, project = env["service"], env["project"]
    assert isinstance(service, ServiceProcess) and isinstance(project, int)
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
    status = subprocess.run(
        [sys.executable, "-m", "service.cli", "status", "--config", str(env["config"])],
        env=service.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    counts = dict(item.split(" ") for item in status.stdout.splitlines()[0][6:].split(", "))
    # A job killed after its POST but before being marked done ends "skipped: exists" on the
    # restart: still exactly one prediction, as assert_correct checked.
    assert counts["queued"] == counts["running"] == counts["failed"] == "0", status.stdout
    assert int(counts["done"]) + int(counts["skipped"]) == 40, status.stdout
    assert service.stop() == 0


def test_sigterm_exits_zero_with_work_in_flight(
    env: dict[str, object], ls_client: MakeClient
) -> None:
    service, project = env["service"], env["project"]
    assert isinstance(service, ServiceProcess) and isinstance(project, int)
    service.start()
    pictures = upload(ls_client, project, [f"img_{i}.png" for i in range(20)])
    assert service.stop(signal.SIGTERM) == 0
    service.start()
    tasks = wait_for_predictions(ls_client, project, 20)
    assert_correct(tasks, pictures, set())
    assert service.stop(signal.SIGINT) == 0


def test_backfill_predicts_existing_tasks_and_reports_failures(
    env: dict[str, object], ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    service, project, config = env["service"], env["project"], env["config"]
    assert isinstance(service, ServiceProcess) and isinstance(project, int)
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
    assert f"task {broken} (attempts 1): task {broken} image: not an image" in out
    tasks = {t.id: t for t in tasks_of(ls_client, project)}
    assert tasks[broken].total_predictions == 0
    (prediction,) = tasks[empty].predictions or ()
    assert prediction.result == ()  # the model saw it and found nothing
    del tasks[empty], tasks[broken]
    assert_correct(list(tasks.values()), pictures, set())
