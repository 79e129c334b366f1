"""The HTTP face of the always-on service: the intakes' routes, health, readiness and metrics.

The app answers what each intake (``service/intake/``) mounts, plus the probes every
deployment asks for; the service (``service/server.py``) hands in the lifespan that runs the
worker and the reconcile loop beside it.

Routes::

    POST /webhook   WebhookIntake (service/intake/webhook.py lists its answers)
    GET  /health    200 {"status": "alive"}: the process answers (liveness)
    GET  /ready     200/503 {"ready": bool, "checks": {...}}: model, Label Studio, token
    GET  /metrics   Prometheus text format
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Lifespan

from service.intake.base import Intake, IntakeHooks
from service.metrics import Metrics

log = logging.getLogger(__name__)

_Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Readiness:
    """The answer of ``GET /ready``: ready, and one line per check ("ok" or the reason)."""

    ready: bool
    checks: Mapping[str, str]


class ServiceHooks(IntakeHooks, Protocol):
    """What the app and its intakes need from the running service: the intakes' ``wake``
    and ``request_reconcile``, and the readiness checks behind ``GET /ready``."""

    async def readiness(self) -> Readiness: ...


def create_app(
    intakes: Sequence[Intake],
    hooks: ServiceHooks,
    metrics: Metrics,
    *,
    lifespan: Lifespan[Starlette] | None = None,
) -> Starlette:
    """The ASGI app: every intake's routes, then ``/health``, ``/ready`` and ``/metrics``."""
    routes: list[BaseRoute] = [route for intake in intakes for route in intake.routes()]
    routes += [
        Route("/health", _health, methods=["GET"]),
        Route("/ready", _ready(hooks), methods=["GET"]),
        Route("/metrics", _metrics(metrics.registry), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


def _ready(hooks: ServiceHooks) -> _Endpoint:
    async def ready(request: Request) -> Response:
        try:
            state = await hooks.readiness()
        except Exception as exc:
            log.exception("readiness check failed")
            state = Readiness(False, {"readiness": f"check failed: {type(exc).__name__}"})
        body: dict[str, Any] = {"ready": state.ready, "checks": dict(state.checks)}
        return JSONResponse(body, status_code=200 if state.ready else 503)

    return ready


def _metrics(registry: CollectorRegistry) -> _Endpoint:
    async def metrics(request: Request) -> Response:
        # The job gauge queries SQLite, which may wait on a lock: keep it off the loop.
        text = await asyncio.to_thread(generate_latest, registry)
        return Response(text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics
