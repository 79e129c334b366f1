"""The worker stage: claims jobs, reads tasks, runs the model, posts predictions.

pipeline.py   Worker: the claim loop and the prepare -> infer -> post stages
tasks.py      re-reading a group's tasks from Label Studio, and the checks a task must pass
settle.py     the one path by which a held job ends (done, skipped, failed, retried, given back)
held.py       the ledger of held jobs: busy count, room to claim, settle-once
budget.py     the decoded image pixels held at once, bounded, first come first served
outage.py     telling a job's failure from Label Studio being down; the probes that end it
settings.py   WorkerSettings, what a worker runs with
waits.py      asyncio helpers the loops share
"""

from __future__ import annotations

from service.worker.pipeline import Worker
from service.worker.settings import WorkerSettings

__all__ = ["Worker", "WorkerSettings"]
