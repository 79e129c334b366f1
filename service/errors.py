"""The one exception tree of ls-autoseg.

    AutosegError                 base of everything this package raises on purpose
    ├── ConfigError              bad or missing settings; fix the config and start again
    ├── SkipJob                  not a failure: the worker ends the job as ``skipped`` (the task
    │                            was annotated, or already holds this model version's prediction)
    ├── BadWebhook               a webhook body we do not understand (answered 400)
    ├── LabelStudioServerError   the local Label Studio (tests, quickstart) would not install
    │                            or start
    ├── ServiceStartError        ``serve`` in a subprocess (tests, benchmarks) exited or was not
    │                            ready in time
    ├── LeaseLost                a shared queue's job this worker no longer holds (its lease
    │                            ran out, another worker took it): it must not post or conclude
    ├── PermanentError           retrying will not help: the job fails at once (raised as
    │   │                        such for a task of another project, no image URL, a model
    │   │                        that failed on the batch)
    │   ├── ImageError           unreadable, corrupt or too large image
    │   ├── ModelError           the model file or its output does not fit the contract
    │   ├── RLEError             a mask or RLE stream that the brush format cannot hold
    │   ├── ProjectMismatchError names or labels that the project's label config lacks
    │   ├── RefusedURL           an image URL the task may not make us fetch (an internal
    │   │                        address, a Label Studio path that is not a file)
    │   └── LabelStudioError     Label Studio answered 4xx (other than 429)
    │       ├── AuthError        401/403: bad, expired or mixed-up token; message says why
    │       └── NotFoundError    404: a task, project or file that is not (yet) there
    └── RetryableError           transient: the worker retries with backoff
        ├── LabelStudioUnavailable  connection error, timeout, 429 or 5xx (after retries)
        ├── DownloadTimeout      an image download past ``label_studio.download_timeout_s``
        ├── PostUnanswered       a post of predictions with no answer (it may land later): the
        │                        job's next post is checked for a second prediction
        └── NotYetVisible        a task's 404 soon after its webhook (the import has not
                                 committed): retried from 1 s, never taken for an outage

Code that decides whether to retry looks only at ``RetryableError`` vs the rest; the worker
(``service/worker/settle.py``) looks at ``SkipJob`` and ``NotYetVisible`` first.
"""

from __future__ import annotations


class AutosegError(Exception):
    """Base class of every error ls-autoseg raises deliberately."""


class ConfigError(AutosegError):
    """Settings are missing, unknown or of the wrong type."""


class BadWebhook(AutosegError):
    """A body that is not a webhook we understand; the message is safe to send back (it names
    the offending field, never its value)."""


class LabelStudioServerError(AutosegError):
    """The local Label Studio of ``service.local.lsserver`` could not be installed or started."""


class ServiceStartError(AutosegError):
    """``service.local.process.ServiceProcess`` could not start ``serve``; the log's tail says
    why."""


class LeaseLost(AutosegError):
    """A running job of a shared queue that this worker no longer holds: it stopped renewing
    its lease (frozen, cut off) long enough for another worker to take the job over."""


class SkipJob(AutosegError):
    """Not an error: the job ends as ``skipped`` with this message as its reason."""


class PermanentError(AutosegError):
    """A failure that another attempt would repeat."""


class RetryableError(AutosegError):
    """A transient failure: connection, timeout, 429, 5xx."""


class ImageError(PermanentError):
    """An image that cannot be decoded, or is over the pixel limit."""


class ModelError(PermanentError):
    """A model that cannot be loaded or breaks the model contract."""


class RLEError(PermanentError):
    """A mask too large for the brush RLE format, or a malformed RLE stream."""


class ProjectMismatchError(PermanentError):
    """from_name, to_name or label values that the project's label config does not have."""


class RefusedURL(PermanentError):
    """An image URL from task data that points where the service must not go: an address that
    is not public (and not in ``label_studio.allowed_image_hosts``), or a Label Studio path
    other than its file endpoints. The message names the setting that would allow it."""


class LabelStudioError(PermanentError):
    """Label Studio refused a request (a 4xx other than 429)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthError(LabelStudioError):
    """The token was refused; the message names the likely cause and the fix."""


class NotFoundError(LabelStudioError):
    """404: the object does not exist, or not yet (webhooks can outrun the import commit)."""


class LabelStudioUnavailable(RetryableError):
    """Label Studio could not be reached, timed out, or answered 429/5xx, after retries."""


POST_UNANSWERED = "the post of its prediction got no answer"
"""How a ``PostUnanswered`` reason starts; the journal keeps it as the job's reason, and the
worker reads it back on the next attempt (``service/worker/leases.py``)."""


class PostUnanswered(RetryableError):
    """A post of predictions that failed without a clear answer (a timeout, a connection lost,
    a 5xx): Label Studio may have stored it, or may still. The retry's re-check finds what was
    stored by then; what lands after it is undone after the job's next post (the first
    prediction stays)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{POST_UNANSWERED}: {cause}")


class DownloadTimeout(RetryableError):
    """An image download (redirects and retries included) that took longer than its deadline:
    a slow or stalled image host, retried like any transient failure until its attempts end."""


class NotYetVisible(RetryableError):
    """A task Label Studio answers 404 for within ``not_found_grace_s`` of its webhook (the web
    UI's import sends the webhook before its transaction commits)."""
