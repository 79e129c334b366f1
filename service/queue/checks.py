"""Argument checks every queue implementation makes, so that a bad call reads the same
``ValueError`` on any store (the contract suite matches these messages)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def is_positive_int(value: object) -> bool:
    """A positive int that fits a signed 64-bit column (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63


def job_args(project: int, task_ids: Sequence[int], model_version: str) -> list[int]:
    """The task ids of an ``enqueue``/``accept`` call, after checking all three arguments."""
    if not is_positive_int(project):
        raise ValueError(f"project must be a positive integer, got {project!r}")
    if not isinstance(model_version, str) or not model_version:
        raise ValueError(f"model_version must be a non-empty string, got {model_version!r}")
    if isinstance(task_ids, str | bytes):
        raise ValueError("task_ids must be a sequence of integers, not a string")
    bad = [t for t in task_ids if not is_positive_int(t)]
    if bad:
        raise ValueError(f"task ids must be positive integers, got {bad[:5]!r}")
    return [int(t) for t in task_ids]


def limit(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"limit must be a non-negative integer, got {value!r}")
    return value


def delay_s(value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"delay_s must be a finite number >= 0, got {value!r}")
    return float(value)


def max_attempts(value: int) -> int:
    if not is_positive_int(value):
        raise ValueError(f"max_attempts must be a positive integer, got {value!r}")
    return value
