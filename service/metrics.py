"""Prometheus metrics of the service, on a registry of their own.

Each :class:`Metrics` owns a fresh ``CollectorRegistry`` instead of the process-wide default
one, so nothing is registered at import time and tests can build as many as they like. The
app serves ``registry`` at ``GET /metrics``; the worker reports through :class:`WorkerMetrics`
(job finished, retried, one model batch, outage on/off), which :class:`Metrics` implements and
:class:`NoMetrics` implements as nothing at all, for a run without ``/metrics`` (``backfill``).

The ``ls_autoseg_jobs{state}`` gauge is not kept up to date by hand: it reads
``queue.counts()`` at scrape time, so it also counts jobs that other processes (``backfill``,
a restarted worker) put in the same journal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from service.errors import AutosegError
from service.queue import JobQueue, JobState

log = logging.getLogger(__name__)

WEBHOOK_OUTCOMES: Final = (
    "queued",
    "reconcile",
    "ignored",
    "unauthorized",
    "bad_request",
    "too_large",
    "error",
)
FINISHED_STATES: Final = (JobState.DONE.value, JobState.SKIPPED.value, JobState.FAILED.value)

# Claim to finish includes image download, inference and the upload to Label Studio, with
# its retries: seconds to minutes.
_JOB_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_INFERENCE_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class WorkerMetrics(Protocol):
    """What the worker reports; ``state`` is ``done``, ``skipped`` or ``failed``."""

    def job_finished(self, state: JobState, seconds: float) -> None: ...

    def job_retried(self) -> None: ...

    def job_lost(self) -> None: ...

    def inference(self, batch_size: int, seconds: float) -> None: ...

    def outage(self, active: bool) -> None: ...


class NoMetrics:
    """A :class:`WorkerMetrics` that records nothing, so the worker never asks whether it has
    metrics."""

    def job_finished(self, state: JobState, seconds: float) -> None:
        pass

    def job_retried(self) -> None:
        pass

    def job_lost(self) -> None:
        pass

    def inference(self, batch_size: int, seconds: float) -> None:
        pass

    def outage(self, active: bool) -> None:
        pass


class Metrics:
    """The service's counters and histograms; pass ``queue`` to export its job counts."""

    def __init__(self, queue: JobQueue | None = None) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "ls_autoseg_webhooks_total",
            "Webhook requests, by how they were answered.",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_task_ids = Counter(
            "ls_autoseg_webhook_task_ids_total",
            "Task ids made durable from TASKS_CREATED webhooks (a repeated id counts again; "
            "the queue keeps one job per task).",
            registry=self.registry,
        )
        self.jobs_finished = Counter(
            "ls_autoseg_jobs_finished_total",
            "Jobs that reached a final state.",
            ["state"],
            registry=self.registry,
        )
        self.job_retries = Counter(
            "ls_autoseg_job_retries_total",
            "Jobs put back in the queue for another attempt.",
            registry=self.registry,
        )
        self.jobs_lost = Counter(
            "ls_autoseg_jobs_lost_total",
            "Jobs this worker dropped because its lease ran out (another worker took them).",
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "ls_autoseg_job_seconds",
            "Seconds from claiming a job to its final state.",
            buckets=_JOB_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "ls_autoseg_inference_seconds",
            "Seconds per model batch.",
            buckets=_INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.inference_batch_size = Histogram(
            "ls_autoseg_inference_batch_size",
            "Images per model batch.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.label_studio_outage = Gauge(
            "ls_autoseg_label_studio_outage",
            "1 while Label Studio is unreachable or refuses the token (jobs wait, not fail).",
            registry=self.registry,
        )
        # Labelled series appear only once touched; create them so a scrape shows zeros
        # (rate() over a series that springs into being misses its first increment).
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks.labels(outcome=outcome)
        for state in FINISHED_STATES:
            self.jobs_finished.labels(state=state)
        if queue is not None:
            self.registry.register(QueueCollector(queue))

    def webhook(self, outcome: str) -> None:
        if outcome not in WEBHOOK_OUTCOMES:
            raise ValueError(f"unknown webhook outcome {outcome!r}; one of {WEBHOOK_OUTCOMES}")
        self.webhooks.labels(outcome=outcome).inc()

    def task_ids_accepted(self, count: int) -> None:
        self.webhook_task_ids.inc(count)

    def job_finished(self, state: str, seconds: float) -> None:
        """A job reached done, skipped or failed ``seconds`` after it was claimed."""
        if state not in FINISHED_STATES:
            raise ValueError(f"unknown final job state {state!r}; one of {FINISHED_STATES}")
        self.jobs_finished.labels(state=state).inc()
        self.job_seconds.observe(seconds)

    def job_retried(self) -> None:
        self.job_retries.inc()

    def job_lost(self) -> None:
        self.jobs_lost.inc()

    def inference(self, batch_size: int, seconds: float) -> None:
        """One model batch of ``batch_size`` images took ``seconds``."""
        self.inference_seconds.observe(seconds)
        self.inference_batch_size.observe(batch_size)

    def outage(self, active: bool) -> None:
        """Label Studio became unusable (``True``) or usable again (``False``)."""
        self.label_studio_outage.set(1 if active else 0)


class QueueCollector:
    """``ls_autoseg_jobs{state}``, read from the job queue at each scrape."""

    NAME: Final = "ls_autoseg_jobs"
    HELP: Final = "Jobs in the queue, by state."

    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue

    def describe(self) -> Iterable[Metric]:
        # Without describe() the registry would call collect(), i.e. query the database,
        # when the collector is registered.
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])]

    def collect(self) -> Iterable[Metric]:
        try:
            counts = self._queue.counts()
        except (AutosegError, RuntimeError) as exc:
            # A busy or closed database must not fail the whole scrape; the gap in the
            # series shows it.
            log.warning("metrics: cannot read job counts: %s", exc)
            return []
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])
        for state in JobState:
            family.add_metric([state.value], counts.get(state, 0))
        return [family]
