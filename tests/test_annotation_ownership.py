"""``is_ours``: which annotations ``replace-annotations`` may replace without being asked."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.commands.annotations import is_ours
from service.labelstudio import Annotation

ME, OTHER = 7, 8
CREATED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def made_by_the_tool(**changes: Any) -> Annotation:
    """An annotation as ``replace-annotations --execute`` creates it: a plain API create."""
    annotation = Annotation(
        id=1,
        task=10,
        was_cancelled=False,
        ground_truth=False,
        completed_by=ME,
        result=({"id": "autoseg_0", "type": "brushlabels"},),
        created_at=CREATED,
        updated_at=CREATED + timedelta(microseconds=30),
        updated_by=ME,
    )
    return dataclasses.replace(annotation, **changes)


def test_the_tools_own_annotation_is_ours() -> None:
    assert is_ours(made_by_the_tool(), ME)
    assert is_ours(made_by_the_tool(updated_by=None), ME)


@pytest.mark.parametrize(
    "changes",
    [
        # an annotator accepted a prediction unchanged: its ids are ls-autoseg's
        {"completed_by": OTHER, "updated_by": OTHER, "parent_prediction": 3, "lead_time": 4.2},
        {"completed_by": OTHER, "updated_by": OTHER},
        {"completed_by": None},
        {"updated_by": OTHER},
        # the token's own user in the editor
        {"parent_prediction": 3},
        {"parent_annotation": 2},
        {"lead_time": 12.5},
        {"draft_created_at": CREATED},
        {"import_id": 5},
        {"updated_at": CREATED + timedelta(seconds=30)},
        {"updated_at": None},
        {"result": ({"id": "autoseg_0"}, {"id": "a1b2c3"})},
        {"result": ()},
        {"was_cancelled": True},
        {"ground_truth": True},
    ],
)
def test_anything_a_person_may_have_touched_is_not_ours(changes: dict[str, Any]) -> None:
    assert not is_ours(made_by_the_tool(**changes), ME)
