"""Several ``ls-autoseg serve`` instances on one PostgreSQL queue, as separate OS processes,
against the session's real Label Studio: ``--role intake`` answers the webhooks, ``--role
worker`` instances predict. Workers are SIGKILLed and SIGSTOPped past their lease, the
database is restarted mid-run, and two instances share one reconcile schedule. Every task
still ends with exactly one correct prediction (decoded and compared with the mask its
picture must give), annotated tasks with none.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from service_harness import (
    HarnessService,
    MakeClient,
    ServiceEnv,
    another_instance,
    assert_correct,
    make_env,
    upload,
    wait_for_predictions,
)

from service import config as settings
from service.local import lsserver, pgserver

LEASE_S = 4.0
RECONCILE_PASS = "reconcile pass over"
# One status line per worker: "  host:pid:xxxx pid 123: alive, ... running 4, started ..."
WORKER_LINE = re.compile(r"^  \S+ pid (\d+): (alive|lost \(lease ran out\)), .*running (\d+),")

MakeModel = Callable[..., settings.ModelConfig]


def names(prefix: str, seeds: range) -> list[str]:
    return [f"{prefix}_{i}.png" for i in seeds]


def until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    explain: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{explain()}"
        time.sleep(0.1)


def start_all(*services: HarnessService) -> None:
    """Start them side by side: each start waits for its model and Label Studio."""
    with ThreadPoolExecutor(len(services)) as pool:
        for started in [pool.submit(service.start) for service in services]:
            started.result()


def workers_seen(service: HarnessService) -> dict[int, tuple[str, int]]:
    """``status``'s worker lines: pid -> (alive or lost, jobs it runs)."""
    _, text = service.status()
    found = {}
    for line in text.splitlines():
        match = WORKER_LINE.match(line)
        if match:
            found[int(match[1])] = (match[2], int(match[3]))
    return found


def pid(service: HarnessService) -> int:
    assert service.process is not None
    return service.process.pid


def holds_jobs(watcher: HarnessService, worker: HarnessService) -> bool:
    return workers_seen(watcher).get(pid(worker), ("", 0))[1] > 0


def import_annotated(ls_client: MakeClient, project: int, count: int) -> set[int]:
    """``count`` tasks imported with an annotation (an existing task's image): no prediction."""

    async def run() -> set[int]:
        async with ls_client() as ls:
            some = min([t async for t in ls.iter_tasks(project)], key=lambda t: t.id)
            body = {"data": {"image": some.data["image"]}, "annotations": [{"result": []}]}
            return set(await ls.import_tasks(project, [body] * count))

    return asyncio.run(run())


def settled(service: HarnessService, total: int) -> bool:
    counts, _ = service.status()
    return counts["queued"] == counts["running"] == 0 and sum(counts.values()) >= total


@dataclass
class Instances:
    """Makes a test's project and ``serve`` instances on one shared queue, and kills (after
    thawing) every one of them at the end, whatever happened."""

    tmp_path: Path
    label_studio: lsserver.LocalLabelStudio
    ls_client: MakeClient
    colour_model: MakeModel
    made: list[HarnessService] = field(default_factory=list)

    def intake(self, queue_url: str, **sections: dict[str, object]) -> ServiceEnv:
        """A project and its ``--role intake`` (not started); the webhook points at it."""
        env = make_env(
            self.tmp_path / "intake",
            self.label_studio,
            self.ls_client,
            self.colour_model(channels=2),
            role="intake",
            queue={"url": queue_url, "lease_s": LEASE_S},
            **sections,
        )
        self.made.append(env.service)
        return env

    def add(self, env: ServiceEnv, name: str, role: str = "worker") -> HarnessService:
        """Another instance of ``env``'s config (not started), in a folder of its own."""
        service = another_instance(env, self.tmp_path / name, role)
        self.made.append(service)
        return service

    def close(self) -> None:
        for service in self.made:
            if service.alive():
                assert service.process is not None
                service.process.send_signal(signal.SIGCONT)
            service.kill()


