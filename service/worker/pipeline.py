"""The job pipeline: queue -> Label Studio task -> image -> model -> brush results -> prediction.

Three stages overlap so the model is never idle while there is work:

- *prepare*: the jobs claimed together (at least two model batches while others are in flight)
  are re-read from Label Studio in one list request per project (``service/worker/tasks.py``:
  a task a person annotated or that holds a prediction of this model_version is skipped; one
  not visible yet is read again once ``worker.settle_s`` has passed since its queueing);
  then each image is downloaded, within ``label_studio.download_timeout_s``, and decoded
  (downloads never wait for the slots of Label Studio's API calls: see ``__init__``) once
  its pixels, read from the header, fit ``worker.max_inflight_megapixels`` (``budget.py``;
  they are given back when the job settles);
- *infer* (one at a time): batch the prepared images, up to ``model.batch_size``, waiting only
  ``batch_wait_s`` for a batch to fill, and run the model in a thread;
- *post* (one group at a time): take whatever results wait (up to four model batches),
  encode their masks, re-read their tasks in one request, no sooner than ``settle_s`` after
  their queueing (annotated meanwhile, or imported with an annotation? posted by an earlier
  attempt whose answer was lost?) and store the predictions (``posting.py``: in one
  bulk request where Label Studio does that cheaply, else one request each, ``concurrency``
  at once; each tried once).

The bookkeeping lives beside this module: ``held.py`` counts the jobs held (claimed, not yet
settled) and frees a slot once per job; ``settle.py`` is the one path by which a held job ends
(done, skipped, failed, retried or given back, sorted by the exception tree of
``service/errors.py``; one bad task never stops the others); ``outage.py`` tells a job's
failure from Label Studio being down (then jobs wait in the queue without spending attempts
and the claim loop probes until Label Studio answers). Metrics go to a ``WorkerMetrics``
(``service/metrics.py``), ``NoMetrics`` when the run has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import PermanentError, RetryableError
from service.labelstudio import PredictionIn, Task
from service.labelstudio.client import LabelStudioClient
from service.metrics import NoMetrics, WorkerMetrics
from service.model import ImagePrediction, Segmenter
from service.model.images import decode_image, image_size
from service.queue import Job, JobQueue
from service.results import BrushTarget, build_prediction
from service.worker.budget import PixelBudget
from service.worker.held import Held
from service.worker.leases import Leases
from service.worker.outage import OutageWatch
from service.worker.posting import Poster
from service.worker.settings import WorkerSettings
from service.worker.settle import Settler
from service.worker.supervise import Supervisor
from service.worker.tasks import TaskReader
from service.worker.waits import drain, first

log = logging.getLogger(__name__)

_HELD_BACK_S = 0.05  # the shortest wait after a claim that gave nothing
_POST_WAIT_S = 1.0  # the longest a post group waits for the model's batch in progress


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


MODEL_THREAD = "autoseg-model"
"""The operating system's name of the thread that runs the model (and so of the threads
torch's OpenMP starts from it): ``/proc/<pid>/task/*/comm`` tells their CPU from the rest."""

_PR_SET_NAME = 15


def _name_os_thread() -> None:
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_NAME, MODEL_THREAD.encode()[:15], 0, 0, 0)


def _model_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=MODEL_THREAD, initializer=_name_os_thread
    )


@dataclass
class _Prepared:
    job: Job
    image: np.ndarray
    started: float


_Result = tuple[_Prepared, ImagePrediction | str]


