"""One working process per state directory: an exclusive lock on a file in ``state_dir``.

The queue's crash recovery re-queues every job it finds running; it cannot tell a job a crash
left from one a live process is running. So ``serve`` holds this lock for its whole life (a
second ``serve`` on the same directory exits 2, naming the directory and the process holding
it), and ``backfill`` recovers only when it gets the lock: beside a running ``serve`` it works
without the lock, claiming queued jobs only, and never touches the running ones.

The lock is ``flock(2)`` on ``LOCK_FILE``: the kernel drops it when the process ends, however it
ends (SIGKILL, out of memory), so a crash never leaves a stale lock behind. The file says who
holds it (pid and command), for the message; it is never deleted, since another process may
be about to lock the same file.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from service.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "ls-autoseg.lock"


class StateLock:
    """The held lock on ``path``; ``release`` (or the end of the process) lets it go."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def try_acquire(cls, state_dir: Path, command: str) -> StateLock | None:
        """The lock on ``state_dir``, recording this process as ``command``; None while
        another process holds it. A directory or file that cannot be made is a ConfigError."""
        path = Path(state_dir) / LOCK_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the lock file {path}: {exc}; check state_dir"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock {path}: {exc}; put state_dir on a local disk") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        log.debug("state directory %s locked by pid %d (%s)", state_dir, os.getpid(), command)
        return cls(path, fd)

    @classmethod
    def acquire(cls, state_dir: Path, command: str) -> StateLock:
        """The lock on ``state_dir``, or a ConfigError naming the directory and its holder."""
        lock = cls.try_acquire(state_dir, command)
        if lock is None:
            raise ConfigError(
                f"state_dir {state_dir} is in use by {holder(state_dir)}: one `serve` per state"
                " directory (stop it, or give this one another state_dir)"
            )
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let the lock go; releasing twice is fine. The file stays (see the module)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def holder(state_dir: Path) -> str:
    """Who holds the lock on ``state_dir``, as its file says: "pid 123 (serve)"."""
    try:
        pid, _, command = (Path(state_dir) / LOCK_FILE).read_text().strip().partition(" ")
    except OSError:
        pid, command = "", ""
    if not pid.isdigit():  # just locked, not written yet
        return "another process"
    return f"pid {pid} ({command or 'unknown command'})"
