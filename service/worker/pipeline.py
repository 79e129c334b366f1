"""The job pipeline: queue -> Label Studio task -> image -> model -> brush results -> prediction.

Three stages overlap so the model is never idle while there is work:

- *prepare*: the jobs claimed together (at least a model batch while others are in flight)
  are re-read from Label Studio in one list request per project (the webhook body is never
  trusted for URLs); a task a person annotated or that holds a prediction of this
  model_version is skipped; then each image is downloaded (up to ``concurrency`` at once)
  and decoded;
- *infer* (one at a time): batch the prepared images, up to ``model.batch_size``, waiting only
  ``batch_wait_s`` for a batch to fill, and run the model in a thread;
- *post* (one group at a time): take whatever results wait (up to four model batches),
  encode their masks, re-read their tasks in one request (annotated meanwhile? posted by an
  earlier attempt whose answer was lost?) and post each prediction, ``concurrency`` at once,
  each tried once.

Label Studio's own CPU is the bottleneck of this service (it answers from one process): per
task, ``GET /api/tasks/{id}/`` costs it ~60 ms, a list read of a group 3-8 ms, so tasks are
read in groups; a task missing from a list read is read on its own (404 grace, another
project), and a list read that fails while Label Studio answers falls back to single reads,
so one bad task fails alone. Predictions are posted one per request (30-50 ms each): the bulk
``import/predictions`` recounts every task of the project on each call, a cost that grows
without bound with the project (see ``_post``).

Failures are sorted by the exception tree: a ``RetryableError`` (connection, timeout, 429,
5xx) sends the job back to the queue with exponential backoff until the queue's attempt limit;
a 404 for the task is retried for ``not_found_grace_s`` (the web UI's import sends the webhook
before its transaction commits); any other error fails the job at once with its reason. One
bad task never stops the others.

An outage is not a job's failure. When a job fails with a ``RetryableError`` or an
``AuthError``, the worker asks Label Studio who it is (``verify``): if that fails too, Label
Studio as a whole is down or the token was revoked, so the job goes back to the queue without
spending an attempt, the worker stops claiming and probes every ``outage_probe_s`` seconds,
and resumes on its own once Label Studio answers (a revoked token: once the service runs with
a valid one). Jobs wait out any outage; ``outage_limit_s`` (for ``backfill``) ends the wait
with an error instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from service.config import PredictionConfig, WorkerConfig
from service.errors import AuthError, AutosegError, NotFoundError, RetryableError
from service.labelstudio import LabelStudioClient, PredictionIn, Task
from service.model import ImagePrediction, Segmenter
from service.model.images import decode_image
from service.queue import Job, JobQueue
from service.results import BrushTarget, build_prediction

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _trim_heap() -> None:
    """Give freed heap pages back to the OS. glibc keeps the freed image-sized blocks of
    each batch (~500 MB on 2000x1500 images), which would count as the service's memory."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class WorkerMetrics(Protocol):
    def job_finished(self, state: str, seconds: float) -> None: ...

    def job_retried(self) -> None: ...

    def inference(self, batch_size: int, seconds: float) -> None: ...

    def outage(self, active: bool) -> None: ...


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker runs with: the prediction settings, the operator's worker section, and
    how long a one-off run (``backfill``) waits out an outage (None: as long as it takes)."""

    prediction: PredictionConfig
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    outage_limit_s: float | None = None


class SkipJob(Exception):
    """Not an error: the job ends as ``skipped`` with this reason."""


@dataclass
class _Prepared:
    job: Job
    image: np.ndarray
    started: float


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        client: LabelStudioClient,
        model: Segmenter,
        targets: Mapping[int, BrushTarget],
        settings: WorkerSettings,
        *,
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.client = client
        self.model = model
        self.targets = dict(targets)
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._wake = asyncio.Event()
        # Jobs held at once (claimed, not yet settled): enough to keep downloads, one batch in
        # the model and posts all busy, few enough that a crash re-queues little.
        self._capacity = settings.worker.concurrency * 2 + model.batch_size * 2
        # Claim in groups of at least a model batch while others are held: every claim costs
        # Label Studio one task-list request, whose fixed cost dominates a group of one.
        self._claim_min = min(self._capacity, model.batch_size)
        self._post_max = model.batch_size * 4  # results per post group, at most
        self.busy = 0
        self._freed = asyncio.Event()  # set when a held job is settled: room to claim
        self._ready: asyncio.Queue[_Prepared] = asyncio.Queue()
        self._results: asyncio.Queue[tuple[_Prepared, ImagePrediction | str]] = asyncio.Queue()
        self._posting: list[tuple[_Prepared, ImagePrediction | str]] = []  # in a post now
        self._tasks: set[asyncio.Task[None]] = set()
        self._io = asyncio.Semaphore(settings.worker.concurrency)
        self._batch: list[_Prepared] = []  # in the model right now
        self.outage: str | None = None  # why Label Studio cannot be used right now
        self._outage_since = 0.0
        self._outage_lock = asyncio.Lock()

    def wake(self) -> None:
        """New jobs were queued: stop waiting."""
        self._wake.set()

    # ------------------------------------------------------------------ main loops

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process jobs until ``stop`` is set; then finish or release what is held."""
        loops = [
            asyncio.create_task(self._infer_loop(), name="infer"),
            asyncio.create_task(self._post_loop(), name="post"),
        ]
        try:
            await self._claim_loop(stop)
        finally:
            await self._shutdown(loops)

    async def run_until_idle(self) -> None:
        """Process until no job is queued or running (backfill): retries included."""
        stop = asyncio.Event()
        runner = asyncio.create_task(self.run(stop))
        try:
            while True:
                pending = await asyncio.to_thread(self.queue.pending)
                if pending == 0 and self.busy == 0:
                    break
                if runner.done():
                    await runner  # surfaces an error
                    return
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await runner

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.outage is not None:
                await self._probe(stop)
                continue
            free = self._capacity - self.busy
            if free <= 0 or (self.busy > 0 and free < self._claim_min):
                # Full: wait for a held job to settle (not for the queue: it has work due).
                self._freed.clear()
                await _first(self._freed.wait(), stop.wait())
                continue
            jobs = await asyncio.to_thread(self.queue.claim, free)
            by_project: dict[int, list[Job]] = {}
            for job in jobs:
                self.busy += 1
                by_project.setdefault(job.project, []).append(job)
            for project, group in by_project.items():
                self._spawn(self._prepare_group(project, group))
            if jobs:
                continue
            await self._wait(stop)

    async def _wait(self, stop: asyncio.Event) -> None:
        timeout = self.settings.worker.idle_poll_s
        due = await asyncio.to_thread(self.queue.next_due)
        if due is not None:
            timeout = min(timeout, max(0.0, due - self.clock()))
        self._wake.clear()
        await _first(self._wake.wait(), stop.wait(), timeout=timeout)

    # ------------------------------------------------------------------ outages

    async def _label_studio_down(self) -> bool:
        """After a retryable or auth failure: is Label Studio as a whole unusable?"""
        async with self._outage_lock:
            if self.outage is not None:
                return True
            try:
                await self.client.verify(retries=1)
            except (RetryableError, AuthError) as exc:
                self.outage = str(exc)
                self._outage_since = time.monotonic()
                log.warning(
                    "Label Studio unusable, jobs wait in the queue (not failed) and the worker "
                    "probes every %.0f s: %s",
                    self.settings.worker.outage_probe_s,
                    self.outage,
                )
                if self.metrics:
                    self.metrics.outage(True)
                return True
            except AutosegError:
                return False
            return False

    async def _probe(self, stop: asyncio.Event) -> None:
        """One outage probe after ``outage_probe_s``; ends the outage when Label Studio answers."""
        await _first(stop.wait(), timeout=self.settings.worker.outage_probe_s)
        if stop.is_set():
            return
        down_s = time.monotonic() - self._outage_since
        try:
            await self.client.verify(retries=0)
        except (RetryableError, AuthError) as exc:
            limit = self.settings.outage_limit_s
            if limit is not None and down_s >= limit:
                raise type(exc)(
                    f"Label Studio unusable for {down_s:.0f} s, giving up (queued jobs are "
                    f"kept): {exc}"
                ) from exc
            if str(exc) != self.outage:
                log.warning("Label Studio still unusable: %s", exc)
                self.outage = str(exc)
            return
        except AutosegError as exc:
            log.warning("Label Studio probe: %s", exc)
        log.info("Label Studio usable again after %.0f s: resuming", down_s)
        self.outage = None
        if self.metrics:
            self.metrics.outage(False)

    def _settled_one(self) -> None:
        self.busy -= 1
        self._freed.set()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self, loops: list[asyncio.Task[None]]) -> None:
        """Let jobs in flight finish for a while, then cancel them (they are released)."""
        deadline = time.monotonic() + self.settings.worker.shutdown_grace_s
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for loop in loops:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        # Images that never reached the model, results never posted: back to the queue unused.
        left = _drain(self._ready) + [item for item, _ in _drain(self._results)]
        for item in left:
            await self._release(item.job)
            self._settled_one()

    def _in_flight(self) -> bool:
        return bool(
            self._tasks
            or self._batch
            or self._posting
            or not self._ready.empty()
            or not self._results.empty()
        )

    # ------------------------------------------------------------------ stages

    async def _prepare_group(self, project: int, jobs: list[Job]) -> None:
        """Read the group's tasks in one request, then fetch each image on its own."""
        started = self.clock()
        unsettled = {job.id: job for job in jobs}
        try:
            settle = (
                max(job.created_at for job in jobs) + self.settings.worker.settle_s - self.clock()
            )
            if settle > 0:
                await asyncio.sleep(settle)
            async with self._io:
                outcomes = await self._read(project, jobs)
            for job, outcome in outcomes:
                del unsettled[job.id]
                if isinstance(outcome, BaseException):
                    await self._conclude(job, outcome, started)
                else:
                    self._spawn(self._prepare(job, outcome, started))
        except BaseException as exc:
            for job in unsettled.values():
                await self._conclude(job, exc, started, reraise=False)
            raise

    async def _prepare(self, job: Job, task: Task, started: float) -> None:
        handed_over = False
        try:
            async with self._io:
                target = self._target(job)
                url = task.data.get(target.data_key)
                if not isinstance(url, str) or not url:
                    raise _Permanent(f"task has no image URL under data key {target.data_key!r}")
                data = await self.client.download(task.id, url)
            image = await asyncio.to_thread(
                decode_image,
                data,
                max_pixels=self.settings.prediction.max_pixels,
                name=f"task {task.id} image",
            )
            await self._ready.put(_Prepared(job, image, started))
            handed_over = True
        except BaseException as exc:
            await self._settle(job, exc, started)
        finally:
            if not handed_over:
                self._settled_one()

    async def _read(self, project: int, jobs: list[Job]) -> list[tuple[Job, Task | BaseException]]:
        """Each job's task, re-read from Label Studio and checked (see ``_checked``), or why not.

        One list request for the group; a task missing from its answer, or every task when the
        request fails while Label Studio itself answers, is read on its own, so one bad task
        fails alone. When Label Studio as a whole is unusable every job gets that error.
        """
        found: dict[int, Task] | None = None
        try:
            found = await self.client.get_tasks(project, [job.task for job in jobs])
        except AutosegError as exc:
            if isinstance(exc, RetryableError | AuthError) and await self._label_studio_down():
                return [(job, exc) for job in jobs]
            log.warning(
                "project %s: group read of %d tasks failed, reading one by one: %s",
                project,
                len(jobs),
                exc,
            )
        outcomes: list[tuple[Job, Task | BaseException]] = []
        for job in jobs:
            try:
                task = found.get(job.task) if found is not None else None
                if task is None:
                    task = await self._task(job)
                outcomes.append((job, self._checked(job, task)))
            except Exception as exc:
                outcomes.append((job, exc))
        return outcomes

    async def _task(self, job: Job) -> Task:
        """Read one task (a 404 within ``not_found_grace_s`` of queueing is retried)."""
        try:
            return await self.client.get_task(job.task)
        except NotFoundError as exc:
            if self.clock() - job.created_at < self.settings.worker.not_found_grace_s:
                raise _NotYet(f"task {job.task} not found yet (import not committed?)") from exc
            raise

    def _checked(self, job: Job, task: Task) -> Task:
        """The task, unless it belongs elsewhere, a person annotated it or this version
        predicted it."""
        if task.project is not None and task.project != job.project:
            raise _Permanent(f"task {job.task} belongs to project {task.project}")
        if task.is_annotated:
            raise SkipJob("annotated")
        if task.has_prediction_of(self.settings.prediction.model_version):
            raise SkipJob("exists")
        return task

    async def _infer_loop(self) -> None:
        batch_size = self.model.batch_size
        while True:
            batch = [await self._ready.get()]
            # From here until the results are queued for posting, the batch is only here:
            # ``_batch`` tells shutdown so, and a cancel gives its jobs back to the queue.
            self._batch = batch
            try:
                deadline = time.monotonic() + self.settings.worker.batch_wait_s
                while len(batch) < batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 and self._ready.empty():
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._ready.get(), max(remaining, 0)))
                    except TimeoutError:
                        break
                began = time.perf_counter()
                try:
                    results = await asyncio.to_thread(
                        self.model.predict_each,
                        [item.image for item in batch],
                        self.settings.prediction,
                    )
                except Exception as exc:  # a bug, not a bad image: fail the batch, go on
                    log.exception("model failed on a batch of %d", len(batch))
                    reason = f"internal error in the model: {type(exc).__name__}: {exc}"
                    results = [reason] * len(batch)
            except asyncio.CancelledError:
                for item in batch:
                    await self._release(item.job)
                    self._settled_one()
                raise
            finally:
                self._batch = []
            for item, result in zip(batch, results, strict=True):
                self._results.put_nowait((item, result))
            if self.metrics:
                self.metrics.inference(len(batch), time.perf_counter() - began)
            await asyncio.to_thread(_trim_heap)

    async def _post_loop(self) -> None:
        """Post results in groups: whatever waits (up to ``_post_max``) goes in one request, so
        posts grow with the load instead of one per model batch."""
        while True:
            group = [await self._results.get()]
            while len(group) < self._post_max and not self._results.empty():
                group.append(self._results.get_nowait())
            by_project: dict[int, list[tuple[_Prepared, ImagePrediction | str]]] = {}
            for item, result in group:
                by_project.setdefault(item.job.project, []).append((item, result))
            pending = list(by_project.items())
            self._posting = group
            try:
                while pending:
                    try:
                        await self._post_group(*pending[0])  # settles each item, even on errors
                    except Exception:
                        log.exception("posting a group for project %s failed", pending[0][0])
                    pending.pop(0)
            except asyncio.CancelledError:
                for _, items in pending[1:]:  # never handed to _post_group
                    for item, _ in items:
                        await self._release(item.job)
                        self._settled_one()
                raise
            finally:
                self._posting = []

    async def _post_group(
        self, project: int, group: list[tuple[_Prepared, ImagePrediction | str]]
    ) -> None:
        """Encode the group's masks, re-check its tasks in one request, post the predictions.

        Just before posting, the tasks are read once more: a person may have started
        meanwhile, and a POST of an earlier attempt may have landed although it timed out.
        The POST is tried once: a timeout sends the jobs back to the queue, whose retry
        re-checks first, so nothing is posted twice.
        """
        unsettled = {item.job.id: item for item, _ in group}

        async def conclude(item: _Prepared, outcome: BaseException | str) -> None:
            del unsettled[item.job.id]
            await self._conclude(item.job, outcome, item.started)

        try:
            built: list[tuple[_Prepared, PredictionIn]] = []
            for item, result in group:
                try:
                    built.append((item, await self._build(item, result)))
                except Exception as exc:
                    await conclude(item, exc)
            if not built:
                return
            async with self._io:
                checked = await self._read(project, [item.job for item, _ in built])
                to_post: list[tuple[_Prepared, PredictionIn]] = []
                for (item, prediction), (_, outcome) in zip(built, checked, strict=True):
                    if isinstance(outcome, BaseException):
                        await conclude(item, outcome)
                    else:
                        to_post.append((item, prediction))
                outcomes = await self._post(project, to_post)
            for (item, _), posted in zip(to_post, outcomes, strict=True):
                await conclude(item, posted)
        except BaseException as exc:
            for item in list(unsettled.values()):
                await self._conclude(item.job, exc, item.started, reraise=False)
            raise

    async def _build(self, item: _Prepared, result: ImagePrediction | str) -> PredictionIn:
        if isinstance(result, str):
            raise _Permanent(result)
        target = self._target(item.job)
        return await asyncio.to_thread(
            build_prediction,
            item.job.task,
            {m.label: m.mask for m in result.kept},
            result.width,
            result.height,
            target,
            score=self.settings.prediction.score,
            model_version=self.settings.prediction.model_version,
        )

    async def _post(
        self, project: int, items: list[tuple[_Prepared, PredictionIn]]
    ) -> list[BaseException | str]:
        """Post checked predictions, one request each (``concurrency`` at once); one outcome
        each: the done reason, or the error.

        Not Label Studio's bulk ``import/predictions``: in 1.23.2 it recounts the annotations
        and predictions of every task of the project on each call (measured: 16 predictions
        took 340 ms of its CPU in a project of 200 predicted tasks, 3.1 s in one of 6000),
        where one ``POST /api/predictions/`` stays at 30-50 ms whatever the project's size.
        """
        limit = asyncio.Semaphore(self.settings.worker.concurrency)

        async def one(prediction: PredictionIn) -> BaseException | str:
            async with limit:
                try:
                    created = await self.client.create_prediction(prediction, retry=False)
                except Exception as exc:
                    return exc
                return f"prediction {created}"

        return list(await asyncio.gather(*(one(prediction) for _, prediction in items)))

    def _target(self, job: Job) -> BrushTarget:
        target = self.targets.get(job.project)
        if target is None:
            raise _Permanent(f"project {job.project} is not in the config")
        return target

    # ------------------------------------------------------------------ outcomes

    async def _conclude(
        self, job: Job, outcome: BaseException | str, started: float, *, reraise: bool = True
    ) -> None:
        """Settle a held job: ``done`` with the reason a string gives, else by the exception.

        A cancel releases the job (re-raised unless ``reraise`` is false). Recording the outcome
        may itself fail (the journal): that is logged and touches no other job; the job stays
        running in the journal until the next start re-queues it (its re-check finds a
        prediction that was posted).
        """
        try:
            if isinstance(outcome, str):
                await self._finish(job, "done", outcome, started)
            else:
                await self._settle(job, outcome, started)
        except asyncio.CancelledError:
            if reraise:
                raise
        except Exception:
            log.exception(
                "job %s project %s task %s: recording its outcome failed",
                job.id,
                job.project,
                job.task,
            )
        finally:
            self._settled_one()

    async def _settle(self, job: Job, exc: BaseException, started: float) -> None:
        """Turn an exception into the job's next state; never raises (but re-raises cancel)."""
        if isinstance(exc, asyncio.CancelledError):
            await self._release(job)
            raise exc
        if isinstance(exc, SkipJob):
            await self._finish(job, "skipped", str(exc), started)
        elif isinstance(exc, _NotYet):
            await self._retry(job, str(exc), base=1.0)
        elif isinstance(exc, RetryableError | AuthError) and await self._label_studio_down():
            await self._release(job, f"waiting for Label Studio: {exc}")
            if self.metrics:
                self.metrics.job_retried()
        elif isinstance(exc, RetryableError):
            await self._retry(job, str(exc), base=self.settings.worker.retry_base_s)
        elif isinstance(exc, AutosegError | _Permanent):
            await self._finish(job, "failed", str(exc), started)
        elif isinstance(exc, Exception):
            log.exception(
                "job %s project %s task %s: internal error", job.id, job.project, job.task
            )
            await self._finish(
                job, "failed", f"internal error: {type(exc).__name__}: {exc}", started
            )
        else:
            await self._release(job)
            raise exc

    async def _retry(self, job: Job, reason: str, base: float) -> None:
        delay = min(self.settings.worker.retry_max_s, base * 2 ** max(0, job.attempts - 1))
        after = await asyncio.to_thread(self.queue.retry_later, job.id, reason, delay)
        if self.metrics:
            self.metrics.job_retried()
            if after.state == "failed":
                self.metrics.job_finished("failed", self.clock() - job.created_at)

    async def _finish(self, job: Job, state: str, reason: str, started: float) -> None:
        mark = {
            "done": self.queue.mark_done,
            "skipped": self.queue.mark_skipped,
            "failed": self.queue.mark_failed,
        }[state]
        await asyncio.to_thread(mark, job.id, reason)
        if self.metrics:
            self.metrics.job_finished(state, self.clock() - started)

    async def _release(self, job: Job, reason: str | None = None) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.to_thread(self.queue.release, job.id, reason))


def _drain(queue: asyncio.Queue[_T]) -> list[_T]:
    items: list[_T] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def _first(*waits: Coroutine[Any, Any, Any], timeout: float | None = None) -> None:
    """Wait until the first of ``waits`` finishes (or ``timeout``); cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class _Permanent(Exception):
    """A job-level permanent failure that is not one of the package's own errors."""


class _NotYet(Exception):
    """The task is not visible yet: retried until the grace period ends."""
