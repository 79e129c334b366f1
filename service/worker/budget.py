"""The decoded pixels a worker holds at once, bounded (``worker.max_inflight_megapixels``).

A small file can decode to a huge array (a 12 KiB PNG of 10000x10000 is 300 MB, and the
model's probabilities at full size are several times that), and the worker holds up to a few
dozen jobs: without a bound a handful of such tasks exhausts memory. Each job acquires its
image's pixels, read from the header, before it decodes, and releases them when it settles.

Requests are granted in arrival order, so a large image is not starved by a stream of small
ones; a request larger than the whole budget is granted once nothing else is held, so it runs
alone and never waits for ever.
"""

from __future__ import annotations

import asyncio
from collections import deque


class PixelBudget:
    """At most ``capacity`` pixels held at once (one oversized holder alone excepted).

    Holders are keyed (a job id); :meth:`release` of a key that holds nothing is a no-op, so
    every path that ends a job may release it. ``peak`` is the most ever held at once.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a pixel budget must be positive, not {capacity}")
        self.capacity = capacity
        self.peak = 0
        self._held: dict[int, int] = {}
        self._in_use = 0
        # Waiting requests, first come first served: (key, pixels, granted).
        self._waiting: deque[tuple[int, int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def holds(self, key: int) -> bool:
        return key in self._held

    async def acquire(self, key: int, pixels: int) -> None:
        """Wait until ``pixels`` fit (or nothing is held), then hold them under ``key``.

        A cancel while waiting takes the request out of the line (and lets the next one in);
        a cancel that arrives just after the grant gives the pixels back.
        """
        if key in self._held or any(k == key for k, _, _ in self._waiting):
            raise RuntimeError(f"{key} holds or waits for pixels already")
        if not self._waiting and self._fits(pixels):
            self._grant(key, pixels)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (key, pixels, granted)
        self._waiting.append(entry)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(key)  # granted, but its holder is gone
            else:
                if entry in self._waiting:  # not skipped by a wake meanwhile
                    self._waiting.remove(entry)
                self._wake()
            raise

    def release(self, key: int) -> None:
        """Give back what ``key`` holds (nothing held: nothing to do)."""
        pixels = self._held.pop(key, None)
        if pixels is None:
            return
        self._in_use -= pixels
        self._wake()

    def _fits(self, pixels: int) -> bool:
        return self._in_use == 0 or self._in_use + pixels <= self.capacity

    def _grant(self, key: int, pixels: int) -> None:
        self._held[key] = pixels
        self._in_use += pixels
        self.peak = max(self.peak, self._in_use)

    def _wake(self) -> None:
        while self._waiting and self._fits(self._waiting[0][1]):
            key, pixels, granted = self._waiting.popleft()
            if granted.done():  # cancelled: its acquire takes it out of the line
                continue
            self._grant(key, pixels)
            granted.set_result(None)
