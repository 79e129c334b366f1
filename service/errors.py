"""The one exception tree of ls-autoseg.

    AutosegError                 base of everything this package raises on purpose
    ├── ConfigError              bad or missing settings; fix the config and start again
    ├── PermanentError           retrying will not help: the job fails at once
    │   ├── ImageError           unreadable, corrupt or too large image
    │   ├── ModelError           the model file or its output does not fit the contract
    │   └── RLEError             a mask or RLE stream that the brush format cannot hold
    └── RetryableError           transient: the worker retries with backoff

Code that decides whether to retry looks only at ``RetryableError`` vs the rest.
"""

from __future__ import annotations


class AutosegError(Exception):
    """Base class of every error ls-autoseg raises deliberately."""


class ConfigError(AutosegError):
    """Settings are missing, unknown or of the wrong type."""


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
