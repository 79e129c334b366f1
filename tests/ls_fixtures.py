"""Fixtures for tests against a real Label Studio (a pytest plugin: see ``pytest_plugins`` in
tests/conftest.py). One server per session; each test makes its own projects.

Tests run their async bodies with ``asyncio.run``, so clients are made inside them::

    def test_x(ls_client):
        async def run():
            async with ls_client() as ls:
                project = await new_brush_project(ls)
        asyncio.run(run())
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.labelstudio import PredictionIn, Project, Task
from service.labelstudio.client import LabelStudioClient
from service.local import lsserver

# The tutorial's label config (seed section 四): one Image, one BrushLabels with four labels.
BRUSH_CONFIG = """<View>
<Image name="image" value="$image" zoom="true" zoomControl="true" rotateControl="true"/>
<BrushLabels name="tag" toName="image">
<Label value="label_a" background="#ff00ff"/>
<Label value="label_b" background="#00dcdc"/>
<Label value="label_c" background="#ff0000"/>
<Label value="label_d" background="#5050ff"/>
</BrushLabels>
</View>"""
BRUSH_LABELS = ("label_a", "label_b", "label_c", "label_d")


@pytest.fixture(scope="session")
def label_studio(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[lsserver.LocalLabelStudio]:
    """A real Label Studio for the whole session (legacy token enabled, SSRF protection off)."""
    server = lsserver.start(tmp_path_factory.mktemp("ls"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ls_client(
    label_studio: lsserver.LocalLabelStudio,
) -> Callable[..., LabelStudioClient]:
    """Make a client for the session's server: the legacy token unless ``token`` is given."""

    def make(token: str | None = None, **kwargs: Any) -> LabelStudioClient:
        kwargs.setdefault("retries", 2)
        kwargs.setdefault("backoff_s", 0.05)
        return LabelStudioClient(label_studio.url, token or label_studio.legacy_token, **kwargs)

    return make


async def new_brush_project(ls: LabelStudioClient, title: str | None = None) -> Project:
    """A fresh project with the tutorial's BrushLabels config."""
    return await ls.create_project(title or f"test {uuid.uuid4().hex[:8]}", BRUSH_CONFIG)


def brush_result(label: str = "label_a", from_name: str = "tag") -> list[dict[str, Any]]:
    """A 2x2 brush result (any RLE bytes will do: Label Studio does not decode them)."""
    return [
        {
            "from_name": from_name,
            "to_name": "image",
            "type": "brushlabels",
            "original_width": 2,
            "original_height": 2,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": [0, 0, 0, 16, 7], "brushlabels": [label]},
        }
    ]


def tasks_of(ls_client: Callable[..., LabelStudioClient], project: int) -> list[Task]:
    """Every task of a project with its annotations and predictions (synchronous, for tests)."""

    async def run() -> list[Task]:
        async with ls_client() as ls:
            return [t async for t in ls.iter_tasks(project, fields_all=True)]

    return asyncio.run(run())


def misfit_batch(first: int, second: int, version: str) -> list[PredictionIn]:
    """Four predictions of which two do not fit BRUSH_CONFIG (an unknown control, an unknown
    label): Label Studio's legacy bulk import drops those two, its batched one stores all."""
    return [
        PredictionIn(first, brush_result("label_b"), 0.5, version),
        PredictionIn(second, brush_result("label_c"), 0.5, version),
        PredictionIn(second, brush_result(from_name="unknown"), 0.5, version),
        PredictionIn(second, brush_result("no_such_label"), 0.5, version),
    ]
