"""Reading ``config.yaml``: find the file, expand ``${NAME}``, check every key, build the values.

The allowed keys and the defaults come from the dataclasses in :mod:`service.config.settings`;
what is written here is only the checks that the field types do not say.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import get_args

import yaml

from service.config.section import Section
from service.config.settings import (
    Activation,
    Config,
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
    image_host_problem,
    queue_url_problem,
    url_problem,
)
from service.constants import POSTGRES_SCHEMES
from service.errors import ConfigError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CONFIG_ENV_VAR = "LS_AUTOSEG_CONFIG"


def find_config(explicit: Path | None = None) -> Path:
    """The config file to use: the flag, then $LS_AUTOSEG_CONFIG, ./config.yaml, the bundled one."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return explicit
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(f"${CONFIG_ENV_VAR} names {path}, which does not exist")
        return path
    here = Path("config.yaml")
    if here.is_file():
        return here
    # The repository's own config.yaml (bundled demo model): service/config/ -> the repository.
    bundled = Path(__file__).resolve().parents[2] / "config.yaml"
    if bundled.is_file():
        return bundled
    raise ConfigError(
        "no config file: pass --config FILE, set $LS_AUTOSEG_CONFIG, "
        "or run from a folder holding config.yaml"
    )


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raises ConfigError with the offending key."""
    env = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(raw if raw is not None else {}, path, env)


def parse_config(raw: object, source: Path, environ: Mapping[str, str]) -> Config:
    keys = [f.name for f in fields(Config) if f.name != "source"]
    root: Section[Config] = Section(_expand_env(raw, environ), "config", source, Config, keys)
    base = source.resolve().parent
    model = _parse_model(root.section("model", ModelConfig), base)
    return root.build(
        {
            "source": source,
            "model": model,
            "prediction": _parse_prediction(root.section("prediction", PredictionConfig), model),
            "label_studio": _parse_label_studio(
                root.section("label_studio", LabelStudioConfig), base
            ),
            "projects": _parse_projects(root.get("projects"), source),
            "server": _parse_server(root.section("server", ServerConfig)),
            "state_dir": base / str(root.get("state_dir")),
            "reconcile": root.section("reconcile", ReconcileConfig).build(),
            "worker": _parse_worker(root.section("worker", WorkerConfig)),
            "queue": _parse_queue(root.section("queue", QueueConfig)),
        }
    )


def _parse_model(s: Section[ModelConfig], base: Path) -> ModelConfig:
    labels = tuple(s.str_list("labels"))
    if not labels:
        raise s.error("labels", "must name at least one label")
    if len(set(labels)) != len(labels):
        raise s.error("labels", "has duplicates")
    for label in labels:
        problem = label_name_problem(label)
        if problem is not None:
            raise s.error("labels", f"{label!r} cannot be used: {problem}")
    activation = s.choice("activation", get_args(Activation))
    background = s.opt_str("background")
    if background is not None:
        if activation != "softmax":
            raise s.error("background", "is only meaningful with activation: softmax")
        if background not in labels:
            raise s.error("background", f"{background!r} is not one of labels {list(labels)}")
    input_size = s.get("input_size")
    size: tuple[int, int] | None = None
    if input_size is not None:
        if (
            not isinstance(input_size, list | tuple)
            or len(input_size) != 2
            or not all(isinstance(v, int) and v > 0 for v in input_size)
        ):
            raise s.error("input_size", "must be [height, width] (positive integers) or null")
        size = (input_size[0], input_size[1])
    device = s.opt_str("device") or s.defaults["device"]
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise s.error("device", f"must be auto, cpu, cuda or cuda:N, not {device!r}")
    threads = s.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise s.error("threads", "must be a positive integer or null")
    return s.build(
        {
            "path": base / s.str_value("path"),
            "labels": labels,
            "activation": activation,
            "background": background,
            "input_size": size,
            "mean": s.triple("mean"),
            "std": s.triple("std", positive=True),
            "device": device,
            "threads": threads,
        },
        minimum={"size_divisor": 1, "batch_size": 1},
    )


def _parse_prediction(s: Section[PredictionConfig], model: ModelConfig) -> PredictionConfig:
    given = s.get("thresholds")  # the field's default when the section names none
    thresholds = (
        given
        if isinstance(given, Thresholds)
        else parse_thresholds(given, model.output_labels, s.where)
    )
    score = s.float_value("score")
    if not 0.0 <= score <= 1.0:
        raise s.error("score", "must be between 0 and 1")
    return s.build(
        {"thresholds": thresholds, "score": score},
        minimum={"min_pixels": 0, "max_pixels": 1},
    )


MAX_LABEL_BYTES = 255  # a file name's limit on common file systems: labels become folders


def label_name_problem(label: str) -> str | None:
    """Why a model label cannot be a folder name under ``--out-dir``, or None if it can.

    ``predict`` writes ``masks_binary/<label>/``: a label must be exactly one path component,
    or ``../x`` would write outside the output folder.
    """
    if not label.strip():
        return "a label must not be empty or only spaces (it names a folder)"
    if label in (".", ".."):
        return "'.' and '..' are not folder names"
    if "/" in label or "\\" in label:
        return "a label names one folder: '/' and '\\' are not allowed"
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        return "control characters (NUL, newline, tab...) are not allowed"
    if label != label.strip():
        return "leading or trailing spaces are not allowed (folder names would differ)"
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        return f"longer than {MAX_LABEL_BYTES} bytes, the limit for a folder name"
    return None


def parse_thresholds(raw: object, labels: tuple[str, ...], where: str) -> Thresholds:
    """``{default: 0.5, label: 0.6}`` (from YAML) -> Thresholds, checked against the labels."""
    if raw is None:
        return Thresholds()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.thresholds must be a mapping like {{default: 0.5, label: 0.6}}")
    default = Thresholds().default
    per_label: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"{where}.thresholds.{key} must be a number between 0 and 1")
        if key == "default":
            default = float(value)
        elif key in labels:
            per_label[str(key)] = float(value)
        else:
            raise ConfigError(
                f"{where}.thresholds names {key!r}, which is not a model label; "
                f"labels are {list(labels)}"
            )
    return Thresholds(default=default, per_label=per_label)


def parse_threshold_flag(text: str, labels: tuple[str, ...]) -> dict[str, float]:
    """The CLI form ``"label_a=0.50,label_b=0.55"`` (``default=`` allowed) -> mapping."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--thresholds item {item!r} is not LABEL=VALUE")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise ConfigError(
                f"--thresholds value for {name!r} is not a number: {value!r}"
            ) from exc
    return out


