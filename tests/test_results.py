from __future__ import annotations

import numpy as np
import pytest

from service.errors import ProjectMismatchError
from service.labelstudio import Control, ControlInput, Project
from service.results import build_prediction, decode_result, resolve_target, rle


def project(*controls: Control) -> Project:
    return Project(id=7, title="t", label_config="<View/>", controls=controls, model_version=None)


BRUSH = Control(
    name="tag",
    type="BrushLabels",
    to_name=("image",),
    inputs=(ControlInput(type="Image", value="img_url"),),
    labels=("label_a", "label_b"),
)
CHOICES = Control(
    name="quality", type="Choices", to_name=("image",), inputs=BRUSH.inputs, labels=("ok",)
)


def test_the_single_brush_control_is_found() -> None:
    target = resolve_target(project(CHOICES, BRUSH), ["label_a", "label_b"])
    assert (target.from_name, target.to_name, target.data_key) == ("tag", "image", "img_url")
    assert target.values == {"label_a": "label_a", "label_b": "label_b"}


def test_label_map_translates_model_labels() -> None:
    target = resolve_target(project(BRUSH), ["cat"], label_map={"cat": "label_b"})
    assert target.values == {"cat": "label_b"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"from_name": "brush"},
            r"from_name 'brush' is not a BrushLabels control.*Choices 'quality'",
        ),
        ({"from_name": "quality"}, "not a BrushLabels control"),
        (
            {"to_name": "img"},
            r"to_name 'img' is not what BrushLabels 'tag' labels; it labels 'image'",
        ),
        ({"labels": ["label_a", "dog"]}, r"dog are not label values .* \['label_a', 'label_b'\]"),
        ({"labels": ["cat"], "label_map": {"cat": "label_z"}}, "cat -> label_z"),
        ({"labels": ["cat"], "label_map": {"dog": "label_a"}}, r"label_map names \['dog'\]"),
    ],
)
def test_mismatches_fail_with_what_the_project_has(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    labels = kwargs.pop("labels", ["label_a"])
    with pytest.raises(ProjectMismatchError, match=message):
        resolve_target(project(CHOICES, BRUSH), labels, **kwargs)


def test_no_or_several_brush_controls() -> None:
    with pytest.raises(ProjectMismatchError, match="no BrushLabels control"):
        resolve_target(project(CHOICES), ["a"])
    other = Control("tag2", "BrushLabels", ("image",), BRUSH.inputs, ("label_a",))
    with pytest.raises(ProjectMismatchError, match=r"several BrushLabels controls \(tag, tag2\)"):
        resolve_target(project(BRUSH, other), ["label_a"])
    assert resolve_target(project(BRUSH, other), ["label_a"], from_name="tag2").from_name == "tag2"


def test_prediction_round_trips_through_the_codec() -> None:
    target = resolve_target(
        project(BRUSH), ["cat", "dog"], label_map={"cat": "label_a", "dog": "label_b"}
    )
    rng = np.random.default_rng(3)
    cat = rng.random((30, 50)) > 0.7
    dog = np.zeros((30, 50), dtype=np.uint8)
    dog[3:9, 10:40] = 1  # a 0/1 mask must still come out 0/255
    pred = build_prediction(
        11, {"cat": cat, "dog": dog}, 50, 30, target, score=0.8, model_version="v1"
    )
    body = pred.to_json()
    assert body["task"] == 11 and body["model_version"] == "v1" and body["score"] == 0.8
    first, second = body["result"]
    assert first["from_name"] == "tag" and first["to_name"] == "image"
    assert first["type"] == "brushlabels" and first["value"]["format"] == "rle"
    assert (first["original_width"], first["original_height"]) == (50, 30)
    assert first["id"] != second["id"]
    label, mask = decode_result(first)
    assert label == "label_a"
    np.testing.assert_array_equal(mask, np.where(cat, 255, 0))
    label, mask = decode_result(second)
    assert label == "label_b"
    np.testing.assert_array_equal(mask, dog * 255)
    assert second["value"]["rle"] == rle.encode(dog.astype(bool))


def test_empty_prediction_and_size_mismatch() -> None:
    target = resolve_target(project(BRUSH), ["label_a"])
    assert build_prediction(1, {}, 5, 5, target, score=0.5, model_version="v").result == []
    with pytest.raises(ProjectMismatchError, match="mask for 'label_a' is 4x5, image is 5x5"):
        build_prediction(
            1, {"label_a": np.zeros((5, 4))}, 5, 5, target, score=0.5, model_version="v"
        )
