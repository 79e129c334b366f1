"""What one worker runs with, gathered from the config by its caller (``serve``, ``backfill``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.config import LabelStudioConfig, PredictionConfig, WorkerConfig
from service.constants import BulkMode


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker runs with: the prediction settings, the operator's worker section, and
    how long a one-off run (``backfill``) waits out an outage (None: as long as it takes), and
    ``label_studio.bulk_predictions``."""

    prediction: PredictionConfig
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    outage_limit_s: float | None = None
    bulk_predictions: BulkMode = LabelStudioConfig.bulk_predictions
