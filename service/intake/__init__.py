"""Intake: how work enters the queue. ``webhook`` turns Label Studio's TASKS_CREATED call into
queued task ids (an :class:`Intake`: routes the app mounts; Label Studio's model protocol is
the next); ``reconcile`` sweeps a project for tasks a lost webhook left behind."""

from __future__ import annotations

from service.intake.base import Intake, IntakeHooks
from service.intake.webhook import WebhookIntake, WebhookSettings

__all__ = ["Intake", "IntakeHooks", "WebhookIntake", "WebhookSettings"]
