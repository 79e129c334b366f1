"""Match task images to local files by name, undoing what Label Studio does to file names.

An uploaded ``img 0.jpg`` is stored as ``/data/upload/<project>/<8 hex>-img_0.jpg``: Django
replaces spaces with ``_`` and drops characters other than letters, digits, ``-``, ``_`` and
``.``, and Label Studio puts a random 8-hex prefix in front. Both sides of a match go through
the same :func:`match_key`, so ``img 0`` (a mask file's stem) finds ``img_0`` (the task's).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_INVALID = re.compile(r"[^-\w.]")


def sanitize(name: str) -> str:
    """Django's ``get_valid_filename``, which Label Studio's upload storage applies."""
    return _INVALID.sub("", name.strip().replace(" ", "_"))


def image_file_name(url: str) -> str:
    """The file name a task's image URL points at, without Label Studio's upload prefix."""
    parts = urlsplit(url)
    if parts.path.rstrip("/").endswith("/data/local-files"):
        path = parse_qs(parts.query).get("d", [""])[0]
        return PurePosixPath(path).name
    name = PurePosixPath(unquote(parts.path)).name
    if "/data/upload/" in parts.path:
        name = _UPLOAD_PREFIX.sub("", name, count=1)
    return name


def match_key(file_name_or_stem: str) -> str:
    """The key under which a task image and a mask file are matched: the sanitized stem."""
    return sanitize(PurePosixPath(file_name_or_stem).stem)
