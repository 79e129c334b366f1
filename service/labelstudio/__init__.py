"""Everything that speaks Label Studio's HTTP API, and the typed values it answers with."""

from __future__ import annotations

from service.labelstudio.client import LabelStudioClient
from service.labelstudio.types import (
    CLOUD_SCHEMES,
    DEFAULT_MAX_BYTES,
    MAX_FILES_PER_IMPORT,
    Annotation,
    Control,
    ControlInput,
    Prediction,
    PredictionIn,
    Project,
    Task,
    Webhook,
)

__all__ = [
    "CLOUD_SCHEMES",
    "DEFAULT_MAX_BYTES",
    "MAX_FILES_PER_IMPORT",
    "Annotation",
    "Control",
    "ControlInput",
    "LabelStudioClient",
    "Prediction",
    "PredictionIn",
    "Project",
    "Task",
    "Webhook",
]
