"""The intake seam: a way Label Studio hands us work, and what an intake may ask of the service.

An intake answers some HTTP routes of the app and turns what arrives there into durable work
in the job queue; everything slow happens later, in the worker. ``WebhookIntake``
(``service/intake/webhook.py``, ``POST /webhook``) is the one implementation today; Label
Studio's ML-backend protocol (``/ml/health``, ``/ml/setup``, ``/ml/predict``) is meant to be
the second. ``service.app.create_app`` mounts the routes of every intake it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from starlette.routing import BaseRoute


class IntakeHooks(Protocol):
    """What an intake may ask of the running service.

    Both are called on the event loop: they must only signal (set an event, put on a queue),
    never block.
    """

    def wake(self) -> None:
        """New jobs are in the queue."""
        ...

    def request_reconcile(self, project: int | None) -> None:
        """Look for unprocessed tasks in ``project``, or in every configured one (None)."""
        ...


class Intake(Protocol):
    """A way Label Studio hands us work: the routes it arrives on."""

    def routes(self) -> Sequence[BaseRoute]:
        """The app's routes that this intake answers."""
        ...
