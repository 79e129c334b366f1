"""Masks -> Label Studio brush results, checked against the project's label config. Pure.

Label Studio 1.23.2 stores a result whose ``from_name`` or label value does not exist in the
label config and then never draws it (and bulk import drops it silently), so every name and
label is checked here, before anything is posted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.constants import RESULT_ID_PREFIX
from service.errors import ProjectMismatchError
from service.labelstudio import Control, PredictionIn, Project
from service.results import rle

BRUSH_TYPE = "brushlabels"


@dataclass(frozen=True)
class BrushTarget:
    """Where a project wants brush masks: control, image tag, data key and label values."""

    project_id: int
    from_name: str
    to_name: str
    data_key: str
    values: Mapping[str, str]  # model label -> Label Studio label value


def resolve_target(
    project: Project,
    model_labels: Sequence[str],
    *,
    from_name: str | None = None,
    to_name: str | None = None,
    label_map: Mapping[str, str] | None = None,
) -> BrushTarget:
    """Find the BrushLabels control and map model labels onto its values, or say what is wrong."""
    brushes = [c for c in project.controls if c.type.lower() == BRUSH_TYPE]
    described = _describe(project)
    if from_name is not None:
        control = project.control(from_name)
        if control is None or control.type.lower() != BRUSH_TYPE:
            raise ProjectMismatchError(
                f"from_name {from_name!r} is not a BrushLabels control of project {project.id}; "
                f"the project has {described}"
            )
    elif len(brushes) == 1:
        control = brushes[0]
    elif not brushes:
        raise ProjectMismatchError(
            f"project {project.id} has no BrushLabels control, so it cannot show masks; "
            f"it has {described}. Add <BrushLabels name=... toName=...> to its labeling interface"
        )
    else:
        raise ProjectMismatchError(
            f"project {project.id} has several BrushLabels controls "
            f"({', '.join(c.name for c in brushes)}): set from_name to one of them"
        )
    if to_name is None:
        if len(control.to_name) != 1:
            raise ProjectMismatchError(
                f"BrushLabels {control.name!r} labels several objects "
                f"({', '.join(control.to_name)}): set to_name to one of them"
            )
        to_name = control.to_name[0]
    elif to_name not in control.to_name:
        raise ProjectMismatchError(
            f"to_name {to_name!r} is not what BrushLabels {control.name!r} labels; "
            f"it labels {', '.join(repr(t) for t in control.to_name)}"
        )
    data_key = _data_key(control, to_name)
    mapping = dict(label_map or {})
    unknown_keys = sorted(set(mapping) - set(model_labels))
    if unknown_keys:
        raise ProjectMismatchError(
            f"label_map names {unknown_keys}, which are not model labels {list(model_labels)}"
        )
    values = {label: mapping.get(label, label) for label in model_labels}
    missing = [f"{k} -> {v}" if k != v else k for k, v in values.items() if v not in control.labels]
    if missing:
        raise ProjectMismatchError(
            f"model label(s) {', '.join(missing)} are not label values of BrushLabels "
            f"{control.name!r} in project {project.id}, whose values are "
            f"{list(control.labels)}: rename them in the project or set label_map "
            "(model label -> Label Studio value); otherwise masks would be invisible"
        )
    return BrushTarget(
        project_id=project.id,
        from_name=control.name,
        to_name=to_name,
        data_key=data_key,
        values=values,
    )


def _data_key(control: Control, to_name: str) -> str:
    # parsed_label_config lists inputs in to_name order.
    index = control.to_name.index(to_name)
    if index < len(control.inputs) and control.inputs[index].type.lower() == "image":
        return control.inputs[index].value
    images = [i for i in control.inputs if i.type.lower() == "image"]
    if len(images) == 1:
        return images[0].value
    raise ProjectMismatchError(f"BrushLabels {control.name!r}: {to_name!r} is not an Image tag")


def _describe(project: Project) -> str:
    if not project.controls:
        return "no controls"
    return "controls " + ", ".join(
        f"{c.type} {c.name!r} (to {', '.join(c.to_name)}; labels {list(c.labels)})"
        for c in project.controls
    )


def brush_results(
    masks: Mapping[str, np.ndarray], width: int, height: int, target: BrushTarget
) -> list[dict[str, Any]]:
    """One brushlabels result per model label; masks are (height, width), any non-zero = set."""
    results: list[dict[str, Any]] = []
    for label, mask in masks.items():
        if mask.shape != (height, width):
            raise ProjectMismatchError(
                f"mask for {label!r} is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}"
            )
        results.append(
            {
                "id": f"{RESULT_ID_PREFIX}{len(results)}",
                "from_name": target.from_name,
                "to_name": target.to_name,
                "type": BRUSH_TYPE,
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": rle.encode(mask),
                    "brushlabels": [target.values[label]],
                },
            }
        )
    return results


def build_prediction(
    task_id: int,
    masks: Mapping[str, np.ndarray],
    width: int,
    height: int,
    target: BrushTarget,
    *,
    score: float,
    model_version: str,
) -> PredictionIn:
    """A prediction for one task; no masks gives an empty result (the model saw the task)."""
    return PredictionIn(
        task=task_id,
        result=brush_results(masks, width, height, target),
        score=score,
        model_version=model_version,
    )


def decode_result(result: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    """(label value, (H, W) uint8 0/255 mask) from a brushlabels result read back."""
    value = result["value"]
    mask = rle.decode(value["rle"], int(result["original_height"]), int(result["original_width"]))
    return str(value["brushlabels"][0]), mask
