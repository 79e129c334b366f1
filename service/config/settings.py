"""The settings as typed values: one frozen dataclass per section of ``config.yaml``.

Each dataclass owns its section's keys (its fields) and their defaults; the loader
(:mod:`service.config.loader`) reads both from here, and the writer
(:mod:`service.config.writer`) writes every field back.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from service.constants import HTTP_SCHEMES, BulkMode, TokenType
from service.errors import ConfigError

Activation = Literal["sigmoid", "softmax"]


@dataclass(frozen=True)
class MissingEnv:
    """Stands in for a value whose ``${NAME}`` was not set in the environment."""

    name: str


@dataclass(frozen=True)
class Thresholds:
    """Per-label probability thresholds with a default for labels not named."""

    default: float = 0.5
    per_label: Mapping[str, float] = field(default_factory=dict)

    def for_label(self, label: str) -> float:
        return self.per_label.get(label, self.default)


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    labels: tuple[str, ...]
    activation: Activation = "sigmoid"
    background: str | None = None
    input_size: tuple[int, int] | None = None
    size_divisor: int = 32
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    device: str = "auto"
    batch_size: int = 8
    threads: int | None = None

    @property
    def output_labels(self) -> tuple[str, ...]:
        """Labels that produce masks: all channels but the background one."""
        return tuple(label for label in self.labels if label != self.background)


@dataclass(frozen=True)
class PredictionConfig:
    model_version: str = "auto-segmentation-v1"
    score: float = 0.8
    thresholds: Thresholds = field(default_factory=Thresholds)
    min_pixels: int = 20
    prob_upsample: bool = True
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class LabelStudioConfig:
    url: str = "http://localhost:8080"
    token: str | MissingEnv | None = None
    token_type: TokenType = "auto"
    timeout_s: float = 30.0
    # A whole image download, redirects and retries included: a host that trickles bytes
    # would otherwise hold its job (and its slot) for as long as it likes.
    download_timeout_s: float = 60.0
    # Image hosts (names) or networks (CIDRs) fetched although they are not public addresses:
    # task data is written by whoever may import tasks, so internal addresses are refused.
    allowed_image_hosts: tuple[str, ...] = ()
    # Label Studio's files on this machine, read from disk instead of downloaded (~16 ms of
    # its CPU each): media_root is its LABEL_STUDIO_BASE_DATA_DIR/media (uploads), and
    # local_files_root its LOCAL_FILES_DOCUMENT_ROOT. Read only; a task URL that normalises
    # outside them is refused.
    media_root: Path | None = None
    local_files_root: Path | None = None
    # Predictions stored many per request (import/predictions) where Label Studio does that
    # cheaply: it runs with the constants.BULK_PREDICTIONS_FLAG environment variable set. auto
    # asks it once per project; on forces bulk (without the flag each call recounts the whole
    # project); off posts one prediction a request.
    bulk_predictions: BulkMode = "auto"


def queue_url_problem(url: str) -> str | None:
    """Why libpq cannot read the PostgreSQL ``queue.url`` (the config's and the queue's one
    check), or None. Names no part of the URL: its password may be what is malformed."""
    import psycopg  # only where a PostgreSQL queue is configured

    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return (
            "is not a PostgreSQL URL libpq can read (percent-encode a password holding"
            " %, @, /, ? or #; only libpq's own ?parameters are allowed)"
        )
    return None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a Label Studio URL (the config's and the client's one check), or
    None."""
    if not url.lower().startswith(HTTP_SCHEMES):
        return f"must start with {' or '.join(HTTP_SCHEMES)}, got {url!r}"
    return None


_HOST_NAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?", re.I)


def image_host_problem(entry: str) -> str | None:
    """Why ``entry`` of ``label_studio.allowed_image_hosts`` is neither a host name nor an
    address or network (``10.0.0.0/8``), or None."""
    try:
        ipaddress.ip_network(entry.strip("[]"), strict=False)
        return None
    except ValueError:
        pass
    if "/" in entry or not _HOST_NAME.fullmatch(entry):
        return f"{entry!r} is neither a host name nor an address or network (10.0.0.0/8)"
    return None


