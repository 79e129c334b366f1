"""Intake: turns a Label Studio call into durable work in the queue (the webhook today)."""

from __future__ import annotations

from service.intake.base import Intake, IntakeHooks
from service.intake.webhook import WebhookIntake, WebhookSettings

__all__ = ["Intake", "IntakeHooks", "WebhookIntake", "WebhookSettings"]
