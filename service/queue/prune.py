"""When a queue prunes old done and skipped jobs, and how much at a time, apart from
the queues' logic (``sqlite.py``, ``postgres.py``).

A late duplicate webhook for a pruned job queues it again; the worker's pre-read finds this
model_version's prediction on the task and skips it, so nothing is posted twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Rows per transaction (a few ms of the write lock: what an accept may wait), batches per call
# (a claim that prunes stays short; a long backlog goes on at the next claims), and how often
# once nothing old is left.
PRUNE_BATCH = 1000
PRUNE_BATCHES_PER_CALL = 10
PRUNE_EVERY_S = 3600.0
DAY_S = 86400.0


class Pruner:
    """Keeps done and skipped jobs ``retention_days`` (None: for ever) after their last change.

    ``run`` prunes when due: on its first call, then once an hour, and at once again while
    the previous call left old rows behind.
    """

    def __init__(self, retention_days: float | None) -> None:
        if retention_days is not None and not (
            math.isfinite(retention_days) and retention_days > 0
        ):
            raise ValueError(f"retention_days must be > 0 or None, got {retention_days!r}")
        self._retention_s = None if retention_days is None else retention_days * DAY_S
        self._next = -math.inf

    def run(self, clock: Callable[[], float], delete: Callable[[float, int], int]) -> int:
        """If due, call ``delete(before, limit)`` (one transaction deleting up to ``limit``
        done/skipped jobs last changed before ``before``; returns how many) a bounded number
        of times; return how many jobs went."""
        now = clock()
        if self._retention_s is None or now < self._next:
            return 0
        removed = 0
        for _ in range(PRUNE_BATCHES_PER_CALL):
            batch = delete(clock() - self._retention_s, PRUNE_BATCH)
            removed += batch
            if batch < PRUNE_BATCH:
                self._next = now + PRUNE_EVERY_S
                break
            time.sleep(0)  # let a waiting accept take the queue's lock first
        if removed:
            log.info("pruned %d done/skipped job(s) older than the retention", removed)
        return removed
