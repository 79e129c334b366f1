"""The durable job queue between intake and workers.

``base`` holds the contract (``JobQueue``, ``Job``, ``JobState``, ``QueueSpan``,
``WorkerSeen``), ``checks`` the argument checks every implementation makes, ``journal`` and
``prune`` what they share about rows; ``sqlite`` (one process, the default) and ``postgres``
(shared by any number of processes, imported only where ``queue.url`` names it) are the
implementations, ``backends.open_queue`` picks one; ``tests/test_queue_contract.py`` is the
suite each one passes.
"""

from __future__ import annotations

from service.queue.backends import existing_queue, open_queue
from service.queue.base import Job, JobQueue, JobState, QueueSpan
from service.queue.sqlite import SQLiteJobQueue

__all__ = [
    "Job",
    "JobQueue",
    "JobState",
    "QueueSpan",
    "SQLiteJobQueue",
    "existing_queue",
    "open_queue",
]
