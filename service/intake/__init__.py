"""Intake: turns a Label Studio call into durable work in the queue (the webhook today)."""
