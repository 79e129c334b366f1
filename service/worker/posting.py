"""Storing a post group's checked predictions in Label Studio, exactly one per task.

Label Studio 1.23.2 spends ~20 ms of its CPU on any request before its own work, and one
``POST /api/predictions/`` runs ~26 SQL statements (25-30 ms in all); its bulk
``import/predictions`` stores a group of 16 for ~3 ms a prediction, but only when it runs with
``constants.BULK_PREDICTIONS_FLAG`` set: without it each call recounts every task of the
project (3.1 s a call at 6000 tasks). ``label_studio.bulk_predictions`` chooses: ``auto``
asks Label Studio once per project which path it runs (``bulk_is_cheap``), ``on`` always
posts in bulk, ``off`` never.

Exactly one prediction per task, whatever happens to a bulk call:

- Label Studio answered an error (a task deleted meanwhile: 400 for the call; with its
  ``PREDICTION_IMPORT_BATCH_SIZE`` under the call's size, batches before the bad id were
  stored), or created fewer than sent (its legacy path drops what does not fit the label
  config): the group's tasks are read again; those that hold a prediction of this
  model_version now are done, the rest are posted one request each, so one bad task fails
  alone.
- No answer (a timeout, a connection lost, a 5xx): it may have stored some or all, or not yet.
  The group goes back to the queue (``PostUnanswered``); each retry reads its task first and
  skips it if a prediction is there, and one stored only after that read is undone after the
  retry's own post: the first one stays (the same rule for a single POST without answer).

On a shared queue (``leases.py``) the worker asks before and after the call whether it still
holds the jobs; a job it lost meanwhile, or one tried before, gets the first-one-stays check.
"""

from __future__ import annotations

import asyncio
import logging

from service.constants import BulkMode
from service.errors import (
    AutosegError,
    LabelStudioError,
    LabelStudioUnavailable,
    LeaseLost,
    PostUnanswered,
    RetryableError,
    SkipJob,
)
from service.labelstudio import PredictionIn
from service.labelstudio.client import LabelStudioClient
from service.queue import Job
from service.worker.leases import Leases
from service.worker.tasks import TaskReader

log = logging.getLogger(__name__)

MAX_PREDICTIONS_PER_IMPORT = 500
"""Predictions per bulk call, at most: Label Studio's ``PREDICTION_IMPORT_BATCH_SIZE`` default,
so that one call is one of its batches (checked, then stored, or refused as a whole)."""

Posted = BaseException | str  # a job's outcome: the done reason, or the error


