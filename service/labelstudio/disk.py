"""Label Studio's files read from disk, where the service can reach them (the quickstart, a
compose file with Label Studio's data volume mounted read-only): an uploaded image costs
Label Studio ~16 ms of CPU per download (auth, an unindexed lookup, streaming) and nothing
read from disk.

``/data/upload/<project>/<name>`` is ``<media_root>/upload/<project>/<name>`` (Label Studio's
``<LABEL_STUDIO_BASE_DATA_DIR>/media``); ``/data/local-files/?d=<path>`` is
``<local_files_root>/<path>`` (its ``LOCAL_FILES_DOCUMENT_ROOT``). Whoever imports tasks
writes these URLs: one that normalises outside its root (``..``, an absolute path, a symlink
out, a NUL) is refused, never read. A file not there falls back to the HTTP download.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

from service.errors import ImageError, RefusedURL

UPLOAD_PREFIX = "/data/upload/"
LOCAL_FILES_PATHS = ("/data/local-files", "/data/local-files/")


class DiskFiles:
    """Reads Label Studio's uploaded and local-storage files under the configured roots."""

    def __init__(self, media_root: Path | None, local_files_root: Path | None) -> None:
        self.media_root = media_root
        self.local_files_root = local_files_root

    def path_for(self, url: str) -> Path | None:
        """The file behind a root-relative task URL, if a configured root covers it and the
        file is there; None to download it over HTTP; ``RefusedURL`` if it leads outside."""
        parts = urlsplit(url.strip())
        if parts.path.startswith(UPLOAD_PREFIX) and self.media_root is not None:
            root, relative = self.media_root / "upload", unquote(parts.path[len(UPLOAD_PREFIX) :])
        elif parts.path in LOCAL_FILES_PATHS and self.local_files_root is not None:
            given = parse_qs(parts.query).get("d")
            if not given:
                return None
            root, relative = self.local_files_root, given[0]
        else:
            return None
        return _inside(root, relative, url)

    @staticmethod
    def read(path: Path, max_bytes: int) -> bytes:
        """The file's bytes; ``ImageError`` past ``max_bytes`` (as a download would be)."""
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageError(f"{path.name}: larger than {max_bytes} bytes")
        return data


def _inside(root: Path, relative: str, url: str) -> Path | None:
    """``root/relative`` if it stays under ``root`` once resolved (None if no such file)."""
    shown = url.strip()[:300]
    pure = PurePosixPath(relative)
    if "\x00" in relative or not relative or pure.is_absolute() or ".." in pure.parts:
        raise RefusedURL(f"{shown}: leads outside Label Studio's files; not read")
    base = root.resolve()
    try:
        resolved = (base / pure).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission on the way
        raise RefusedURL(f"{shown}: cannot be read under {root}: {exc}") from exc
    if not resolved.is_relative_to(base):  # a symlink out of the root
        raise RefusedURL(f"{shown}: leads outside Label Studio's files; not read")
    return resolved if resolved.is_file() else None
