"""Processes that die or run twice, against the real ``serve`` and a real Label Studio 1.23.2:
a task that kills the service each time it reaches the model fails alone, and a second
``serve`` or a ``backfill`` beside a running ``serve`` takes none of its running jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_proxy import FaultProxy
from PIL import Image
from service_harness import (
    MakeClient,
    ServiceEnv,
    assert_correct,
    picture,
    upload,
    wait_for_predictions,
)
from test_faults_real import POSTS, StartEnv, drained, names, proxy, start_env, until

from service.config import ModelConfig
from service.constants import QUEUE_FILE
from service.labelstudio import Task
from service.queue import JobState, SQLiteJobQueue

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]
__all__ = ["proxy", "start_env"]  # fixtures, shared with test_faults_real

POISON = "poison_3.png"


class PoisonModel(torch.nn.Module):
    """The exact colour model, but an image with a bright blue pixel keeps it busy for
    ``rounds`` of matrix work (far longer than the test waits): the test kills the service
    while it is there, as an out-of-memory kill or a segfault in the model would."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        busy = torch.ones(64, 64)
        if bool((x[:, 2] > 0.5).any()):
            weight = torch.full((64, 64), 1.0 / 64)
            for _ in range(self.rounds):
                busy = torch.mm(busy, weight)
        return (x[:, :2] - 0.5) * 40.0 + 0.0 * busy.mean()


def poison_model(tmp_path: Path, base: ModelConfig) -> ModelConfig:
    path = tmp_path / "poison.pt"
    torch.jit.save(torch.jit.script(PoisonModel(2_000_000_000)), str(path))
    return dataclasses.replace(base, path=path)


def upload_with_poison(
    ls_client: MakeClient, project: int, clean: list[str]
) -> dict[str, np.ndarray]:
    """The clean pictures and ``POISON`` (a clean picture with one blue pixel), in one import
    (one webhook: one claim group); returns the clean ones' pixels."""
    files, pixels = [], {}
    for name in clean:
        data, image = picture(int(name.split("_")[1].split(".")[0]))
        files.append((name, data))
        pixels[name] = image
    _, image = picture(3)
    image[0, 0, 2] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    files.insert(2, (POISON, buf.getvalue()))

    async def run() -> None:
        async with ls_client() as ls:
            await ls.upload_files(project, files, commit=True)

    asyncio.run(run())
    return pixels


def jobs_of(env: ServiceEnv, tasks: list[Task]) -> dict[int, tuple[JobState, int, str | None]]:
    """Task id -> (state, attempts, reason) of each task's job, read from the queue file."""
    with SQLiteJobQueue(env.config.parent / "state" / QUEUE_FILE, max_attempts=99) as queue:
        jobs = {task.id: queue.get(env.project, task.id, "svc-v1") for task in tasks}
    return {task: (job.state, job.attempts, job.reason) for task, job in jobs.items() if job}


def test_a_task_that_kills_the_service_each_time_fails_alone(
    tmp_path: Path,
    start_env: StartEnv,
    ls_client: MakeClient,
    colour_model: Callable[..., ModelConfig],
    proxy: FaultProxy,
) -> None:
    attempts = 3
    env = start_env(
        poison_model(tmp_path, colour_model(channels=2)), worker={"max_attempts": attempts}
    )
    service = env.service
    clean = names("img", range(1, 8))
    pictures = upload_with_poison(ls_client, env.project, clean)
    poison_downloads = re.escape(POISON.removesuffix(".png"))
    for kill in range(1, attempts + 1):

        def downloaded(times: int = kill) -> bool:
            return proxy.count("GET", rf"^/data/upload/.*{poison_downloads}") >= times

        until(
            downloaded,
            120,
            f"download {kill} of the poison image",
        )
        time.sleep(2.0)  # decoded and in the model, which it never leaves
        assert service.alive(), service.tail()
        service.stop(signal.SIGKILL)
        service.start()
    tasks = wait_for_predictions(ls_client, env.project, len(clean), timeout=120)
    until(lambda: drained(env), 60, "the queue to drain")
    poisoned = {t.id for t in tasks if t.data["image"].endswith(POISON)}
    assert len(poisoned) == 1
    assert_correct(tasks, pictures, poisoned)  # exactly one correct prediction each
    jobs = jobs_of(env, tasks)
    assert len(jobs) == len(tasks)
    (poison_id,) = poisoned
    crashed = f"crashed the worker {attempts} times"
    assert jobs.pop(poison_id) == (JobState.FAILED, attempts, crashed)
    # Each neighbour lost one attempt to the first crash at most, then ran alone once.
    assert all(state is JobState.DONE and tries <= 2 for state, tries, _ in jobs.values()), jobs
    assert service.stop() == 0


def test_a_second_serve_and_a_backfill_beside_a_running_serve_take_none_of_its_jobs(
    tmp_path: Path,
    start_env: StartEnv,
    ls_client: MakeClient,
    proxy: FaultProxy,
) -> None:
    env = start_env()
    service = env.service
    assert service.process is not None
    serving = f"in use by pid {service.process.pid} (serve)"
    # serve's posts reach Label Studio but are not answered: its jobs stay running meanwhile.
    proxy.rule("POST", POSTS, "hold")
    pictures = upload(ls_client, env.project, names("img", range(8)))
    until(lambda: proxy.held >= 2, 60, "serve's posts, held")
    assert service.status()[0]["running"] == 8

    second = service.cli("serve")
    assert second.returncode == 2, second.stderr
    assert f"state_dir {tmp_path / 'state'} is {serving}" in second.stderr

    backfill = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "backfill", "--config", str(env.config)],
        env=service.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert backfill.stdout is not None
        first = backfill.stdout.readline()  # printed before it reconciles and claims
        assert serving in first, first
        # Past the point where it recovered before: its reconcile has run.
        assert "task(s) queued" in backfill.stdout.readline()
        assert service.status()[0]["running"] == 8  # serve's jobs, still serve's
        proxy.clear()
        proxy.release()
        _, err = backfill.communicate(timeout=120)
    finally:
        backfill.kill()
        backfill.wait()
    assert backfill.returncode == 0, err
    tasks = wait_for_predictions(ls_client, env.project, 8, timeout=60)
    until(lambda: drained(env), 60, "the queue to drain")
    assert_correct(tasks, pictures, set())
    # Nothing serve was running was re-queued or claimed a second time.
    jobs = jobs_of(env, tasks)
    assert len(jobs) == 8
    assert all(state is JobState.DONE and tries == 1 for state, tries, _ in jobs.values()), jobs
    assert service.alive() and service.get("/ready").status_code == 200
    assert service.stop() == 0
