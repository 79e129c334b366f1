"""Two small asyncio helpers the worker's loops share."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


async def first(*waits: Coroutine[Any, Any, Any], timeout: float | None = None) -> None:
    """Wait until the first of ``waits`` finishes (or ``timeout``); cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def drain(queue: asyncio.Queue[_T]) -> list[_T]:
    """Everything waiting in ``queue`` now, taken out."""
    items: list[_T] = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
