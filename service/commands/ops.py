"""The service's operator commands: ``hook``, ``backfill`` and ``status``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterator
from typing import TextIO

from tqdm import tqdm

from service.config import Config
from service.errors import ConfigError, LabelStudioError
from service.intake.reconcile import reconcile
from service.labelstudio.webhooks import ensure_webhook
from service.model import load_segmenter
from service.queue import Job, JobState, existing_queue, open_queue
from service.server import check_projects, make_client
from service.statelock import StateLock, holder
from service.worker import Worker, WorkerSettings

log = logging.getLogger(__name__)

# backfill is a one-off command: an outage this long ends it (the queue keeps the jobs).
BACKFILL_OUTAGE_LIMIT_S = 300.0


async def register_hooks(config: Config, url: str, out: TextIO) -> None:
    """Create or update, idempotently, a TASKS_CREATED webhook in every configured project."""
    secret = config.require(config.server.webhook_secret, "server.webhook_secret")
    if not config.projects:
        raise ConfigError(f"{config.source}: projects lists no Label Studio project")
    async with make_client(config) as client:
        for project in config.projects:
            try:
                hook, created = await ensure_webhook(client, project.id, url, secret)
            except LabelStudioError as exc:
                if exc.status_code == 403:
                    raise ConfigError(f"project {project.id}: {exc}") from exc
                raise
            done = "created" if created else "updated"
            print(f"project {project.id}: webhook {hook.id} {done} -> {url}", file=out)


async def backfill(config: Config, project: int | None, out: TextIO) -> dict[JobState, int]:
    """One pass over existing tasks: queue the untouched ones and process until the queue is
    empty. Safe beside a live ``serve``: they share the queue, and only the process holding
    the state directory's lock recovers jobs a crash left running (see ``_lock_if_free``)."""
    model = load_segmenter(config.model)
    async with make_client(config) as client:
        targets = await check_projects(config, client, model.labels)
        if project is not None and project not in targets:
            raise ConfigError(f"project {project} is not in {config.source}")
        with _lock_if_free(config, out) as owner, open_queue(config) as queue:
            if owner:
                queue.recover()
            before = queue.counts()
            for project_id in [project] if project is not None else list(targets):
                new = await reconcile(client, queue, project_id, config.prediction.model_version)
                print(f"project {project_id}: {new} task(s) queued", file=out)
            total = queue.pending()
            settings = WorkerSettings(
                config.prediction,
                config.worker,
                outage_limit_s=BACKFILL_OUTAGE_LIMIT_S,
                bulk_predictions=config.label_studio.bulk_predictions,
            )
            worker = Worker(queue, client, model, targets, settings)
            with tqdm(total=total, unit="task", desc="backfill", disable=None) as bar:
                runner = asyncio.create_task(worker.run_until_idle())
                while not runner.done():
                    await asyncio.wait({runner}, timeout=0.5)
                    bar.n = max(0, total - queue.pending())
                    bar.refresh()
                await runner
            after = queue.counts()
    changed = {state: after[state] - before[state] for state in JobState}
    print(
        "backfill done: "
        + ", ".join(f"{state.value} {changed[state]}" for state in JobState if changed[state]),
        file=out,
    )
    return changed


@contextlib.contextmanager
def _lock_if_free(config: Config, out: TextIO) -> Iterator[bool]:
    """Hold the state directory's lock if it is free (True: no other process works on it, so
    backfill may recover what a crash left running). Beside a running ``serve``: False, and
    backfill only claims queued jobs, never the running ones that ``serve`` holds. On a shared
    queue: True, no lock (its ``recover`` takes only the jobs whose lease ran out)."""
    if config.queue.url is not None:
        yield True
        return
    lock = StateLock.try_acquire(config.state_dir, "backfill")
    if lock is None:
        print(
            f"state_dir {config.state_dir} is in use by {holder(config.state_dir)}: working"
            " beside it on queued jobs only",
            file=out,
        )
        yield False
        return
    with lock:
        yield True


def status(config: Config, out: TextIO, failures: int = 20) -> dict[JobState, int]:
    """Jobs by state, the jobs waiting for a retry and the most recent failures, each with its
    last reason (why work is stuck shows before it fails); needs no token."""
    found = existing_queue(config)
    if found is None:
        print(f"no job queue in {config.state_dir} yet: `serve` or `backfill` creates it", file=out)
        return {state: 0 for state in JobState}
    with found as queue:
        counts = queue.counts()
        waiting = queue.waiting_retries(failures)
        recent = queue.recent_failures(failures)
        workers = queue.workers()
        now, lease_s = time.time(), queue.lease_s
    print("jobs: " + ", ".join(f"{state.value} {counts[state]}" for state in JobState), file=out)
    if lease_s is not None:
        print(f"workers: {len(workers)}", file=out)
    for seen in workers:
        silent = now - seen.heartbeat_at
        alive = "alive" if lease_s is None or silent <= lease_s else "lost (lease ran out)"
        print(
            f"  {seen.id} pid {seen.pid}: {alive}, last heartbeat {_when(seen.heartbeat_at)}"
            f" ({silent:.0f} s ago), running {seen.running}, started {_when(seen.started_at)}",
            file=out,
        )
    for title, jobs, retry in (
        ("waiting for a retry", waiting, True),
        ("recent failures", recent, False),
    ):
        if jobs:
            print(f"{title}:", file=out)
        for job in jobs:
            print(_job_line(job, retry), file=out)
    return counts


def _job_line(job: Job, retry: bool) -> str:
    when = _when(job.not_before if retry else job.updated_at)
    state = f"next try {when}" if retry else when
    return (
        f"  {state} project {job.project} task {job.task} (attempts {job.attempts}): {job.reason}"
    )


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
