"""``ls-autoseg upload``: mask files from ``predict`` -> Label Studio predictions.

Dry-run by default: tasks are fetched, matched to ``masks_binary/<label>/<stem>.png`` by file
name, and the predictions written to JSON for a person to check; ``--upload`` posts them.
Tasks with annotations are skipped (a person's work comes first), and so are tasks that
already hold a prediction of the same model_version, so a second run posts nothing.

``predict`` writes mask files only for what it found, so a task without mask files is either
"predicted, nothing found" or "never predicted"; ``summary.csv`` tells them apart. The first
gets an empty prediction, as the service gives it, so it no longer looks unprocessed; the
second, and an image that ``predict`` failed on, are reported.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from service.commands.naming import image_file_name, match_key
from service.errors import ImageError
from service.labelstudio import PredictionIn, Task
from service.labelstudio.client import LabelStudioClient
from service.results import BrushTarget, build_prediction, resolve_target

log = logging.getLogger(__name__)

BULK_CHUNK = 50  # predictions per bulk request: brush RLE makes each one large


@dataclass(frozen=True)
class UploadOptions:
    project_id: int
    pred_dir: Path
    tasks_out: Path
    predictions_out: Path
    model_version: str
    score: float
    min_pixels: int
    from_name: str | None = None
    to_name: str | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)
    upload: bool = False
    include_existing: bool = False


@dataclass
class UploadReport:
    tasks: int = 0
    generated: int = 0
    empty: int = 0
    skipped_annotated: list[int] = field(default_factory=list)
    skipped_existing: list[int] = field(default_factory=list)
    without_masks: list[int] = field(default_factory=list)  # never predicted
    predict_failed: list[str] = field(default_factory=list)  # "task N: reason"
    masks_without_task: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sent: int = 0
    created: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.created == self.sent


@dataclass(frozen=True)
class MaskSet:
    """The mask files of one image stem, one per model label."""

    stem: str
    files: Mapping[str, Path]


def scan_masks(pred_dir: Path) -> tuple[list[str], dict[str, MaskSet], list[str]]:
    """Labels, mask sets by match key, and problems (two stems with the same key)."""
    root = pred_dir / "masks_binary"
    if not root.is_dir():
        raise ImageError(f"{root} does not exist: run `ls-autoseg predict --out-dir {pred_dir}`")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    by_key: dict[str, dict[str, Path]] = {}
    stems: dict[str, str] = {}
    problems: list[str] = []
    for label in labels:
        for path in sorted((root / label).glob("*.png")):
            key = match_key(path.stem)
            known = stems.setdefault(key, path.stem)
            if known != path.stem:
                problems.append(f"mask files {known!r} and {path.stem!r} match the same task name")
                continue
            by_key.setdefault(key, {})[label] = path
    sets = {key: MaskSet(stem=stems[key], files=files) for key, files in by_key.items()}
    return labels, sets, problems


@dataclass(frozen=True)
class Predicted:
    """What ``summary.csv`` says of one image: its kept labels, or why predict failed on it."""

    image: str
    kept: frozenset[str]
    error: str | None


def read_summary(pred_dir: Path) -> dict[str, Predicted] | None:
    """``predict``'s ``summary.csv`` by match key of the image's stem; None if there is none
    (outputs of an older ``predict``, or masks made some other way)."""
    path = pred_dir / "summary.csv"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImageError(f"cannot read {path}: {exc}") from exc
    kept: dict[str, set[str]] = {}
    images: dict[str, str] = {}
    errors: dict[str, str] = {}
    for row in rows:
        image = row.get("image") or ""
        if not image:
            continue
        key = match_key(Path(image).stem)
        images.setdefault(key, image)
        kept.setdefault(key, set())
        if row.get("error"):
            errors[key] = str(row["error"])
        elif row.get("kept") == "1":
            kept[key].add(str(row.get("label") or ""))
    return {
        key: Predicted(image=images[key], kept=frozenset(kept[key]), error=errors.get(key))
        for key in images
    }


def read_mask(path: Path) -> np.ndarray:
    data = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if data is None:
        raise ImageError(f"cannot read mask {path}")
    mask: np.ndarray = data > 0
    return mask


def task_summary(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "data": dict(task.data),
        "total_annotations": task.total_annotations,
        "cancelled_annotations": task.cancelled_annotations,
        "total_predictions": task.total_predictions,
        "predictions_model_versions": list(task.predictions_model_versions),
    }


async def run_upload(
    client: LabelStudioClient, options: UploadOptions, out: TextIO
) -> UploadReport:
    report = UploadReport()
    labels, mask_sets, problems = scan_masks(options.pred_dir)
    report.problems.extend(problems)
    summary = read_summary(options.pred_dir)
    if summary is None:
        print(
            f"no summary.csv in {options.pred_dir}: tasks without masks are reported, none "
            "gets an empty prediction",
            file=out,
        )
    project = await client.get_project(options.project_id)
    target = resolve_target(
        project,
        labels,
        from_name=options.from_name,
        to_name=options.to_name,
        label_map=options.label_map,
    )
    tasks = [t async for t in client.iter_tasks(options.project_id, fields_all=True)]
    report.tasks = len(tasks)
    _write_json(options.tasks_out, [task_summary(t) for t in tasks])

    predictions: list[PredictionIn] = []
    matched: set[str] = set()
    for task in tasks:
        url = task.data.get(target.data_key)
        if not isinstance(url, str):
            report.problems.append(
                f"task {task.id} has no image under data key {target.data_key!r}"
            )
            continue
        key = match_key(image_file_name(url))
        masks = mask_sets.get(key)
        if masks is not None:
            matched.add(key)
        if task.is_annotated:
            report.skipped_annotated.append(task.id)
            continue
        if not options.include_existing and task.has_prediction_of(options.model_version):
            report.skipped_existing.append(task.id)
            continue
        if masks is None:
            outcome = (summary or {}).get(key)
            if outcome is None:
                report.without_masks.append(task.id)
                continue
            if outcome.error is not None:
                report.predict_failed.append(f"task {task.id}: {outcome.image}: {outcome.error}")
                continue
            if outcome.kept:
                report.problems.append(
                    f"task {task.id}: summary.csv keeps {sorted(outcome.kept)} for "
                    f"{outcome.image} but masks_binary/ has no mask file for it"
                )
                continue
        try:
            prediction = _prediction(task.id, masks, target, options)
        except ImageError as exc:
            report.problems.append(f"task {task.id}: {exc}")
            continue
        report.empty += not prediction.result
        predictions.append(prediction)
    report.masks_without_task = sorted(s.stem for k, s in mask_sets.items() if k not in matched)
    report.generated = len(predictions)
    _write_json(options.predictions_out, [p.to_json() for p in predictions])

    _print_summary(report, options, target, out)
    if not options.upload:
        print("dry-run: not uploading predictions", file=out)
        return report
    for start in range(0, len(predictions), BULK_CHUNK):
        chunk = predictions[start : start + BULK_CHUNK]
        report.sent += len(chunk)
        report.created += await client.import_predictions(options.project_id, chunk)
    print(f"uploaded predictions={report.created}", file=out)
    if report.created != report.sent:
        print(
            f"warning: Label Studio created {report.created} of {report.sent} predictions; "
            f"{report.sent - report.created} were dropped (results that do not fit the "
            "project's label config)",
            file=out,
        )
    return report


def _prediction(
    task_id: int, masks: MaskSet | None, target: BrushTarget, options: UploadOptions
) -> PredictionIn:
    """The task's prediction; ``masks`` None: predicted, nothing found (an empty result)."""
    if masks is None:
        return PredictionIn(task_id, [], score=options.score, model_version=options.model_version)
    arrays = {label: read_mask(path) for label, path in masks.files.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ImageError(f"the masks of {masks.stem!r} differ in size: {sorted(shapes)}")
    (height, width) = shapes.pop()
    kept = {label: a for label, a in arrays.items() if a.sum() >= max(1, options.min_pixels)}
    return build_prediction(
        task_id,
        kept,
        width,
        height,
        target,
        score=options.score,
        model_version=options.model_version,
    )


def _write_json(path: Path, data: Sequence[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _print_summary(
    report: UploadReport, options: UploadOptions, target: BrushTarget, out: TextIO
) -> None:
    print(
        f"project {options.project_id}: {report.tasks} task(s); BrushLabels {target.from_name!r} "
        f"-> {target.to_name!r}",
        file=out,
    )
    print(f"skipped (annotated): {len(report.skipped_annotated)}", file=out)
    print(
        f"skipped (already have {options.model_version!r} predictions): "
        f"{len(report.skipped_existing)}",
        file=out,
    )
    if report.without_masks:
        print(
            f"tasks never predicted (no masks, not in summary.csv): "
            f"{len(report.without_masks)} {_ids(report.without_masks)}",
            file=out,
        )
    if report.predict_failed:
        print(f"tasks whose image predict failed on: {len(report.predict_failed)}", file=out)
        for line in report.predict_failed:
            print(f"  {line}", file=out)
    if report.masks_without_task:
        print(
            f"mask files without a task: {len(report.masks_without_task)} "
            f"{_ids(report.masks_without_task)}",
            file=out,
        )
    for problem in report.problems:
        print(f"problem: {problem}", file=out)
    print(f"wrote {options.tasks_out} and {options.predictions_out}", file=out)
    print(f"generated predictions={report.generated} (empty: {report.empty})", file=out)


def _ids(items: Sequence[object], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"