@dataclass(frozen=True)
class ProjectConfig:
    id: int
    from_name: str | None = None
    to_name: str | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    webhook_secret: str | MissingEnv | None = None
    allow_unauthenticated: bool = False
    max_body_bytes: int = 50_000_000
    # A connection must deliver a whole request (headers and body) this soon after it opens
    # or after its previous response, or it is closed: clients that stall mid-request would
    # otherwise hold their connections for ever.
    request_timeout_s: float = 10.0
    # Connections at once; requests over it get 503 (uvicorn's limit_concurrency). A bound
    # below the process's file descriptors, high above what Label Studio opens.
    max_connections: int = 1000


@dataclass(frozen=True)
class ReconcileConfig:
    on_startup: bool = True
    interval_s: float = 300.0


@dataclass(frozen=True)
class WorkerConfig:
    """The operator's choices for the worker: how hard to push Label Studio, how to retry."""

    concurrency: int = 4  # Label Studio API requests at once (its file downloads: as many)
    # Label Studio sends TASKS_CREATED from inside the import request; a task read at once
    # was seen (once, on a busy machine) without the annotation imported with it. A job's
    # prediction is therefore posted no sooner than this long after it was queued, its task
    # checked again then; reading its image and the model start at once.
    settle_s: float = 2.0
    retry_base_s: float = 2.0  # first retry delay of a transient failure, doubled each time
    retry_max_s: float = 120.0
    max_attempts: int = 8  # a job fails after this many attempts (crashes count)
    not_found_grace_s: float = 30.0  # a task 404 this soon after queueing is retried
    outage_probe_s: float = 5.0  # while Label Studio is unusable, ask this often
    batch_wait_s: float = 0.05  # how long a model batch waits to fill
    idle_poll_s: float = 1.0
    shutdown_grace_s: float = 30.0  # on SIGTERM, let jobs in flight finish this long
    # Decoded image pixels held at once (jobs wait before decoding); one larger image runs alone.
    # A megapixel costs ~40 MB at its peak in the model (README, Memory): as many as the largest
    # image prediction.max_pixels lets through, ~4 GB; a backlog of 2000x1500 images never waits.
    max_inflight_megapixels: float = 100.0


@dataclass(frozen=True)
class QueueConfig:
    """The job journal: where it is, how long finished jobs are kept, how long a lost worker
    keeps its jobs."""

    # None (or "sqlite" in the file): the SQLite file in state_dir, for one process. A
    # postgresql:// URL: the shared queue of any number of intake and worker instances. A
    # secret (it may hold a password): ``${LS_AUTOSEG_QUEUE_URL}`` keeps it out of the file.
    url: str | MissingEnv | None = field(default=None, repr=False)
    # Done and skipped jobs last changed longer ago than this are deleted, so the journal
    # does not grow for ever (failed ones stay for the operator).
    retention_days: float = 30.0
    # PostgreSQL: a worker that stops renewing its leases (killed, frozen, cut off) loses its
    # jobs to the others after this long. Workers renew every lease_s / 4.
    lease_s: float = 60.0


@dataclass(frozen=True)
class Config:
    """The whole file; its fields but ``source`` are the file's top-level keys."""

    source: Path
    model: ModelConfig
    prediction: PredictionConfig = field(default_factory=PredictionConfig)
    label_studio: LabelStudioConfig = field(default_factory=LabelStudioConfig)
    projects: tuple[ProjectConfig, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)
    # Read from a file, a relative state_dir is relative to the file's folder.
    state_dir: Path = Path("state")
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)

    def require(self, value: str | MissingEnv | None, what: str) -> str:
        """Return a setting that a command cannot do without, or explain what to set."""
        if isinstance(value, MissingEnv):
            raise ConfigError(
                f"{what} comes from ${{{value.name}}} in {self.source}, "
                f"but the environment variable {value.name} is not set"
            )
        if not value:
            raise ConfigError(f"{what} is not set in {self.source}")
        return value
