"""Which job queue the config names, opened: the one place that picks a backend.

Today that is always the SQLite file ``QUEUE_FILE`` in ``state_dir``; a shared PostgreSQL queue
(``queue.url``) will be chosen here too, so the service, ``backfill`` and ``status`` never name
a backend themselves.
"""

from __future__ import annotations

from service.config import Config
from service.constants import QUEUE_FILE
from service.queue.base import JobQueue
from service.queue.sqlite import SQLiteJobQueue


def open_queue(config: Config) -> JobQueue:
    """The configured queue, created if need be, with the worker's attempt limit and the
    queue's retention."""
    return SQLiteJobQueue(
        config.state_dir / QUEUE_FILE,
        max_attempts=config.worker.max_attempts,
        retention_days=config.queue.retention_days,
    )


def existing_queue(config: Config) -> JobQueue | None:
    """The configured queue if it exists already, else None (``status`` creates nothing)."""
    if not (config.state_dir / QUEUE_FILE).exists():
        return None
    return open_queue(config)
