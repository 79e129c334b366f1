"""``annotations`` and ``replace-annotations``: masks as annotations, replaced by a plan.

``annotations`` writes an annotations payload (one ``{"task", "result"}`` per task in an id
range) from ``predict``'s mask files, offline. ``replace-annotations`` then works in two steps:

1. without ``--execute`` it reads the tasks and writes a plan: per task, what is created and
   which annotation ids are deleted, with a fingerprint of the task's annotations;
2. with ``--execute`` it refuses to start if any task's annotations changed since the plan,
   backs up everything it will delete (JSON lines, flushed) before deleting, creates the new
   annotation before deleting the old ones, and journals each step, so a run that stops
   halfway loses nothing and a second run finishes the job without creating twice.

Annotations made by ls-autoseg are replaced freely; any other annotation is a person's and is
only replaced with ``--replace-human-annotations``. Result ids alone cannot tell them apart: a
person who accepts a prediction submits its ``autoseg_`` ids unchanged. See :func:`is_ours`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from service.commands.naming import image_file_name, match_key
from service.commands.upload import read_mask, scan_masks
from service.constants import RESULT_ID_PREFIX
from service.errors import ConfigError, NotFoundError
from service.labelstudio import Annotation, Project, Task
from service.labelstudio.client import LabelStudioClient
from service.results import BrushTarget, brush_results, resolve_target

log = logging.getLogger(__name__)

# 2: plans name the token's user; version 1 plans judged ownership by result ids and timing
# alone and may list a person's accepted prediction for deletion, so they are refused.
PLAN_VERSION = 2
# created_at and updated_at of an annotation never saved again differ by microseconds
NEVER_UPDATED = timedelta(seconds=2)


# --------------------------------------------------------------------------- payload


@dataclass(frozen=True)
class PayloadOptions:
    tasks_json: Path
    pred_dir: Path
    out: Path
    start_id: int
    end_id: int
    from_name: str
    to_name: str
    data_key: str | None
    label_map: Mapping[str, str]
    min_pixels: int


def make_payload(options: PayloadOptions, out: TextIO) -> int:
    """Write ``[{"task": id, "result": [...]}, ...]`` for tasks in the id range; return count."""
    try:
        tasks = json.loads(options.tasks_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read --tasks-json {options.tasks_json}: {exc}") from exc
    if not isinstance(tasks, list):
        raise ConfigError(f"{options.tasks_json} is not a list of tasks (upload's --tasks-out)")
    labels, mask_sets, problems = scan_masks(options.pred_dir)
    target = BrushTarget(
        project_id=0,
        from_name=options.from_name,
        to_name=options.to_name,
        data_key=options.data_key or "",
        values={label: options.label_map.get(label, label) for label in labels},
    )
    payload = []
    missing = []
    for task in tasks:
        task_id, data = task.get("id"), task.get("data") or {}
        if not isinstance(task_id, int) or not options.start_id <= task_id <= options.end_id:
            continue
        key = options.data_key or (next(iter(data)) if len(data) == 1 else "image")
        url = data.get(key)
        masks = mask_sets.get(match_key(image_file_name(url))) if isinstance(url, str) else None
        if masks is None:
            missing.append(task_id)
            continue
        arrays = {label: read_mask(path) for label, path in masks.files.items()}
        height, width = next(iter(arrays.values())).shape
        kept = {k: v for k, v in arrays.items() if v.sum() >= max(1, options.min_pixels)}
        payload.append({"task": task_id, "result": brush_results(kept, width, height, target)})
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    for problem in problems:
        print(f"problem: {problem}", file=out)
    if missing:
        print(f"tasks in range without masks: {len(missing)} {missing[:10]}", file=out)
    print(f"generated annotations={len(payload)} -> {options.out}", file=out)
    return len(payload)


# --------------------------------------------------------------------------- plan


def is_ours(annotation: Annotation, user_id: int) -> bool:
    """Made by ls-autoseg with this token and never changed since: safe to replace unasked.

    All of it must hold: created and last saved by the token's user (``user_id``), through the
    API rather than the editor (which records the prediction or annotation it started from and
    the time spent) or an import, every result id ls-autoseg's, and never updated. Anything
    else is a person's work, including a prediction accepted unchanged, which carries the
    prediction's ``autoseg_`` ids.
    """
    if not annotation.result or annotation.was_cancelled or annotation.ground_truth:
        return False
    if annotation.completed_by != user_id or annotation.updated_by not in (None, user_id):
        return False
    from_editor = (
        annotation.parent_prediction is not None
        or annotation.parent_annotation is not None
        or annotation.draft_created_at is not None
        or bool(annotation.lead_time)
        or annotation.import_id is not None
    )
    if from_editor:
        return False
    ids = [str(item.get("id", "")) for item in annotation.result]
    if not all(i.startswith(RESULT_ID_PREFIX) for i in ids):
        return False
    if annotation.created_at and annotation.updated_at:
        return annotation.updated_at - annotation.created_at < NEVER_UPDATED
    return False


def fingerprint(annotations: Sequence[Annotation]) -> list[list[Any]]:
    """What must not change between plan and execute: ids and last-update times."""
    return sorted([a.id, a.updated_at.isoformat() if a.updated_at else None] for a in annotations)


@dataclass
class PlanOptions:
    project_id: int
    annotations_json: Path
    start_id: int
    end_id: int
    plan_out: Path
    replace_human: bool = False


def _load_payload(path: Path, start_id: int, end_id: int) -> tuple[dict[int, list[Any]], str]:
    try:
        raw = path.read_bytes()
        items = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read --annotations-json {path}: {exc}") from exc
    if not isinstance(items, list):
        raise ConfigError(f"{path} must be a list of {{task, result}} (ls-autoseg annotations)")
    payload: dict[int, list[Any]] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("task"), int):
            raise ConfigError(f"{path}: every item needs an integer 'task' and a 'result' list")
        if start_id <= item["task"] <= end_id:
            if item["task"] in payload:
                raise ConfigError(f"{path}: task {item['task']} appears twice")
            payload[item["task"]] = list(item.get("result") or [])
    return payload, hashlib.sha256(raw).hexdigest()


def check_results(project: Project, results: Sequence[Mapping[str, Any]]) -> None:
    """Every result's from_name/to_name/labels must exist in the project (else invisible)."""
    for item in results:
        value = item.get("value") or {}
        labels = value.get("brushlabels") or []
        resolve_target(
            project,
            [str(v) for v in labels],
            from_name=str(item.get("from_name")),
            to_name=str(item.get("to_name")),
        )


