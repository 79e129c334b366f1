"""Running ``ls-autoseg serve`` against the session's real Label Studio, for the service and
fault tests: the service process, its config, pictures whose right masks are known (an exact
fake model: red -> label_a, green -> label_b), and checks of what Label Studio holds.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import yaml
from ls_fixtures import new_brush_project, tasks_of
from PIL import Image

from service import config as settings
from service.labelstudio import Task
from service.labelstudio.client import LabelStudioClient
from service.local import lsserver
from service.local.process import ServiceProcess
from service.results import decode_result

MakeClient = Callable[..., LabelStudioClient]
Section = TypeVar("Section")  # one of the config dataclasses
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


class HarnessService(ServiceProcess):
    """The shared ``ServiceProcess`` with this session's token and webhook secret, and the
    checks the tests make of it; ``role`` runs ``serve --role ROLE`` (default: plain ``serve``,
    which is ``--role all``)."""

    def __init__(
        self, config: Path, port: int, log: Path, token: str, *, role: str | None = None
    ) -> None:
        env = {**os.environ, "LABEL_STUDIO_TOKEN": token, "LS_AUTOSEG_WEBHOOK_SECRET": SECRET}
        command = None
        if role is not None:
            command = [sys.executable, "-m", "service.cli", "serve", "--role", role]
            command += ["--config", str(config)]
        super().__init__(config, port, log, env, command=command)

    def status(self) -> tuple[dict[str, int], str]:
        """``ls-autoseg status``: the job counts, and its whole output."""
        done = self.cli("status")
        assert done.returncode == 0, done.stderr
        first = done.stdout.splitlines()[0].removeprefix("jobs: ")
        counts = {k: int(v) for k, v in (item.split(" ") for item in first.split(", "))}
        return counts, done.stdout

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10)

    def webhook(self, body: object, secret: str | None = SECRET) -> httpx.Response:
        headers = {"X-Webhook-Secret": secret} if secret is not None else {}
        return httpx.post(f"{self.url}/webhook", json=body, headers=headers, timeout=10)


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
    from service.commands.naming import image_file_name

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


@dataclass
class ServiceEnv:
    project: int
    service: HarnessService
    config: Path


def make_env(
    tmp_path: Path,
    local_ls: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    model: settings.ModelConfig,
    *,
    via: str | None = None,
    role: str | None = None,
    **sections: Mapping[str, Any],
) -> ServiceEnv:
    """A fresh project, a config for ``serve`` (Label Studio at ``via`` if given, e.g. a fault
    proxy; ``sections`` replace fields of the config's sections, e.g.
    ``server={"max_body_bytes": 1000}``; a ``queue`` section is written only if given) and
    the webhook registered; the service runs ``serve --role role`` if given."""

    async def make_project() -> int:
        async with ls_client() as ls:
            return (await new_brush_project(ls)).id

    def section(name: str, value: Section) -> Section:
        return replace(value, **sections.pop(name, {}))

    project = asyncio.run(make_project())
    port = lsserver.free_port()
    token = settings.MissingEnv("LABEL_STUDIO_TOKEN")
    secret = settings.MissingEnv("LS_AUTOSEG_WEBHOOK_SECRET")
    label_map = {"red": "label_a", "green": "label_b"}
    prediction = settings.PredictionConfig(model_version="svc-v1", min_pixels=0)
    reconcile = settings.ReconcileConfig(on_startup=True, interval_s=3600)
    config = settings.write_config(
        tmp_path / "config.yaml",
        section("model", replace(model, labels=("red", "green"), batch_size=4)),
        prediction=section("prediction", prediction),
        label_studio=section(
            "label_studio", settings.LabelStudioConfig(via or local_ls.url, token)
        ),
        projects=[settings.ProjectConfig(project, label_map=label_map)],
        server=section("server", settings.ServerConfig(port=port, webhook_secret=secret)),
        state_dir=tmp_path / "state",
        reconcile=section("reconcile", reconcile),
        worker=section("worker", settings.WorkerConfig()),
        queue=section("queue", settings.QueueConfig()) if "queue" in sections else None,
    )
    assert not sections, f"not config sections: {sorted(sections)}"
    service = HarnessService(
        config, port, tmp_path / "service.log", local_ls.legacy_token, role=role
    )
    # Register the webhook the way an operator does.
    done = service.cli("hook", "--url", f"{service.url}/webhook")
    assert done.returncode == 0, done.stderr
    return ServiceEnv(project, service, config)


def another_instance(env: ServiceEnv, directory: Path, role: str | None = None) -> HarnessService:
    """One more instance of ``env``'s service: the same config (project, queue, model) but its
    own port, ``state_dir`` and log, all in ``directory``; not started."""
    document = yaml.safe_load(env.config.read_text(encoding="utf-8"))
    port = lsserver.free_port()
    document["server"]["port"] = port
    document["state_dir"] = str(directory / "state")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    token = env.service.env["LABEL_STUDIO_TOKEN"]
    return HarnessService(config, port, directory / "service.log", token, role=role)
