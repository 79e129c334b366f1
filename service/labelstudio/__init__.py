"""Label Studio (1.23.2): the typed values its API answers with, and the client that speaks it.

This package exports the pure values only, so modules that merely shape results import them
without HTTP; code that calls Label Studio imports
``from service.labelstudio.client import LabelStudioClient``. The modules, each using only
those above it:

    types.py      frozen dataclasses (Project, Task, PredictionIn, ...) and the API's numbers
    parse.py      Label Studio's JSON -> those values, checked once
    auth.py       tokens; the httpx.Auth flow (legacy Token, or PAT -> refreshed Bearer)
    queries.py    Data Manager queries: which tasks a list read returns, which fields
    urls.py       which image URLs task data may make us fetch, and the address to connect to
    transport.py  sending: retries, redirects, bounded reads, the token's origin, errors
    client.py     LabelStudioClient: one method per API call

Errors follow ``service.errors``::

    404                              -> NotFoundError
    401 / 403                        -> AuthError (the message names the likely cause and the fix);
                                        a 403 to a webhook (SSRF protection) -> LabelStudioError
    other 4xx                        -> LabelStudioError(status_code=...)
    connection error, timeout, 429, 5xx, after ``retries`` retries -> LabelStudioUnavailable
    (except 1.23.2's 500s that are really permanent: unknown upload -> NotFoundError,
    unresolvable webhook host -> LabelStudioError)
    download over ``max_bytes``      -> ImageError
    image URL to an internal address or a Label Studio path that is not a file -> RefusedURL

Authentication: a Personal Access Token (a JWT refresh token) is exchanged at
``POST /api/token/refresh/`` for a 5-minute access token sent as ``Bearer``; a legacy key is sent
as ``Token``. Tokens never appear in messages or logs, and never go to a host other than Label
Studio's own (file downloads from other hosts and presigned URLs are fetched without them).
"""

from __future__ import annotations

from service.labelstudio.types import (
    CLOUD_SCHEMES,
    DEFAULT_MAX_BYTES,
    MAX_FILES_PER_IMPORT,
    MAX_TASKS_PER_READ,
    Annotation,
    Control,
    ControlInput,
    Prediction,
    PredictionIn,
    Project,
    Task,
    Webhook,
)

__all__ = [
    "CLOUD_SCHEMES",
    "DEFAULT_MAX_BYTES",
    "MAX_FILES_PER_IMPORT",
    "MAX_TASKS_PER_READ",
    "Annotation",
    "Control",
    "ControlInput",
    "Prediction",
    "PredictionIn",
    "Project",
    "Task",
    "Webhook",
]
