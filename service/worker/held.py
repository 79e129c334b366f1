"""The ledger of the jobs a worker holds: claimed from the queue and not yet settled.

A held job leaves the ledger exactly once, through :meth:`Held.settling` (which
``service/worker/settle.py`` alone calls): the slot is freed when that settle ends, and a
second settle of the same job is a bug the ledger refuses and logs, so the busy count can
neither leak a slot nor go negative.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from service.queue import Job
from service.worker.waits import first

log = logging.getLogger(__name__)


class Held:
    """Jobs held at once, at most ``capacity``; ``busy`` counts those being settled too."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: set[int] = set()
        self._settling: set[int] = set()
        self._freed = asyncio.Event()  # set when a settle ends: room to claim

    @property
    def busy(self) -> int:
        return len(self._held) + len(self._settling)

    @property
    def room(self) -> int:
        return self.capacity - self.busy

    def holds(self, job: Job) -> bool:
        """Whether ``job`` is held and no settle of it has begun."""
        return job.id in self._held

    def hold(self, job: Job) -> bool:
        """Count a claimed job; False (logged) if it is held already: a shared queue hands a
        job back to the worker still settling it once its lease ran out meanwhile."""
        if job.id in self._held or job.id in self._settling:
            log.warning("job %s task %s claimed again while held here", job.id, job.task)
            return False
        self._held.add(job.id)
        return True

    @contextmanager
    def settling(self, job: Job) -> Iterator[bool]:
        """Settle ``job`` in the body when this yields True; its slot is free on leaving.

        Yields False (and logs) for a job not held, or whose settle has begun already: a
        second settle would record a second outcome and free a slot twice.
        """
        if job.id not in self._held:
            state = "being settled" if job.id in self._settling else "not held"
            log.error("job %s task %s settled again (%s): refused", job.id, job.task, state)
            yield False
            return
        self._held.remove(job.id)
        self._settling.add(job.id)
        try:
            yield True
        finally:
            self._settling.discard(job.id)
            self._freed.set()

    async def wait_for_room(self, stop: asyncio.Event) -> None:
        """Until a held job is settled (or ``stop``)."""
        self._freed.clear()
        await first(self._freed.wait(), stop.wait())
