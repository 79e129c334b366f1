"""Label Studio's values as ls-autoseg sees them: frozen dataclasses, and the API's fixed numbers.

Pure: no HTTP here, so the modules that only shape results (``service.results``) import these
without the client. ``service.labelstudio.parse`` builds them from Label Studio's JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
"""URI schemes Label Studio 1.23.2 resolves through ``/tasks/{id}/resolve/`` (its storages'
``url_scheme``: S3, GCS, Azure Blob)."""

DEFAULT_MAX_BYTES = 200 * 1024 * 1024  # a download's size limit unless the caller sets one
MAX_FILES_PER_IMPORT = 100  # Label Studio's own limit per multipart import request
MAX_TASKS_PER_READ = 100  # task ids per list request (they travel in the URL)


@dataclass(frozen=True)
class ControlInput:
    """An object tag a control labels: ``type`` e.g. ``Image``, ``value`` the task data key."""

    type: str
    value: str


@dataclass(frozen=True)
class Control:
    """A control tag of the label config; ``name`` is a result's ``from_name``."""

    name: str
    type: str
    to_name: tuple[str, ...]
    inputs: tuple[ControlInput, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    label_config: str
    controls: tuple[Control, ...]
    model_version: str | None  # None when the project does not pin one ("" in Label Studio)

    def control(self, name: str) -> Control | None:
        return next((c for c in self.controls if c.name == name), None)


@dataclass(frozen=True)
class Annotation:
    id: int
    task: int | None
    was_cancelled: bool
    ground_truth: bool
    completed_by: int | None
    result: tuple[Mapping[str, Any], ...]
    created_at: datetime | None
    updated_at: datetime | None
    # Where it came from. Label Studio's editor sets these on what a person submits (accepting
    # a prediction gives parent_prediction and lead_time), an import sets import_id; a plain
    # API create sets none of them.
    updated_by: int | None = None
    parent_prediction: int | None = None
    parent_annotation: int | None = None
    lead_time: float | None = None
    draft_created_at: datetime | None = None
    import_id: int | None = None


@dataclass(frozen=True)
class Prediction:
    id: int
    task: int | None
    model_version: str
    score: float | None
    result: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Task:
    """A task as Label Studio listed it.

    ``annotations`` / ``predictions`` are None when the answer did not carry the lists (task
    listings without ``fields=all``); the ``total_*`` counts are always there.
    ``predictions_model_versions`` comes only with full lists (Label Studio answers "" otherwise).
    """

    id: int
    project: int | None
    data: Mapping[str, Any]
    annotations: tuple[Annotation, ...] | None
    predictions: tuple[Prediction, ...] | None
    total_annotations: int  # without cancelled (skipped) ones
    cancelled_annotations: int
    total_predictions: int
    predictions_model_versions: tuple[str, ...]
    updated_at: datetime | None

    @property
    def is_annotated(self) -> bool:
        """A person has looked at it: any annotation, submitted or skipped.

        The annotation list decides when it was fetched, else the counters. Label Studio
        1.23.2 sets the counters of imported tasks with the tasks themselves, before the
        import's webhook (checked from inside the webhook in test_labelstudio_real.py), and
        updates them on every annotation save and delete.
        """
        if self.annotations:
            return True
        return self.total_annotations > 0 or self.cancelled_annotations > 0

    def has_prediction_of(self, model_version: str) -> bool:
        """Holds a prediction of exactly this model_version."""
        if self.predictions is not None:
            return any(p.model_version == model_version for p in self.predictions)
        return model_version in self.predictions_model_versions


@dataclass(frozen=True)
class PredictionIn:
    """A prediction to create. Label Studio 1.23.2 does not check ``result`` against the label
    config on ``create_prediction`` (and silently drops misfits on ``import_predictions``)."""

    task: int
    result: list[dict[str, Any]]
    score: float
    model_version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "result": self.result,
            "score": self.score,
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class Webhook:
    id: int
    project: int | None
    url: str
    headers: Mapping[str, str]
    actions: tuple[str, ...]
    send_payload: bool
    send_for_all_actions: bool
    is_active: bool
