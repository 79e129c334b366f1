"""Which job queue the config names, opened: the one place that picks a backend.

``queue.url`` absent or ``sqlite``: the SQLite file ``QUEUE_FILE`` in ``state_dir``, for one
process. A ``postgresql://`` URL: the shared PostgreSQL queue. The service, ``backfill`` and
``status`` never name a backend themselves.
"""

from __future__ import annotations

from service.config import Config
from service.constants import QUEUE_FILE
from service.queue.base import JobQueue
from service.queue.sqlite import SQLiteJobQueue


def queue_url(config: Config) -> str | None:
    """The PostgreSQL URL the config names, or None for the SQLite file."""
    url = config.queue.url
    return None if url is None else config.require(url, "queue.url")


def open_queue(config: Config) -> JobQueue:
    """The configured queue, created (or its schema upgraded) if need be, with the worker's
    attempt limit, the queue's retention and, when shared, its lease."""
    url = queue_url(config)
    if url is not None:
        # Imported here: psycopg loads only where a PostgreSQL queue is configured.
        from service.queue.postgres import PostgresJobQueue

        return PostgresJobQueue(
            url,
            max_attempts=config.worker.max_attempts,
            lease_s=config.queue.lease_s,
            retention_days=config.queue.retention_days,
        )
    return SQLiteJobQueue(
        config.state_dir / QUEUE_FILE,
        max_attempts=config.worker.max_attempts,
        retention_days=config.queue.retention_days,
    )


def existing_queue(config: Config) -> JobQueue | None:
    """The configured queue if it exists already, else None (``status`` creates no SQLite
    file; a PostgreSQL queue is opened, its tables created if the database has none)."""
    if queue_url(config) is None and not (config.state_dir / QUEUE_FILE).exists():
        return None
    return open_queue(config)
