"""The worker stage: claims jobs, reads tasks, runs the model, posts predictions."""

from __future__ import annotations

from service.worker.pipeline import Worker, WorkerSettings

__all__ = ["Worker", "WorkerSettings"]