def _parse_label_studio(s: Section[LabelStudioConfig], base: Path) -> LabelStudioConfig:
    url = s.str_value("url").rstrip("/")
    problem = url_problem(url)
    if problem:
        raise s.error("url", problem)
    hosts = tuple(s.str_list("allowed_image_hosts"))
    for entry in hosts:
        problem = image_host_problem(entry)
        if problem:
            raise s.error("allowed_image_hosts", f"item {problem}")
    roots = {}
    for key in ("media_root", "local_files_root"):
        value = s.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise s.error(key, "must be a folder path")
        roots[key] = None if value is None else base / value
    settings = s.build({"url": url, "allowed_image_hosts": hosts, **roots}, float_minimum=0.0)
    for key in ("timeout_s", "download_timeout_s"):
        if getattr(settings, key) == 0:  # a deadline of nothing fails every request
            raise s.error(key, "must be > 0")
    return settings


def _parse_projects(raw: object, source: Path) -> tuple[ProjectConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"{source}: projects must be a list of {{id: N, ...}}")
    projects = []
    for index, item in enumerate(raw):
        s = Section(item, f"projects[{index}]", source, ProjectConfig)
        label_map = s.get("label_map") or {}
        if not isinstance(label_map, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in label_map.items()
        ):
            raise s.error("label_map", "must map model labels to Label Studio label values")
        projects.append(s.build({"label_map": dict(label_map)}, minimum={"id": 1}))
    ids = [p.id for p in projects]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: projects lists the same id twice")
    return tuple(projects)


def _parse_server(s: Section[ServerConfig]) -> ServerConfig:
    server = s.build(
        minimum={"port": 0, "max_body_bytes": 1, "max_connections": 1}, float_minimum=0.0
    )
    if server.request_timeout_s == 0:  # no deadline at all is what the setting is against
        raise s.error("request_timeout_s", "must be > 0")
    return server


def _parse_worker(s: Section[WorkerConfig]) -> WorkerConfig:
    # Every time is a delay or a limit: a negative or infinite one is a typo, not a choice.
    worker = s.build(minimum={"concurrency": 1, "max_attempts": 1}, float_minimum=0.0)
    if worker.max_inflight_megapixels == 0:  # would hold no image at all
        raise s.error("max_inflight_megapixels", "must be > 0")
    return worker


def _parse_queue(s: Section[QueueConfig]) -> QueueConfig:
    url = s.secret("url")
    if isinstance(url, str):
        url = url.strip()
        if url in ("", "sqlite"):
            url = None
        elif not url.startswith(POSTGRES_SCHEMES):
            # Not echoed: it may hold a password.
            raise s.error("url", "must be sqlite or a postgresql://user@host:port/db URL")
        elif problem := queue_url_problem(url):
            raise s.error("url", problem)
    queue = s.build({"url": url}, float_minimum=0.0)
    if queue.retention_days == 0:  # would delete each job as it ends
        raise s.error("retention_days", "must be > 0")
    if queue.lease_s == 0:
        raise s.error("lease_s", "must be > 0")
    return queue


def _expand_env(value: object, environ: Mapping[str, str]) -> object:
    """Replace ``${NAME}``; a string that is only a missing ``${NAME}`` becomes MissingEnv."""
    if isinstance(value, dict):
        return {k: _expand_env(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, environ) for v in value]
    if not isinstance(value, str):
        return value
    whole = _ENV_PATTERN.fullmatch(value)
    if whole and whole.group(1) not in environ:
        return MissingEnv(whole.group(1))

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"environment variable {name} (used as ${{{name}}}) is not set")
        return environ[name]

    return _ENV_PATTERN.sub(substitute, value)
