"""Names and values that more than one part of ls-autoseg must agree on; each has its one owner
here. Defaults of settings are not here: the config dataclasses own them
(``service/config/settings.py``)."""

from __future__ import annotations

from typing import Final, Literal, get_args

TOKEN_ENV: Final = "LABEL_STUDIO_TOKEN"
"""The environment variable the Label Studio token comes from (``${LABEL_STUDIO_TOKEN}``)."""

SECRET_ENV: Final = "LS_AUTOSEG_WEBHOOK_SECRET"
"""The environment variable the shipped config reads ``server.webhook_secret`` from."""

WEBHOOK_PATH: Final = "/webhook"
"""Where the service takes Label Studio's webhook."""

SECRET_HEADER: Final = "X-Webhook-Secret"
"""The header that carries ``server.webhook_secret`` on Label Studio's webhook."""

TASKS_CREATED: Final = "TASKS_CREATED"
"""The webhook action that queues work; every other action is acknowledged and ignored."""

QUEUE_FILE: Final = "jobs.sqlite3"
"""The SQLite job queue's file in ``state_dir``."""

RESULT_ID_PREFIX: Final = "autoseg_"
"""Every result id ls-autoseg writes starts with this: how its annotations are told apart."""

TokenType = Literal["auto", "pat", "legacy"]
"""How the Label Studio token is sent: detected, Personal Access Token, or legacy key."""
TOKEN_TYPES: Final[tuple[TokenType, ...]] = get_args(TokenType)

BulkMode = Literal["auto", "on", "off"]
"""``label_studio.bulk_predictions``: store predictions in bulk when Label Studio does it
cheaply (``auto``), always, or never (one ``POST /api/predictions/`` each)."""

BULK_PREDICTIONS_FLAG: Final = (
    "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
)
"""The environment variable (a feature flag of Label Studio 1.23) that makes its bulk
``import/predictions`` check ids in batches and recount only the tasks it was sent, instead of
every task of the project on each call. The local Label Studio (tests, quickstart, benchmarks)
and the compose files set it to ``true``."""

HTTP_SCHEMES: Final = ("http://", "https://")
"""What a Label Studio URL must start with (compared case-insensitively)."""

# queue.url schemes naming the shared PostgreSQL queue (libpq takes both spellings).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# What one ``serve`` process does: ``all`` (webhook and worker), ``intake`` (answers Label
# Studio, never loads the model) or ``worker`` (loads the model, takes jobs, no webhook route).
ROLES = ("all", "intake", "worker")