async def write_plan(
    client: LabelStudioClient, options: PlanOptions, out: TextIO
) -> dict[str, Any]:
    payload, digest = _load_payload(options.annotations_json, options.start_id, options.end_id)
    project = await client.get_project(options.project_id)
    for results in payload.values():
        check_results(project, results)
    user_id = await client.user_id()
    entries = []
    for task_id in sorted(payload):
        task = await client.get_task(task_id)
        entries.append(_plan_entry(task, options, payload[task_id], user_id))
    plan = {
        "version": PLAN_VERSION,
        "plan_id": uuid.uuid4().hex,
        "project": options.project_id,
        "user_id": user_id,
        "annotations_json": str(options.annotations_json),
        "annotations_sha256": digest,
        "start_id": options.start_id,
        "end_id": options.end_id,
        "replace_human": options.replace_human,
        "tasks": entries,
    }
    options.plan_out.parent.mkdir(parents=True, exist_ok=True)
    options.plan_out.write_text(json.dumps(plan, indent=1), encoding="utf-8")
    acting = [e for e in entries if e["skip"] is None]
    deleting = sum(len(e["delete"]) for e in acting)
    print(
        f"plan: {len(acting)} task(s) get a new annotation, {deleting} annotation(s) deleted, "
        f"{len(entries) - len(acting)} skipped -> {options.plan_out}",
        file=out,
    )
    for entry in entries:
        if entry["skip"]:
            print(f"  task {entry['task']}: skipped: {entry['skip']}", file=out)
    print("review the plan, then run again with --execute", file=out)
    return plan


def _plan_entry(
    task: Task, options: PlanOptions, results: list[Any], user_id: int
) -> dict[str, Any]:
    annotations = task.annotations or ()
    if task.project is not None and task.project != options.project_id:
        skip: str | None = f"task belongs to project {task.project}"
        delete: list[int] = []
    else:
        human = [a for a in annotations if not is_ours(a, user_id)]
        skip = None
        if human and not options.replace_human:
            skip = (
                f"has {len(human)} human annotation(s) {[a.id for a in human]}; "
                "pass --replace-human-annotations to replace them"
            )
        delete = [a.id for a in annotations] if skip is None else []
    return {
        "task": task.id,
        "fingerprint": fingerprint(annotations),
        "create": {"results": len(results), "labels": _labels(results)},
        "delete": delete,
        "skip": skip,
    }


def _labels(results: Sequence[Any]) -> list[str]:
    return sorted({str(v) for r in results for v in (r.get("value") or {}).get("brushlabels", [])})


# --------------------------------------------------------------------------- execute


@dataclass
class ExecuteReport:
    created: int = 0
    deleted: int = 0
    already_done: int = 0
    refused: list[str] = field(default_factory=list)


class _Journal:
    """Append-only JSON lines, flushed and fsynced per line: survives a crash mid-run.

    Lines carry the plan's id: a new plan written to the same path starts a new story.
    """

    def __init__(self, path: Path, plan_id: str) -> None:
        self.path = path
        self.plan_id = plan_id
        self.entries: list[dict[str, Any]] = []
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            parsed = [json.loads(line) for line in lines if line.strip()]
            self.entries = [e for e in parsed if e.get("plan_id") == plan_id]

    def append(self, entry: Mapping[str, Any]) -> None:
        line = {"plan_id": self.plan_id, **entry}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.entries.append(line)

    def created_for(self, task_id: int) -> int | None:
        for entry in self.entries:
            if entry.get("event") == "created" and entry.get("task") == task_id:
                return int(entry["annotation"])
        return None

    def deleted(self) -> set[int]:
        return {int(e["annotation"]) for e in self.entries if e.get("event") == "deleted"}