class Poster:
    """Posts checked predictions of one project: in bulk or one request each (see module)."""

    def __init__(
        self,
        client: LabelStudioClient,
        leases: Leases,
        tasks: TaskReader,
        *,
        mode: BulkMode,
        concurrency: int,
    ) -> None:
        self.client = client
        self.leases = leases
        self.tasks = tasks
        self.mode = mode
        self.concurrency = concurrency
        self._cheap: dict[int, bool] = {}  # auto: Label Studio's answer, per project

    async def post(self, project: int, items: list[tuple[Job, PredictionIn]]) -> list[Posted]:
        """One outcome per item, in order."""
        if not items:
            return []
        if await self._bulk(project):
            outcomes: list[Posted] = []
            for start in range(0, len(items), MAX_PREDICTIONS_PER_IMPORT):
                chunk = items[start : start + MAX_PREDICTIONS_PER_IMPORT]
                outcomes += await self._post_bulk(project, chunk)
            return outcomes
        return await self._post_each(items)

    async def _bulk(self, project: int) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        cheap = self._cheap.get(project)
        if cheap is None:
            try:
                cheap = await self.client.bulk_is_cheap(project)
            except LabelStudioError as exc:  # an answer, not the expected one: not cheap
                log.warning("project %s: bulk posts taken as not cheap: %s", project, exc)
                cheap = False
            except AutosegError as exc:  # asked again next time; meanwhile one request each
                log.warning(
                    "project %s: cannot tell whether bulk posts are cheap: %s", project, exc
                )
                return False
            self._cheap[project] = cheap
            log.info(
                "project %s: predictions are stored %s",
                project,
                "in bulk"
                if cheap
                else "one request each (Label Studio runs without the bulk import's "
                "feature flag; see label_studio.bulk_predictions)",
            )
        return cheap

    # ------------------------------------------------------------------ bulk

    async def _post_bulk(self, project: int, items: list[tuple[Job, PredictionIn]]) -> list[Posted]:
        outcomes: dict[int, Posted] = {}
        try:
            held = await self.leases.holding([job for job, _ in items])
        except Exception as exc:  # the queue away: whether the jobs are still ours, unknown
            return [exc for _ in items]
        sending = []
        for job, prediction in items:
            if job.id in held:
                sending.append((job, prediction))
            else:
                outcomes[job.id] = LeaseLost(f"job {job.id}: its lease ran out before the post")
        if sending:
            for job, outcome in await self._send_bulk(project, sending):
                outcomes[job.id] = outcome
            await self._after_post([job for job, _ in sending], outcomes)
        return [outcomes[job.id] for job, _ in items]

    async def _send_bulk(
        self, project: int, items: list[tuple[Job, PredictionIn]]
    ) -> list[tuple[Job, Posted]]:
        try:
            created = await self.client.import_predictions(
                project, [prediction for _, prediction in items], retry=False
            )
        except LabelStudioError as exc:  # answered: what it stored is there to read
            log.warning(
                "project %s: a bulk post of %d failed (%s); reading what it stored",
                project,
                len(items),
                exc,
            )
        except RetryableError as exc:  # no clear answer: retried through the queue
            unanswered = PostUnanswered(exc)
            return [(job, unanswered) for job, _ in items]
        except Exception as exc:  # no answer either (a bug, a cancel): retried, read first
            return [(job, exc) for job, _ in items]
        else:
            if created == len(items):
                return [(job, f"prediction (bulk of {len(items)})") for job, _ in items]
            log.warning(
                "project %s: a bulk post stored %d of %d; reading which",
                project,
                created,
                len(items),
            )
        return await self._recover(project, items)

    async def _recover(
        self, project: int, items: list[tuple[Job, PredictionIn]]
    ) -> list[tuple[Job, Posted]]:
        """After a bulk call that stored some or none: done where a prediction of this
        model_version is there now, the rest posted one request each."""
        checked = await self.tasks.read(project, [job for job, _ in items])
        again: list[tuple[Job, PredictionIn]] = []
        outcomes: dict[int, Posted] = {}
        for (job, prediction), (_, outcome) in zip(items, checked, strict=True):
            if isinstance(outcome, SkipJob) and str(outcome) == "exists":
                outcomes[job.id] = "prediction (stored by a bulk call that then failed)"
            elif isinstance(outcome, BaseException):
                outcomes[job.id] = outcome
            else:
                again.append((job, prediction))
        if again:
            posted = await self._post_each(again)
            for (job, _), result in zip(again, posted, strict=True):
                outcomes[job.id] = result
        return [(job, outcomes[job.id]) for job, _ in items]

    # ------------------------------------------------------------------ one each

    async def _post_each(self, items: list[tuple[Job, PredictionIn]]) -> list[Posted]:
        """One request each, ``concurrency`` at once, each tried once."""
        limit = asyncio.Semaphore(self.concurrency)

        async def one(job: Job, prediction: PredictionIn) -> Posted:
            async with limit:
                try:
                    if not await self.leases.holds(job):
                        return LeaseLost(f"job {job.id}: its lease ran out before the post")
                    created = await self.client.create_prediction(
                        prediction, retry=False, project=job.project
                    )
                except LabelStudioUnavailable as exc:  # no clear answer: it may land later
                    return PostUnanswered(exc)
                except Exception as exc:  # the post, or the queue away: this job's outcome
                    return exc
                outcomes: dict[int, Posted] = {job.id: f"prediction {created}"}
                await self._after_post([job], outcomes, created=created)
                return outcomes[job.id]

        return list(await asyncio.gather(*(one(job, prediction) for job, prediction in items)))

    # ------------------------------------------------------------------ after a post

    async def _after_post(
        self, jobs: list[Job], outcomes: dict[int, Posted], *, created: int | None = None
    ) -> None:
        """Ask again whether the posted jobs are still ours; a job lost meanwhile, or one
        that may have raced, gets the first-one-stays check (``Leases.keep_first``)."""
        posted = [job for job in jobs if isinstance(outcomes[job.id], str)]
        if not posted:
            return
        try:
            held = await self.leases.holding(posted)
        except Exception:
            held = set()  # the queue away: whether another has the jobs, unknown
        for job in posted:
            if job.id not in held or self.leases.may_race(job):
                await self.leases.keep_first(job, created)
            if job.id not in held:
                outcomes[job.id] = LeaseLost(f"job {job.id}: its lease ran out during the post")
