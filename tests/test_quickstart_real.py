"""``ls-autoseg quickstart``: its own Label Studio, and an existing one."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import ModelConfig, PredictionConfig, write_config
from service.labelstudio.client import LabelStudioClient
from service.local import lsserver
from service.local.quickstart import PROJECT_TITLE
from service.results import decode_result

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]


def setup_files(tmp_path: Path, model: ModelConfig) -> tuple[Path, Path, dict[str, np.ndarray]]:
    images = tmp_path / "images"
    images.mkdir()
    pictures = {}
    for i in range(4):
        pixels = np.zeros((30, 40 + i, 3), dtype=np.uint8)
        pixels[2 + i : 12 + i, 5:25, 0] = 255
        pixels[15:25, 10 + i : 30, 1] = 255
        Image.fromarray(pixels).save(images / f"pic_{i}.png")
        pictures[f"pic_{i}.png"] = pixels
    config = write_config(
        tmp_path / "config.yaml",
        dataclasses.replace(model, labels=("red", "green")),
        prediction=PredictionConfig(min_pixels=0, model_version="qs-v1"),
    )
    return config, images, pictures


def run_quickstart(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "quickstart", "--exit", "--timeout", "120", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_quickstart_starts_label_studio_and_gets_masks(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    config, images, _ = setup_files(tmp_path, colour_model(channels=2))
    done = run_quickstart(
        "--config", str(config), "--images-dir", str(images), "--data-dir", str(tmp_path / "qs")
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "predictions: 4 of 4 task(s)" in done.stdout
    assert "login: demo@example.com / " in done.stdout
    assert (tmp_path / "qs" / "credentials.json").exists()


def test_quickstart_on_an_existing_label_studio(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    ls_client: Callable[..., LabelStudioClient],
    colour_model: Callable[..., ModelConfig],
) -> None:
    config, images, pictures = setup_files(tmp_path, colour_model(channels=2))
    args = [
        "--config",
        str(config),
        "--images-dir",
        str(images),
        "--data-dir",
        str(tmp_path / "qs"),
    ]
    existing = ["--label-studio-url", label_studio.url, "--token", label_studio.legacy_token]
    done = run_quickstart(*args, *existing)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "predictions: 4 of 4 task(s)" in done.stdout
    assert label_studio.legacy_token not in done.stdout + done.stderr

    async def read() -> None:
        async with ls_client() as ls:
            (project,) = [p for p in await ls.list_projects() if p.title == PROJECT_TITLE]
            assert [c.labels for c in project.controls] == [("red", "green")]
            tasks = [t async for t in ls.iter_tasks(project.id, fields_all=True)]
            assert len(tasks) == 4
            for task in tasks:
                (prediction,) = task.predictions or ()
                decoded = dict(decode_result(r) for r in prediction.result)
                name = str(task.data["image"]).rsplit("-", 1)[-1]
                np.testing.assert_array_equal(decoded["red"] > 0, pictures[name][..., 0] > 127)

    asyncio.run(read())
    # A second run reuses the project and imports nothing new.
    again = run_quickstart(*args, *existing)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "imported" not in again.stdout and "predictions: 4 of 4 task(s)" in again.stdout
