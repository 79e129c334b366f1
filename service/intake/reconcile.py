"""Reconcile: the intake that needs no webhook. It asks Label Studio for the tasks of a project
that no person touched and this model_version did not predict, and queues them.

Label Studio sends each webhook once, so a webhook lost while the service was down, refused
(503) or sent ``send_payload: false`` leaves tasks behind; reconcile finds them. The service
runs a :class:`Reconciler` (at start-up, every ``reconcile.interval_s``, and when a webhook
without payload asks); ``backfill`` calls :func:`reconcile` once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from service.config import ReconcileConfig
from service.errors import AutosegError, RetryableError
from service.labelstudio.client import LabelStudioClient
from service.labelstudio.queries import untouched_query
from service.queue import JobQueue

log = logging.getLogger(__name__)

ENQUEUE_CHUNK = 1000  # tasks per page read, and per enqueue


async def reconcile(
    client: LabelStudioClient,
    queue: JobQueue,
    project: int,
    model_version: str,
    *,
    page_size: int = ENQUEUE_CHUNK,
) -> int:
    """Queue every task of the project that no person touched and this model_version did
    not predict; returns how many were new to the queue.

    Pages by id (always the first page of "id > the last one seen"), not by page number:
    the worker predicts queued tasks meanwhile, they leave the filter, and numbered pages
    would shift over tasks never seen."""
    new, after = 0, 0
    while True:
        tasks, _ = await client.task_page(
            project,
            page_size=page_size,
            query=untouched_query(model_version, after_id=after),
            include="id",
        )
        if not tasks:
            break
        ids = [task.id for task in tasks]
        new += await asyncio.to_thread(queue.enqueue, project, ids, model_version)
        after = max(ids)
        if len(ids) < page_size:
            break
    log.info("project %s: reconcile queued %d new job(s)", project, new)
    return new


RETRY_FAILED_S = 5.0  # a pass that failed for a transient reason is asked for again this soon


class Reconciler:
    """Reconciles the configured projects when asked and every ``settings.interval_s``;
    ``on_new`` is called (on the event loop) when a pass queued something."""

    def __init__(
        self,
        client: LabelStudioClient,
        queue: JobQueue,
        projects: Sequence[int],
        model_version: str,
        settings: ReconcileConfig,
        on_new: Callable[[], None],
    ) -> None:
        self._client = client
        self._queue = queue
        self._projects = tuple(projects)
        self._model_version = model_version
        self._settings = settings
        self._on_new = on_new
        # Merged requests: a burst of payload-less webhooks is one pass per project, not one
        # pass each, and what is pending stays bounded by the configured projects.
        self._pending: set[int] = set()
        self._pending_all = False
        self._asked = asyncio.Event()

    def request(self, project: int | None) -> None:
        """Reconcile ``project`` (None: every configured one) soon; only signals. Requests
        merge until a pass takes them: one pending per project, and a pending "all" covers
        every project; one that arrives during a pass gets a pass after it (the running one may
        have read past its tasks already). An unconfigured project is ignored."""
        if project is None:
            self._pending_all = True
            self._pending.clear()
        elif project in self._projects and not self._pending_all:
            self._pending.add(project)
        else:
            return
        self._asked.set()

    async def _periodic(self) -> None:
        """Ask for a pass over every project if this instance has the turn."""
        try:
            mine = await asyncio.to_thread(
                self._queue.take_turn, "reconcile", self._settings.interval_s
            )
        except AutosegError as exc:  # the queue is away: the next interval asks again
            log.warning("reconcile: cannot take a turn: %s", exc)
            return
        if mine:
            self.request(None)
        else:
            log.debug("reconcile: another instance made this interval's pass")

    def _take(self) -> list[int]:
        """The projects asked for since the last pass, in config order; clears them."""
        if self._pending_all:
            taken = list(self._projects)
        else:
            taken = [project for project in self._projects if project in self._pending]
        self._pending_all = False
        self._pending.clear()
        self._asked.clear()
        return taken

    async def run(self) -> None:
        """Forever, until cancelled; a failed pass is logged and the next one comes.

        The periodic passes take a turn of the queue first: on a shared queue, of all the
        instances with reconcile on, one makes each pass (``take_turn``). The start-up pass
        does not: tasks imported while this instance was down must not wait an interval."""
        if self._settings.on_startup:
            self.request(None)
        while True:
            try:
                await asyncio.wait_for(self._asked.wait(), timeout=self._settings.interval_s)
            except TimeoutError:
                await self._periodic()
            taken = self._take()
            if taken:
                log.info("reconcile pass over %d project(s)", len(taken))
            for project_id in taken:
                try:
                    new = await reconcile(
                        self._client, self._queue, project_id, self._model_version
                    )
                except AutosegError as exc:
                    log.warning("project %s: reconcile failed: %s", project_id, exc)
                    if isinstance(exc, RetryableError):
                        # The queue or Label Studio away: this pass may stand for webhooks
                        # refused meanwhile (the webhook asks for it), so it comes again
                        # soon, not an interval later.
                        delay = min(RETRY_FAILED_S, self._settings.interval_s)
                        asyncio.get_running_loop().call_later(delay, self.request, project_id)
                    continue
                if new:
                    self._on_new()
