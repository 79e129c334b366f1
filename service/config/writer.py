"""Writing a config file from typed values: the one writer that quickstart and the tests use.

Every field of every section given is written, so nothing is dropped on the way; a section
left out is left out of the file and so takes its defaults. :func:`load_config` reads the
file back to equal values (paths relative to the file's folder, as always).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from service.config.settings import (
    LabelStudioConfig,
    MissingEnv,
    ModelConfig,
    PredictionConfig,
    ProjectConfig,
    QueueConfig,
    ReconcileConfig,
    ServerConfig,
    Thresholds,
    WorkerConfig,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_HEADER = "# ls-autoseg settings, written by ls-autoseg; its config.yaml explains each key\n"


def write_config(
    path: Path,
    model: ModelConfig,
    *,
    prediction: PredictionConfig | None = None,
    label_studio: LabelStudioConfig | None = None,
    projects: Sequence[ProjectConfig] | None = None,
    server: ServerConfig | None = None,
    reconcile: ReconcileConfig | None = None,
    worker: WorkerConfig | None = None,
    queue: QueueConfig | None = None,
    state_dir: Path | None = None,
) -> Path:
    """Write these sections to ``path`` (its folder is created) and return ``path``.

    A secret given as :class:`MissingEnv` is written as ``${NAME}``, a plain one as it is
    (the file is then readable by its owner only). Paths are written as given: absolute,
    or relative to ``path``'s folder.
    """
    document: dict[str, Any] = {}
    if label_studio is not None:
        document["label_studio"] = section_document(label_studio)
    document["model"] = section_document(model)
    if prediction is not None:
        document["prediction"] = section_document(prediction)
    if projects is not None:
        document["projects"] = [section_document(project) for project in projects]
    if server is not None:
        document["server"] = section_document(server)
    if state_dir is not None:
        document["state_dir"] = str(state_dir)
    if reconcile is not None:
        document["reconcile"] = section_document(reconcile)
    if worker is not None:
        document["worker"] = section_document(worker)
    if queue is not None:
        document["queue"] = section_document(queue)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    if _has_plain_secret(label_studio, server):
        path.chmod(0o600)
    return path


def _sequence(dumper: yaml.representer.BaseRepresenter, data: Any) -> yaml.Node:
    # ``labels: [a, b]`` as people write it; a list of mappings (projects) in block style.
    flow = not any(isinstance(item, list | dict) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists of plain values."""

    yaml_representers: ClassVar = {**yaml.SafeDumper.yaml_representers, list: _sequence}


def section_document(section: DataclassInstance) -> dict[str, Any]:
    """One section as plain data: every field, under its own name."""
    return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}


def _plain(value: object) -> object:
    """A setting as the YAML the loader reads back to the same value."""
    if isinstance(value, MissingEnv):
        return "${" + value.name + "}"
    if isinstance(value, Thresholds):
        return {"default": value.default, **value.per_label}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


def _has_plain_secret(label_studio: LabelStudioConfig | None, server: ServerConfig | None) -> bool:
    secrets = (
        label_studio.token if label_studio else None,
        server.webhook_secret if server else None,
    )
    return any(isinstance(secret, str) for secret in secrets)