class Worker:
    _model_thread: ThreadPoolExecutor  # one per run (see ``run``)

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
        self.clock = clock
        self.metrics: WorkerMetrics = metrics if metrics is not None else NoMetrics()
        # Jobs held at once (claimed, not yet settled): enough to keep downloads, one batch in
        # the model and posts all busy, few enough that a crash re-queues little.
        self.held = Held(settings.worker.concurrency * 2 + model.batch_size * 4)
        self._outage = OutageWatch(
            client,
            self.metrics,
            probe_s=settings.worker.outage_probe_s,
            limit_s=settings.outage_limit_s,
        )
        # Decoded pixels held at once: images, the model's full-size probabilities and masks
        # grow with them, and a tiny file can decode to 100 megapixels (see ``budget.py``).
        self.pixels = PixelBudget(round(settings.worker.max_inflight_megapixels * 1e6))
        self._settler = Settler(
            queue,
            self.held,
            self._outage,
            self.metrics,
            settings.worker,
            clock=clock,
            budget=self.pixels,
        )
        self._tasks_read = TaskReader(
            client,
            self._outage,
            model_version=settings.prediction.model_version,
            not_found_grace_s=settings.worker.not_found_grace_s,
            clock=clock,
        )
        # Claim in groups of at least two model batches while others are held: every claim
        # costs Label Studio one task-list request, whose fixed cost (~20 ms of its CPU)
        # dominates a small group.
        self._claim_min = min(self.held.capacity, model.batch_size * 2)
        self._alone = False  # the last claim gave a suspect job: claim no more until it ends
        self._post_max = model.batch_size * 4  # results per post group, at most
        self._post_min = model.batch_size * 2  # ... and at least, while the model is busy
        self._wake = asyncio.Event()
        self._ready: asyncio.Queue[_Prepared] = asyncio.Queue()
        self._results: asyncio.Queue[_Result] = asyncio.Queue()
        self._posting: list[_Result] = []  # in a post now
        self._tasks: set[asyncio.Task[None]] = set()
        # Label Studio API calls (list reads, re-checks, posts): ``concurrency`` at once.
        self._io = asyncio.Semaphore(settings.worker.concurrency)
        # Downloads never take those slots, or a few slow image hosts stall every project.
        # Files Label Studio serves itself get ``concurrency`` slots of their own (its load
        # stays bounded, at twice ``concurrency`` requests); other hosts' downloads are bounded
        # by the jobs held and each by ``download_timeout_s``, so a slow host holds only the
        # jobs whose images it serves.
        self._ls_files = asyncio.Semaphore(settings.worker.concurrency)
        self._batch: list[_Prepared] = []  # in the model right now
        self._supervisor = Supervisor()
        self._leases = Leases(queue, client, settings.prediction.model_version)
        self._poster = Poster(
            client,
            self._leases,
            self._tasks_read,
            mode=settings.bulk_predictions,
            concurrency=settings.worker.concurrency,
        )

    @property
    def busy(self) -> int:
        """Jobs held now: claimed and not yet settled."""
        return self.held.busy

    @property
    def outage(self) -> str | None:
        """Why Label Studio cannot be used right now, or None."""
        return self._outage.reason

    def wake(self) -> None:
        """New jobs were queued: stop waiting."""
        self._wake.set()

    # ------------------------------------------------------------------ main loops

    @property
    def problem(self) -> str | None:
        """Why one of the worker's loops is not running as it should (for ``/ready``), or None."""
        return self._supervisor.problem

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process jobs until ``stop`` is set; then finish or release what is held.

        Each loop is supervised: one that raises (the queue locked past its busy timeout, a
        full disk) is logged and restarted with backoff, and ``problem`` says so meanwhile.
        Only a one-off run giving up on an outage (``outage_limit_s``) ends it with the error.
        """
        supervise = self._supervisor.run
        # The model runs in a thread of its own (``MODEL_THREAD``: its threads' CPU can be told
        # from the rest), so decodes and journal writes in the default executor never queue
        # behind a batch, nor a batch behind them; shut down with the run.
        self._model_thread = _model_executor()
        loops = [
            asyncio.create_task(supervise("infer", self._infer_loop), name="infer"),
            asyncio.create_task(supervise("post", self._post_loop), name="post"),
        ]
        if self.queue.lease_s is not None:
            renew = functools.partial(self._leases.renew, self._supervisor)
            loops.append(asyncio.create_task(supervise("lease", renew), name="lease"))
        try:
            await supervise(
                "claim",
                lambda: self._claim_loop(stop),
                stop,
                fatal=lambda exc: self._outage.given_up,
            )
        finally:
            await self._shutdown(loops)

    async def run_until_idle(self) -> None:
        """Process until no job is queued or running (backfill): retries included."""
        stop = asyncio.Event()
        runner = asyncio.create_task(self.run(stop))
        try:
            while True:
                try:
                    pending = await asyncio.to_thread(self.queue.pending)
                except RetryableError as exc:  # the queue busy for a while: ask again
                    log.warning("backfill: cannot count the jobs left: %s", exc)
                    pending = -1
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
            if self._outage.reason is not None:
                await self._outage.probe(stop)
                continue
            free = self.held.room
            if free <= 0 or (self.busy > 0 and (free < self._claim_min or self._alone)):
                # Full, or a suspect job (left running by a crash) must stay alone in its
                # downloads and its model batch: wait for a held job to settle.
                await self.held.wait_for_room(stop)
                continue
            jobs = await asyncio.to_thread(self.queue.claim, free)
            self._supervisor.ok("claim")
            self._alone = any(job.suspect for job in jobs)
            by_project: dict[int, list[Job]] = {}
            again = []
            for job in jobs:
                if self.held.hold(job):
                    by_project.setdefault(job.project, []).append(job)
                else:
                    again.append(job)
            for project, group in by_project.items():
                self._spawn(self._prepare_group(project, group))
            if again:
                await self._give_back_again(again, stop)
            if by_project:
                continue
            if not again:
                await self._wait(stop)

    async def _give_back_again(self, jobs: list[Job], stop: asyncio.Event) -> None:
        """Jobs a shared queue handed back to this worker while an earlier claim of them is
        still settling here (their lease ran out meanwhile: the queue away, a freeze). Left
        alone, such a claim would be renewed for ever and never worked: give it back (not
        counted) and claim again only once a held job has settled (the earlier one, which
        then finds the job released, or the prediction there on the next try)."""
        for job in jobs:
            try:
                await asyncio.to_thread(self.queue.release, job.id)
            except Exception:  # its lease lapses instead, renewed no more
                log.exception("job %s task %s: giving back a second claim failed", job.id, job.task)
        await self.held.wait_for_room(stop)

    async def _wait(self, stop: asyncio.Event) -> None:
        timeout = self.settings.worker.idle_poll_s
        due = await asyncio.to_thread(self.queue.next_due)
        if due is not None:
            timeout = min(timeout, max(0.0, due - self.clock()))
        if timeout <= 0 and self.busy > 0:
            # Work is due but claim gave none: the queue holds a suspect job back until the
            # jobs held here end. Asking again before one settles would only spin.
            await self.held.wait_for_room(stop)
            return
        self._wake.clear()
        # At least a moment: a suspect job running elsewhere holds claims back there too.
        await first(self._wake.wait(), stop.wait(), timeout=max(timeout, _HELD_BACK_S))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
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
        left = drain(self._ready) + [item for item, _ in drain(self._results)]
        await self._settler.give_back(item.job for item in left)
        self._model_thread.shutdown(wait=False)

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
        """Read the group's tasks in one request, then fetch each image on its own.

        Within ``settle_s`` of the group's queueing the read starts at once, but a task it
        does not find yet (the web UI's import sends the webhook before its transaction
        commits) is read again only once ``settle_s`` has passed, not on its own at once:
        the post's re-check (``_post_group``) waits for ``settle_s`` too, so no job is
        posted before its import is complete, and the model works meanwhile."""
        started = self.clock()
        unsettled = {job.id: job for job in jobs}
        settle_at = max(job.created_at for job in jobs) + self.settings.worker.settle_s
        waited = False
        try:
            while unsettled:
                early = not waited and self.clock() < settle_at
                async with self._io:
                    outcomes = await self._tasks_read.read(
                        project, list(unsettled.values()), singles=not early
                    )
                for job, outcome in outcomes:
                    del unsettled[job.id]
                    if isinstance(outcome, BaseException):
                        await self._settler.settle(job, outcome, started)
                    else:
                        self._spawn(self._prepare(job, outcome, started))
                if unsettled:  # not visible yet: read again once the import had its time
                    await asyncio.sleep(max(0.0, settle_at - self.clock()))
                    waited = True
        except BaseException as exc:
            for job in unsettled.values():
                await self._settler.settle(job, exc, started, reraise=False)
            raise

    async def _prepare(self, job: Job, task: Task, started: float) -> None:
        try:
            target = self._target(job)
            url = task.data.get(target.data_key)
            if not isinstance(url, str) or not url:
                raise PermanentError(f"task has no image URL under data key {target.data_key!r}")
            if self.client.files.serves(url):
                async with self._ls_files:
                    data = await self.client.files.download(task.id, url)
            else:
                data = await self.client.files.download(task.id, url)
            size = image_size(data)
            max_pixels = self.settings.prediction.max_pixels
            if size is not None and size[0] * size[1] <= max_pixels:
                # Else decoding refuses it, from the header alone, with the reason.
                await self.pixels.acquire(job.id, size[0] * size[1])
            image = await asyncio.to_thread(
                decode_image,
                data,
                max_pixels=max_pixels,
                name=f"task {task.id} image",
            )
            await self._ready.put(_Prepared(job, image, started))  # the infer stage's now
        except BaseException as exc:
            await self._settler.settle(job, exc, started)

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
                        async with asyncio.timeout(max(remaining, 0)):  # see ``_fill``
                            batch.append(await self._ready.get())
                    except TimeoutError:
                        break
                began = time.perf_counter()
                try:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self._model_thread,
                        self.model.predict_each,
                        [item.image for item in batch],
                        self.settings.prediction,
                    )
                except Exception as exc:  # a bug, not a bad image: fail the batch, go on
                    log.exception("model failed on a batch of %d", len(batch))
                    reason = f"internal error in the model: {type(exc).__name__}: {exc}"
                    results = [reason] * len(batch)
            except asyncio.CancelledError:
                await self._settler.give_back(item.job for item in batch)
                raise
            except Exception as exc:  # a bug here: settle the batch, then the loop restarts
                for item in batch:
                    await self._settler.settle(item.job, exc, item.started, reraise=False)
                raise
            finally:
                self._batch = []
            for item, result in zip(batch, results, strict=True):
                self._results.put_nowait((item, result))
            self.metrics.inference(len(batch), time.perf_counter() - began)
            await asyncio.to_thread(_trim_heap)

    async def _post_loop(self) -> None:
        """Post results in groups: whatever waits (up to ``_post_max``) goes in one request, so
        posts grow with the load instead of one per model batch (see ``_fill``)."""
        while True:
            group = [await self._results.get()]
            self._posting = group
            pending: list[tuple[int, list[_Result]]] = []
            try:
                await self._fill(group)
                by_project: dict[int, list[_Result]] = {}
                for item, result in group:
                    by_project.setdefault(item.job.project, []).append((item, result))
                pending = list(by_project.items())
                while pending:
                    try:
                        await self._post_group(*pending[0])  # settles each item, even on errors
                    except Exception:
                        log.exception("posting a group for project %s failed", pending[0][0])
                    pending.pop(0)
            except asyncio.CancelledError:
                never_posted = (
                    [item.job for _, items in pending[1:] for item, _ in items]
                    if pending
                    else [item.job for item, _ in group]
                )
                await self._settler.give_back(never_posted)
                raise
            finally:
                self._posting = []

    async def _fill(self, group: list[_Result]) -> None:
        """Add the results that wait to ``group``; while it holds less than ``_post_min`` and
        the model is running a batch, wait for that batch too (at most ``_POST_WAIT_S``):
        every post group costs Label Studio a re-check and a post whatever its size."""
        deadline = time.monotonic() + _POST_WAIT_S
        while len(group) < self._post_max:
            if not self._results.empty():
                group.append(self._results.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if len(group) >= self._post_min or not self._batch or remaining <= 0:
                return
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                # comes as the get completes, and shutdown would wait on this loop for ever.
                async with asyncio.timeout(remaining):
                    group.append(await self._results.get())
            except TimeoutError:
                return

    async def _post_group(self, project: int, group: list[_Result]) -> None:
        """Encode the group's masks, re-check its tasks in one request, post the predictions.

        Just before posting, the tasks are read once more: a person may have started
        meanwhile, and a POST of an earlier attempt may have landed although it timed out.
        The POST is tried once: a timeout sends the jobs back to the queue, whose retry
        re-checks first, so nothing is posted twice.
        """
        settle = self._settler.settle
        try:
            built: list[tuple[_Prepared, PredictionIn]] = []
            for item, result in group:
                try:
                    built.append((item, await self._build(item, result)))
                except Exception as exc:
                    await settle(item.job, exc, item.started)
            if not built:
                return
            # Not before settle_s after the queueing: the re-check must see the whole import.
            settle_at = max(item.job.created_at for item, _ in built)
            wait = settle_at + self.settings.worker.settle_s - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            async with self._io:
                checked = await self._tasks_read.read(project, [item.job for item, _ in built])
                to_post: list[tuple[_Prepared, PredictionIn]] = []
                for (item, prediction), (_, outcome) in zip(built, checked, strict=True):
                    if isinstance(outcome, BaseException):
                        await settle(item.job, outcome, item.started)
                    else:
                        to_post.append((item, prediction))
                outcomes = await self._poster.post(
                    project, [(item.job, prediction) for item, prediction in to_post]
                )
            for (item, _), posted in zip(to_post, outcomes, strict=True):
                await settle(item.job, posted, item.started)
        except BaseException as exc:
            for item, _ in group:
                if self.held.holds(item.job):  # not settled, nor being settled
                    await settle(item.job, exc, item.started, reraise=False)
            raise

    async def _build(self, item: _Prepared, result: ImagePrediction | str) -> PredictionIn:
        if isinstance(result, str):
            raise PermanentError(result)
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

    def _target(self, job: Job) -> BrushTarget:
        target = self.targets.get(job.project)
        if target is None:
            raise PermanentError(f"project {job.project} is not in the config")
        return target