@pytest.fixture
def instances(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    colour_model: MakeModel,
) -> Iterator[Instances]:
    made = Instances(tmp_path, label_studio, ls_client, colour_model)
    yield made
    made.close()


@pytest.mark.labelstudio
@pytest.mark.slow
def test_killed_and_frozen_workers_leave_exactly_one_prediction_per_task(
    instances: Instances, ls_client: MakeClient, pg_url: str
) -> None:
    env = instances.intake(pg_url)
    intake, project = env.service, env.project
    killed = instances.add(env, "worker-a")
    frozen = instances.add(env, "worker-b")
    start_all(intake, killed, frozen)
    assert "webhook" not in killed.get("/ready").json()["checks"]

    # Imported in chunks (one import, one TASKS_CREATED webhook to the intake each).
    pictures = upload(ls_client, project, names("img", range(50)))
    annotated = import_annotated(ls_client, project, 3)
    until(lambda: holds_jobs(intake, killed), 60, "worker A to hold jobs")
    killed.stop(signal.SIGKILL)
    # The replacement starts while B works on; its jobs and A's wait for it or for B.
    replacement = instances.add(env, "worker-c")
    pictures |= upload(ls_client, project, names("img", range(50, 150)))
    replacement.start()
    pictures |= upload(ls_client, project, names("img", range(150, 200)))
    until(lambda: holds_jobs(intake, frozen), 60, "worker B to hold jobs")
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    pictures |= upload(ls_client, project, names("img", range(200, 300)))
    time.sleep(LEASE_S + 3)  # B's lease runs out: C takes its jobs
    assert workers_seen(intake)[pid(frozen)][0].startswith("lost")
    frozen.process.send_signal(signal.SIGCONT)

    total = 300 + len(annotated)
    tasks = wait_for_predictions(ls_client, project, 300, timeout=120)
    until(lambda: settled(intake, total), 60, "every job to be settled")
    time.sleep(1.0)  # a late post of the thawed worker would show now
    tasks = wait_for_predictions(ls_client, project, 300, timeout=1)
    assert len(tasks) == total
    assert_correct(tasks, pictures, annotated)

    counts, text = intake.status()
    assert counts["queued"] == counts["running"] == counts["failed"] == 0, text
    # A job posted by A just before the kill, then retried, ends "skipped: exists".
    assert counts["done"] + counts["skipped"] == total, text
    assert counts["done"] >= 300 - 10, text
    seen = workers_seen(intake)
    assert f"workers: {len(seen)}" in text, text
    assert seen[pid(frozen)][0] == "alive" and seen[pid(replacement)][0] == "alive", text
    # A's registry row stays until it ages out: listed, but lost.
    assert seen.get(pid(killed), ("lost",))[0].startswith("lost"), text
    assert all(service.alive() for service in (intake, frozen, replacement))
    assert frozen.get("/ready").status_code == 200, frozen.get("/ready").text


