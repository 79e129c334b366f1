"""Long-running loops that must not die unseen.

A loop that raises (a ``database is locked`` past the busy timeout, a full disk, an I/O error,
a bug) is logged with its traceback and started again after a backoff that doubles from
``base_s`` up to ``max_s`` (and starts over once a run lasted ``healthy_s``). Meanwhile
:attr:`Supervisor.problem` says which loop failed and why, for ``/ready``; it clears when the
loop reports progress (:meth:`Supervisor.ok`) or has run ``healthy_s`` since its restart.
A cancel is never caught: stopping a supervised loop stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.errors import AutosegError
from service.worker.waits import first

log = logging.getLogger(__name__)


@dataclass
class _Down:
    reason: str
    restarted_at: float | None = None  # None while waiting out the backoff


class Supervisor:
    """Runs named loops, restarting each one that raises; ``problem`` says what is down."""

    def __init__(
        self,
        *,
        base_s: float = 0.5,
        max_s: float = 30.0,
        healthy_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.healthy_s = healthy_s
        self.clock = clock
        self._down: dict[str, _Down] = {}

    @property
    def problem(self) -> str | None:
        """Why a loop is not running as it should (the first one's reason), or None."""
        now = self.clock()
        for name, down in list(self._down.items()):
            if down.restarted_at is not None and now - down.restarted_at >= self.healthy_s:
                del self._down[name]
                continue
            state = "restarted" if down.restarted_at is not None else "restarting"
            return f"the {name} loop failed ({down.reason}); {state} with backoff"
        return None

    def ok(self, name: str) -> None:
        """The loop ``name`` made progress: whatever failed it before works again."""
        if self._down:
            self._down.pop(name, None)

    async def run(
        self,
        name: str,
        loop: Callable[[], Awaitable[None]],
        stop: asyncio.Event | None = None,
        *,
        fatal: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        """Run ``loop()`` until it returns (or ``stop`` is set during a backoff); an exception
        that ``fatal`` accepts is raised instead of restarting (a one-off run giving up)."""
        failures = 0
        while True:
            started = self.clock()
            try:
                await loop()
                return
            except Exception as exc:
                if fatal(exc):
                    raise
                if self.clock() - started >= self.healthy_s:
                    failures = 0
                delay = min(self.max_s, self.base_s * 2**failures)
                failures += 1
                reason = (
                    str(exc) if isinstance(exc, AutosegError) else f"{type(exc).__name__}: {exc}"
                )
                self._down[name] = _Down(reason)
                log.error(
                    "the %s loop failed, restarting in %.1f s: %s",
                    name,
                    delay,
                    reason,
                    exc_info=exc,
                )
            if stop is None:
                await asyncio.sleep(delay)
            else:
                await first(stop.wait(), timeout=delay)
                if stop.is_set():
                    return
            down = self._down.get(name)
            if down is not None:
                down.restarted_at = self.clock()