def journal_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".journal.jsonl")


def backup_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".backup.jsonl")


async def execute_plan(client: LabelStudioClient, plan_path: Path, out: TextIO) -> ExecuteReport:
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read plan {plan_path}: {exc}; write it first") from exc
    if plan.get("version") != PLAN_VERSION:
        raise ConfigError(f"{plan_path} is not a replace plan of this version: write a new plan")
    payload, digest = _load_payload(
        Path(plan["annotations_json"]), int(plan["start_id"]), int(plan["end_id"])
    )
    if digest != plan["annotations_sha256"]:
        raise ConfigError(
            f"{plan['annotations_json']} changed since the plan was written: write a new plan"
        )
    journal = _Journal(journal_path(plan_path), str(plan["plan_id"]))
    backups = _Journal(backup_path(plan_path), str(plan["plan_id"]))
    report = ExecuteReport()
    entries = [e for e in plan["tasks"] if e["skip"] is None]

    user_id = await client.user_id()
    if user_id != plan.get("user_id"):
        raise ConfigError(
            f"{plan_path} was written with another Label Studio user's token (user "
            f"{plan.get('user_id')}, this token is user {user_id}): write a new plan"
        )
    # Refuse before touching anything if a task changed since the plan.
    tasks: dict[int, Task] = {}
    for entry in entries:
        task = await client.get_task(int(entry["task"]))
        tasks[task.id] = task
        if not _unchanged(task, entry, journal):
            report.refused.append(f"task {task.id}: its annotations changed since the plan")
        elif not plan["replace_human"]:
            # The plan is a file anyone can edit: a person's annotation is deleted only when
            # the plan was written to replace people's work.
            people = [
                a.id
                for a in task.annotations or ()
                if a.id in entry["delete"] and not is_ours(a, user_id)
            ]
            if people:
                report.refused.append(
                    f"task {task.id}: the plan deletes annotation(s) {people} made by a person "
                    "but was written without --replace-human-annotations"
                )
    if report.refused:
        for line in report.refused:
            print(f"refused: {line}", file=out)
        print("nothing was changed: write a new plan", file=out)
        return report

    done_deleted = journal.deleted()
    for entry in entries:
        task = tasks[int(entry["task"])]
        created = journal.created_for(task.id)
        if created is None:
            # Back up first: what is deleted below must exist somewhere before it goes.
            for annotation in task.annotations or ():
                if annotation.id in entry["delete"]:
                    backups.append({"task": task.id, "annotation": _annotation_json(annotation)})
            new = await client.create_annotation(task.id, payload[task.id])
            journal.append({"event": "created", "task": task.id, "annotation": new.id})
            report.created += 1
            log.info("task %s: created annotation %s", task.id, new.id)
        else:
            report.already_done += 1
        for annotation_id in entry["delete"]:
            if annotation_id in done_deleted:
                continue
            # A 404: deleted by an earlier run that stopped before its journal line.
            with contextlib.suppress(NotFoundError):
                await client.delete_annotation(int(annotation_id))
            journal.append({"event": "deleted", "task": task.id, "annotation": annotation_id})
            report.deleted += 1
            log.info("task %s: deleted annotation %s", task.id, annotation_id)
    print(
        f"executed: created {report.created}, deleted {report.deleted} "
        f"(backup: {backups.path}; journal: {journal.path})",
        file=out,
    )
    return report


def _unchanged(task: Task, entry: Mapping[str, Any], journal: _Journal) -> bool:
    """True if the task's annotations are the plan's, allowing for this plan's own steps."""
    planned = {int(i): t for i, t in entry["fingerprint"]}
    created = journal.created_for(task.id)
    now = {int(i): t for i, t in fingerprint(task.annotations or ())}
    # Once this plan created the new annotation, the old ones it lists may be gone (a crash
    # can fall between a delete and its journal line).
    may_be_gone: set[int] = set()
    if created is not None:
        now.pop(created, None)
        may_be_gone = {int(i) for i in entry["delete"]}
    expected = {i: t for i, t in planned.items() if not (i in may_be_gone and i not in now)}
    return now == expected


def _annotation_json(annotation: Annotation) -> dict[str, Any]:
    return {
        "id": annotation.id,
        "task": annotation.task,
        "completed_by": annotation.completed_by,
        "was_cancelled": annotation.was_cancelled,
        "ground_truth": annotation.ground_truth,
        "created_at": annotation.created_at.isoformat() if annotation.created_at else None,
        "updated_at": annotation.updated_at.isoformat() if annotation.updated_at else None,
        "result": [dict(r) for r in annotation.result],
    }
