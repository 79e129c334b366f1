"""The durable job queue between intake and workers: the contract and its implementations."""

from __future__ import annotations

from service.queue.base import Job, JobQueue, JobState, QueueSpan
from service.queue.sqlite import SCHEMA_VERSION, SQLiteJobQueue

__all__ = ["SCHEMA_VERSION", "Job", "JobQueue", "JobState", "QueueSpan", "SQLiteJobQueue"]
