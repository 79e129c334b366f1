"""Data Manager queries: which tasks a list read returns, and which fields it serializes.

Label Studio 1.23.2 filters on the task's own counters (``total_annotations``,
``cancelled_annotations``: set when the task is created with its annotations, and kept current
on every annotation save and delete) and on the model versions of its predictions. A list read
of ``LEAN_FIELDS`` skips what ``fields=all`` costs it (every annotation's and prediction's whole
result JSON, RLE masks included, and a drafts query per task): 1.7-2 ms of its CPU a task
against ~6 ms in groups of 16, measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Fields of a lean list read (``include=``): enough to fetch the image and check the counters.
LEAN_FIELDS = "id,data,total_annotations,cancelled_annotations"


def untouched_query(
    model_version: str, *, after_id: int = 0, ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """Tasks with an id over ``after_id`` (or among ``ids``), in id order, that nobody
    annotated or skipped and without a prediction of ``model_version``; predictions of other
    versions do not count.

    Label Studio compares versions as substrings: a task whose only predictions are of
    "v1-old" is taken as predicted by "v1" and left out. So a task missing from the answer is
    not proof of anything: callers read it again in full (the worker) or accept missing it
    (reconcile), and never duplicate one.
    """
    items: list[dict[str, Any]] = [
        {"filter": f"filter:tasks:{column}", "operator": "equal", "type": "Number", "value": 0}
        for column in ("total_annotations", "cancelled_annotations")
    ]
    items.append(
        {
            "filter": "filter:tasks:predictions_model_versions",
            "operator": "not_contains",
            "type": "List",
            "value": [model_version],
        }
    )
    if after_id:
        items.append(
            {
                "filter": "filter:tasks:id",
                "operator": "greater",
                "type": "Number",
                "value": after_id,
            }
        )
    query: dict[str, Any] = {
        "filters": {"conjunction": "and", "items": items},
        "ordering": ["tasks:id"],
    }
    if ids is not None:
        # An empty "included" list would select every task of the project.
        if not ids:
            raise ValueError("untouched_query: ids must not be empty")
        query["selectedItems"] = {"all": False, "included": [int(i) for i in ids]}
    return query
