"""Whether Label Studio as a whole is unusable right now, and the probes that end it.

An outage is not a job's failure. When a job fails with a ``RetryableError`` or an
``AuthError``, :meth:`OutageWatch.explains` asks Label Studio who the worker is (``verify``):
if that fails too, Label Studio is down or the token was revoked, so the job goes back to the
queue without spending an attempt, the worker stops claiming and calls :meth:`OutageWatch.probe`
every ``outage_probe_s`` seconds until Label Studio answers again (a revoked token: once the
service runs with a valid one). ``limit_s`` (for ``backfill``) ends the wait with an error
instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from service.errors import AuthError, AutosegError, RetryableError
from service.metrics import WorkerMetrics
from service.worker.waits import first

log = logging.getLogger(__name__)


class Verifier(Protocol):
    """The one call an outage needs: ``LabelStudioClient.verify``."""

    async def verify(self, *, retries: int | None = None) -> str: ...


class OutageWatch:
    """``reason`` is why Label Studio cannot be used right now, or None while it can."""

    def __init__(
        self,
        client: Verifier,
        metrics: WorkerMetrics,
        *,
        probe_s: float,
        limit_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.probe_s = probe_s
        self.limit_s = limit_s
        self.clock = clock
        self.reason: str | None = None
        self.given_up = False  # ``probe`` raised: the run ends, no supervisor restarts it
        self._since = 0.0
        self._lock = asyncio.Lock()  # jobs failing together ask Label Studio once

    async def explains(self, exc: BaseException) -> bool:
        """Whether ``exc`` is Label Studio as a whole being unusable rather than this job's
        failure: a retryable or auth error that ``verify`` confirms (which starts an outage)."""
        if not isinstance(exc, RetryableError | AuthError):
            return False
        async with self._lock:
            if self.reason is not None:
                return True
            try:
                await self.client.verify(retries=1)
            except (RetryableError, AuthError) as down:
                self.reason = str(down)
                self._since = self.clock()
                log.warning(
                    "Label Studio unusable, jobs wait in the queue (not failed) and the worker "
                    "probes every %.0f s: %s",
                    self.probe_s,
                    self.reason,
                )
                self.metrics.outage(True)
                return True
            except AutosegError:
                return False
            return False

    async def probe(self, stop: asyncio.Event) -> None:
        """One probe after ``probe_s`` (none if ``stop`` is set meanwhile); ends the outage when
        Label Studio answers, raises once it has lasted ``limit_s``."""
        await first(stop.wait(), timeout=self.probe_s)
        if stop.is_set():
            return
        down_s = self.clock() - self._since
        try:
            await self.client.verify(retries=0)
        except (RetryableError, AuthError) as exc:
            if self.limit_s is not None and down_s >= self.limit_s:
                self.given_up = True
                raise type(exc)(
                    f"Label Studio unusable for {down_s:.0f} s, giving up (queued jobs are "
                    f"kept): {exc}"
                ) from exc
            if str(exc) != self.reason:
                log.warning("Label Studio still unusable: %s", exc)
                self.reason = str(exc)
            return
        except AutosegError as exc:
            log.warning("Label Studio probe: %s", exc)
        log.info("Label Studio usable again after %.0f s: resuming", down_s)
        self.reason = None
        self.metrics.outage(False)