@pytest.mark.labelstudio
@pytest.mark.slow
def test_postgresql_restarted_mid_run_loses_nothing(
    tmp_path: Path, instances: Instances, ls_client: MakeClient
) -> None:
    with pgserver.cluster(tmp_path / "pg") as pg:
        # Webhooks refused (503) while the database is down are lost for good: the intake's
        # periodic reconcile (every 3 s) queues those tasks once it is back.
        env = instances.intake(pg.database("restart"), reconcile={"interval_s": 3.0})
        intake, project = env.service, env.project
        worker = instances.add(env, "worker")
        start_all(intake, worker)
        pictures = upload(ls_client, project, names("img", range(30)))
        tasks = wait_for_predictions(ls_client, project, 1, timeout=60)
        assert any(t.total_predictions for t in tasks), intake.tail() + worker.tail()
        pg.stop()
        stopped = time.monotonic()
        # Imported while the queue is down: the webhook is refused.
        pictures |= upload(ls_client, project, names("down", range(30, 45)))
        body = {"action": "TASKS_CREATED", "project": {"id": project}, "tasks": [{"id": 1}]}
        assert intake.webhook(body).status_code == 503

        def worker_says_queue() -> bool:
            answer = worker.get("/ready")
            return answer.status_code == 503 and "queue" in answer.json()["checks"]["queue"]

        until(worker_says_queue, 20, "the worker's /ready to blame the queue")
        assert worker.alive() and intake.alive()
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))
        pg.start()
        pictures |= upload(ls_client, project, names("up", range(45, 60)))

        tasks = wait_for_predictions(ls_client, project, 60, timeout=60)
        until(
            lambda: settled(intake, 60),
            30,
            "every job to be settled",
            lambda: intake.status()[1],
        )
        assert len(tasks) == 60
        assert_correct(tasks, pictures, set())
        counts, text = intake.status()
        assert counts["failed"] == 0 and counts["done"] + counts["skipped"] == 60, text
        until(lambda: worker.get("/ready").status_code == 200, 20, "the worker to be ready")
        for service in (intake, worker):
            assert service.stop() == 0, service.tail()


@pytest.mark.labelstudio
@pytest.mark.slow
def test_two_instances_make_one_reconcile_pass_per_interval(
    instances: Instances, pg_url: str
) -> None:
    interval_s, intervals = 3.0, 4
    env = instances.intake(pg_url, reconcile={"interval_s": interval_s, "on_startup": True})
    first = env.service
    second = instances.add(env, "worker")
    start_all(first, second)
    logs = (first.log, second.log)
    before = [path.read_text().count(RECONCILE_PASS) for path in logs]
    time.sleep(interval_s * intervals)
    after = [path.read_text().count(RECONCILE_PASS) for path in logs]
    passes = [n - m for n, m in zip(after, before, strict=True)]
    # Each instance alone would make one per interval: twice as many together.
    assert 2 <= sum(passes) <= intervals + 1, passes


def test_a_job_a_thawed_worker_found_lapsed_goes_to_another_worker(pg_url: str) -> None:
    """The queue's side of the database restart above, without its timing: a worker whose
    confirm (right before its post) finds the lease run out drops the job; its next heartbeat
    must not renew that lease, or the job stays running under it for ever and nobody, this
    worker included, takes it again."""
    from test_queue_contract import MAX_ATTEMPTS, FakeClock

    from service.queue.postgres import PostgresJobQueue

    clock = FakeClock()
    with (
        PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS, lease_s=LEASE_S, clock=clock) as a,
        PostgresJobQueue(pg_url, max_attempts=MAX_ATTEMPTS, lease_s=LEASE_S, clock=clock) as b,
    ):
        a.enqueue(1, [1, 2], "v1")
        held = [job.id for job in a.claim(2)]
        clock.advance(LEASE_S + 1)  # ``a`` frozen (or its database away) past the lease
        assert a.confirm(held) == set()  # back: it must not post, and drops both jobs
        a.heartbeat()  # alive again, renewing the leases it still holds: none of these
        taken = b.claim(10)
        assert [job.id for job in taken] == held[:1]  # one at a time, as suspect
        assert taken[0].suspect and taken[0].attempts == 2


def test_worker_role_on_the_sqlite_queue_exits_2_asking_for_queue_url(
    tmp_path: Path, colour_model: MakeModel
) -> None:
    config = settings.write_config(
        tmp_path / "config.yaml",
        colour_model(channels=2),
        label_studio=settings.LabelStudioConfig("http://127.0.0.1:9", "token"),
        projects=[settings.ProjectConfig(1)],
        state_dir=tmp_path / "state",
    )
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--role", "worker", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--role worker needs a shared queue" in done.stderr
    assert "queue.url" in done.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())
