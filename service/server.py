"""The always-on service: builds the parts from the config, checks them, runs them together.

``serve`` = start-up checks (token, projects, BrushLabels control, labels vs model) ->
Starlette app (webhook intake) + worker (pipeline) + reconcile loop, under uvicorn. On
SIGTERM/SIGINT uvicorn stops taking requests, the lifespan stops the worker, which finishes
or re-queues what it holds, and the process exits 0.

``--role`` picks the parts (``constants.ROLES``): ``all`` runs them all; ``intake`` the
webhook and reconcile, without a model; ``worker`` the model, the worker and reconcile,
without the webhook route. The split roles need a shared queue (``queue.url``); the SQLite
queue is for one process, which holds the state lock on ``state_dir`` from build to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from service.app import Readiness, create_app
from service.config import Config
from service.connections import deadline_protocol
from service.constants import ROLES, WEBHOOK_PATH
from service.errors import AutosegError, ConfigError
from service.intake import WebhookIntake, WebhookSettings
from service.intake.reconcile import Reconciler
from service.labelstudio.client import LabelStudioClient
from service.metrics import Metrics
from service.model import Segmenter, load_segmenter
from service.queue import JobQueue, open_queue
from service.results import BrushTarget, resolve_target
from service.statelock import StateLock
from service.worker import Worker, WorkerSettings
from service.worker.supervise import Supervisor

log = logging.getLogger(__name__)

READY_PROBE_TIMEOUT_S = 5.0
READY_CACHE_S = 5.0  # /ready answers from this old a check: probes must not load Label Studio


def make_client(config: Config) -> LabelStudioClient:
    ls = config.label_studio
    for key, root in (("media_root", ls.media_root), ("local_files_root", ls.local_files_root)):
        if root is not None and not root.is_dir():
            raise ConfigError(f"label_studio.{key} {root} is not a folder this process can read")
    return LabelStudioClient(
        ls.url,
        config.require(ls.token, "label_studio.token"),
        ls.token_type,
        timeout_s=ls.timeout_s,
        download_timeout_s=ls.download_timeout_s,
        allowed_image_hosts=ls.allowed_image_hosts,
        media_root=ls.media_root,
        local_files_root=ls.local_files_root,
    )


async def check_projects(
    config: Config, client: LabelStudioClient, model_labels: tuple[str, ...] | None
) -> dict[int, BrushTarget]:
    """Each configured project's BrushTarget, or a ConfigError that says what to fix.
    Without a model (``--role intake``) each project only has to exist: ``{}``."""
    if not config.projects:
        raise ConfigError(f"{config.source}: projects lists no Label Studio project")
    targets = {}
    for project in config.projects:
        try:
            found = await client.get_project(project.id)
            if model_labels is None:
                continue
            targets[project.id] = resolve_target(
                found,
                model_labels,
                from_name=project.from_name,
                to_name=project.to_name,
                label_map=project.label_map,
            )
        except AutosegError as exc:
            raise ConfigError(f"project {project.id}: {exc}") from exc
    return targets


def check_role(config: Config, role: str) -> None:
    """Refuse a split role on a queue for one process, before anything is started."""
    if role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    if role != "all" and config.queue.url is None:
        raise ConfigError(
            f"--role {role} needs a shared queue: the SQLite queue in state_dir is for one "
            "process; set queue.url to a postgresql:// URL (or run --role all)"
        )


@dataclass
class Service:
    """The running parts of a role; also the ``ServiceHooks`` the app calls. ``worker`` and
    ``model`` are None for ``--role intake``, ``webhook`` is None for ``--role worker``."""

    # Held from build to close on a queue of one process: one process works on the state
    # directory (and recovers it).
    state_lock: StateLock | None = dataclasses.field(default=None, init=False)
    config: Config
    queue: JobQueue
    client: LabelStudioClient
    model: Segmenter | None
    targets: dict[int, BrushTarget]  # {} without a model
    worker: Worker | None
    metrics: Metrics
    reconciler: Reconciler
    webhook: WebhookSettings | None
    ready_cache_s: float = READY_CACHE_S
    role: str = ROLES[0]

    def __post_init__(self) -> None:
        self._ready_cache: tuple[float, Readiness] | None = None
        self._worker_task: asyncio.Task[None] | None = None
        # The reconcile loop logs and survives a failed pass; this catches the rest.
        self._supervisor = Supervisor()

    @classmethod
    async def build(cls, config: Config, role: str = ROLES[0]) -> Service:
        check_role(config, role)
        # Before anything slow: it may refuse (an intake needs the webhook secret).
        webhook = WebhookSettings.from_config(config) if role != "worker" else None
        if config.queue.url is not None:
            return await cls._build(config, webhook, role)
        # Before anything slow too: a second serve on this state_dir exits at once.
        state_lock = StateLock.acquire(config.state_dir, "serve")
        try:
            service = await cls._build(config, webhook, role)
        except BaseException:
            state_lock.release()
            raise
        service.state_lock = state_lock
        return service

    @classmethod
    async def _build(cls, config: Config, webhook: WebhookSettings | None, role: str) -> Service:
        model = load_segmenter(config.model) if role != "intake" else None
        client = make_client(config)
        try:
            user = await client.verify()
            log.info("Label Studio %s: signed in as %s", config.label_studio.url, user)
            targets = await check_projects(config, client, model.labels if model else None)
            queue = open_queue(config)
        except BaseException:
            await client.aclose()
            raise
        # On a shared queue only the jobs whose lease ran out (any instance may do it).
        requeued = queue.recover()
        if requeued:
            log.info("re-queued %d job(s) left running by a lost worker", requeued)
        metrics = Metrics(queue)
        worker = None
        if model is not None:
            worker = Worker(
                queue,
                client,
                model,
                targets,
                WorkerSettings(
                    prediction=config.prediction,
                    worker=config.worker,
                    bulk_predictions=config.label_studio.bulk_predictions,
                ),
                metrics=metrics,
            )
        reconciler = Reconciler(
            client,
            queue,
            [project.id for project in config.projects],
            config.prediction.model_version,
            config.reconcile,
            # Without a worker here, the queue's NOTIFY wakes the workers elsewhere.
            on_new=worker.wake if worker is not None else lambda: None,
        )
        return cls(
            config,
            queue,
            client,
            model,
            targets,
            worker,
            metrics,
            reconciler,
            webhook,
            role=role,
        )

    # -- ServiceHooks ---------------------------------------------------------------------

    def wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def request_reconcile(self, project: int | None) -> None:
        self.reconciler.request(project)

    async def readiness(self) -> Readiness:
        """Model, worker, queue and Label Studio, each "ok" or why not; answered from a check
        at most ``ready_cache_s`` old, so that probes load neither Label Studio nor the disk."""
        now = time.monotonic()
        if self._ready_cache and now - self._ready_cache[0] < self.ready_cache_s:
            return self._ready_cache[1]
        checks = {"queue": await self._queue_state()}
        if self.worker is not None:
            checks = {"model": "ok", "worker": self._worker_state(), **checks}
        if self.worker is not None and self.worker.outage is not None:
            # the worker is waiting out an outage and probes by itself
            checks["label_studio"] = self.worker.outage
        else:
            try:
                # one quick try: a probe must answer while Label Studio is down or hanging
                await asyncio.wait_for(self.client.verify(retries=0), READY_PROBE_TIMEOUT_S)
                checks["label_studio"] = "ok"
            except AutosegError as exc:
                checks["label_studio"] = str(exc)
            except TimeoutError:
                checks["label_studio"] = (
                    f"Label Studio did not answer within {READY_PROBE_TIMEOUT_S:.0f} s"
                )
        ready = Readiness(ready=all(v == "ok" for v in checks.values()), checks=checks)
        self._ready_cache = (now, ready)
        return ready

    def _worker_state(self) -> str:
        task = self._worker_task
        if task is None:
            return "the worker is not running"
        if task.done():
            failed = None if task.cancelled() else task.exception()
            return f"the worker stopped: {failed}" if failed else "the worker stopped"
        assert self.worker is not None
        return self.worker.problem or "ok"

    async def _queue_state(self) -> str:
        """One real write: the webhook cannot make task ids durable while it fails."""
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self.queue.check_writable), READY_PROBE_TIMEOUT_S
            )
        except AutosegError as exc:
            return f"the job queue cannot be written: {exc}"
        except TimeoutError:
            return f"a write to the job queue took over {READY_PROBE_TIMEOUT_S:.0f} s"
        return "ok"

    # -- running --------------------------------------------------------------------------

    def app(self) -> Starlette:
        intakes = []
        if self.webhook is not None:
            intakes.append(WebhookIntake(self.webhook, self.queue, self, self.metrics))
        return create_app(intakes, self, self.metrics, lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        worker: asyncio.Task[None] | None = None
        if self.worker is not None:
            if self.queue.shared:  # another instance's intake: NOTIFY wakes this worker
                loop = asyncio.get_running_loop()
                wake = self.worker.wake

                def woken() -> None:
                    loop.call_soon_threadsafe(wake)

                await asyncio.to_thread(self.queue.subscribe, woken)
            # The worker supervises its own loops; /ready reports a worker task that ended.
            worker = self._worker_task = asyncio.create_task(self.worker.run(stop), name="worker")
        reconciler = asyncio.create_task(
            self._supervisor.run("reconcile", self.reconciler.run, stop), name="reconcile"
        )
        try:
            yield
        finally:
            log.info("shutting down: finishing or re-queuing jobs in flight")
            stop.set()
            reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler
            try:
                if worker is not None:
                    await worker
            except Exception:
                log.exception("the worker had stopped")
            await self.close()
            log.info("stopped")

    async def close(self) -> None:
        await self.client.aclose()
        self.queue.close()
        if self.state_lock is not None:
            self.state_lock.release()


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT we handled gracefully ends in exit code 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after its graceful shutdown, which would end the
        # process with -15; a stop we asked for and completed is a clean exit.
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self._stop) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True


def make_server(service: Service) -> uvicorn.Server:
    server = service.config.server
    log.info(
        "serving on http://%s:%s as %s (%sGET /health /ready /metrics)",
        server.host,
        server.port,
        service.role,
        f"POST {WEBHOOK_PATH}, " if service.webhook is not None else "",
    )
    return _Server(
        uvicorn.Config(
            service.app(),
            host=server.host,
            port=server.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            # h11 with a deadline per request: stalled clients cannot pile up connections.
            http=deadline_protocol(server.request_timeout_s),
            limit_concurrency=server.max_connections,
        )
    )


async def serve(config: Config, role: str = ROLES[0]) -> None:
    """Run ``role`` until SIGTERM/SIGINT, then shut down gracefully and return (exit code 0)."""
    service = await Service.build(config, role)
    await make_server(service).serve()
