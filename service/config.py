"""Settings: ``config.yaml`` parsed once, at the edge, into frozen dataclasses.

Rules the loader enforces, so that a typo is a start-up error and not a silent default:

- every key is known; an unknown key names the section and lists the allowed ones;
- ``${NAME}`` in a string is replaced by that environment variable. A missing variable is
  an error only where the value is used: ``predict`` runs without ``LABEL_STUDIO_TOKEN``,
  ``serve`` refuses to start without it (see :meth:`Config.require`);
- every path is relative to the folder of the config file, not to the working directory.

Where no ``--config`` is given, :func:`find_config` looks in ``$LS_AUTOSEG_CONFIG``,
``./config.yaml`` and finally the repository's own ``config.yaml`` (bundled demo model).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from service.constants import HTTP_SCHEMES, TokenType
from service.errors import ConfigError

Activation = Literal["sigmoid", "softmax"]

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CONFIG_ENV_VAR = "LS_AUTOSEG_CONFIG"


@dataclass(frozen=True)
class MissingEnv:
    """Stands in for a value whose ``${NAME}`` was not set in the environment."""

    name: str


@dataclass(frozen=True)
class Thresholds:
    """Per-label probability thresholds with a default for labels not named."""

    default: float = 0.5
    per_label: Mapping[str, float] = field(default_factory=dict)

    def for_label(self, label: str) -> float:
        return self.per_label.get(label, self.default)


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    labels: tuple[str, ...]
    activation: Activation = "sigmoid"
    background: str | None = None
    input_size: tuple[int, int] | None = None
    size_divisor: int = 32
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    device: str = "auto"
    batch_size: int = 8
    threads: int | None = None

    @property
    def output_labels(self) -> tuple[str, ...]:
        """Labels that produce masks: all channels but the background one."""
        return tuple(label for label in self.labels if label != self.background)


@dataclass(frozen=True)
class PredictionConfig:
    model_version: str = "auto-segmentation-v1"
    score: float = 0.8
    thresholds: Thresholds = field(default_factory=Thresholds)
    min_pixels: int = 20
    prob_upsample: bool = True
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class LabelStudioConfig:
    url: str = "http://localhost:8080"
    token: str | MissingEnv | None = None
    token_type: TokenType = "auto"
    timeout_s: float = 30.0


@dataclass(frozen=True)
class ProjectConfig:
    id: int
    from_name: str | None = None
    to_name: str | None = None
    label_map: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    webhook_secret: str | MissingEnv | None = None
    allow_unauthenticated: bool = False
    max_body_bytes: int = 50_000_000


@dataclass(frozen=True)
class ReconcileConfig:
    on_startup: bool = True
    interval_s: float = 300.0


@dataclass(frozen=True)
class WorkerConfig:
    """The operator's choices for the worker: how hard to push Label Studio, how to retry."""

    concurrency: int = 4  # Label Studio requests (and downloads) at once
    # Label Studio sends TASKS_CREATED from inside the import request; a task read at once
    # was seen (once, on a busy machine) without the annotation imported with it. A job is
    # therefore first read this long after it was queued.
    settle_s: float = 2.0
    retry_base_s: float = 2.0  # first retry delay of a transient failure, doubled each time
    retry_max_s: float = 120.0
    max_attempts: int = 8  # a job fails after this many attempts (crashes count)
    not_found_grace_s: float = 30.0  # a task 404 this soon after queueing is retried
    outage_probe_s: float = 5.0  # while Label Studio is unusable, ask this often
    batch_wait_s: float = 0.05  # how long a model batch waits to fill
    idle_poll_s: float = 1.0
    shutdown_grace_s: float = 30.0  # on SIGTERM, let jobs in flight finish this long


@dataclass(frozen=True)
class Config:
    source: Path
    model: ModelConfig
    prediction: PredictionConfig
    label_studio: LabelStudioConfig
    projects: tuple[ProjectConfig, ...]
    server: ServerConfig
    state_dir: Path
    reconcile: ReconcileConfig
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    def require(self, value: str | MissingEnv | None, what: str) -> str:
        """Return a setting that a command cannot do without, or explain what to set."""
        if isinstance(value, MissingEnv):
            raise ConfigError(
                f"{what} comes from ${{{value.name}}} in {self.source}, "
                f"but the environment variable {value.name} is not set"
            )
        if not value:
            raise ConfigError(f"{what} is not set in {self.source}")
        return value


# --------------------------------------------------------------------------- loading


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
    bundled = Path(__file__).resolve().parent.parent / "config.yaml"
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
    root = _Section(_expand_env(raw, environ), "config", source)
    base = source.resolve().parent
    root.allow(
        "label_studio",
        "model",
        "prediction",
        "projects",
        "server",
        "state_dir",
        "reconcile",
        "worker",
    )
    model = _parse_model(root.section("model"), base)
    return Config(
        source=source,
        model=model,
        prediction=_parse_prediction(root.section("prediction"), model),
        label_studio=_parse_label_studio(root.section("label_studio")),
        projects=_parse_projects(root.get("projects", []), source),
        server=_parse_server(root.section("server")),
        state_dir=base / str(root.get("state_dir", "./state")),
        reconcile=_parse_reconcile(root.section("reconcile")),
        worker=_parse_worker(root.section("worker")),
    )


def _parse_model(s: _Section, base: Path) -> ModelConfig:
    s.allow(
        "path",
        "labels",
        "activation",
        "background",
        "input_size",
        "size_divisor",
        "mean",
        "std",
        "device",
        "batch_size",
        "threads",
    )
    labels = tuple(s.str_list("labels", required=True))
    if not labels:
        raise s.error("labels", "must name at least one label")
    if len(set(labels)) != len(labels):
        raise s.error("labels", "has duplicates")
    activation = s.choice("activation", ("sigmoid", "softmax"), "sigmoid")
    background = s.opt_str("background")
    if background is not None:
        if activation != "softmax":
            raise s.error("background", "is only meaningful with activation: softmax")
        if background not in labels:
            raise s.error("background", f"{background!r} is not one of labels {list(labels)}")
    input_size = s.get("input_size", None)
    size: tuple[int, int] | None = None
    if input_size is not None:
        if (
            not isinstance(input_size, list)
            or len(input_size) != 2
            or not all(isinstance(v, int) and v > 0 for v in input_size)
        ):
            raise s.error("input_size", "must be [height, width] (positive integers) or null")
        size = (input_size[0], input_size[1])
    device = s.opt_str("device") or "auto"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise s.error("device", f"must be auto, cpu, cuda or cuda:N, not {device!r}")
    threads = s.get("threads", None)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise s.error("threads", "must be a positive integer or null")
    return ModelConfig(
        path=base / s.str_value("path", required=True),
        labels=labels,
        activation=activation,  # type: ignore[arg-type]
        background=background,
        input_size=size,
        size_divisor=s.int_value("size_divisor", 32, minimum=1),
        mean=s.triple("mean", (0.485, 0.456, 0.406)),
        std=s.triple("std", (0.229, 0.224, 0.225), positive=True),
        device=device,
        batch_size=s.int_value("batch_size", 8, minimum=1),
        threads=threads,
    )


def _parse_prediction(s: _Section, model: ModelConfig) -> PredictionConfig:
    s.allow("model_version", "score", "thresholds", "min_pixels", "prob_upsample", "max_pixels")
    thresholds = parse_thresholds(s.get("thresholds", {}), model.output_labels, s.where)
    score = s.float_value("score", 0.8)
    if not 0.0 <= score <= 1.0:
        raise s.error("score", "must be between 0 and 1")
    return PredictionConfig(
        model_version=s.str_value("model_version", default="auto-segmentation-v1"),
        score=score,
        thresholds=thresholds,
        min_pixels=s.int_value("min_pixels", 20, minimum=0),
        prob_upsample=s.bool_value("prob_upsample", True),
        max_pixels=s.int_value("max_pixels", 100_000_000, minimum=1),
    )


def parse_thresholds(raw: object, labels: tuple[str, ...], where: str) -> Thresholds:
    """``{default: 0.5, label: 0.6}`` (from YAML) -> Thresholds, checked against the labels."""
    if raw is None:
        return Thresholds()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}.thresholds must be a mapping like {{default: 0.5, label: 0.6}}")
    default = 0.5
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


def _parse_label_studio(s: _Section) -> LabelStudioConfig:
    s.allow("url", "token", "token_type", "timeout_s")
    url = s.str_value("url", default="http://localhost:8080").rstrip("/")
    if not url.lower().startswith(HTTP_SCHEMES):
        raise s.error("url", f"must start with http:// or https://, got {url!r}")
    return LabelStudioConfig(
        url=url,
        token=s.secret("token"),
        token_type=s.choice("token_type", ("auto", "pat", "legacy"), "auto"),  # type: ignore[arg-type]
        timeout_s=s.float_value("timeout_s", 30.0),
    )


def _parse_projects(raw: object, source: Path) -> tuple[ProjectConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: projects must be a list of {{id: N, ...}}")
    projects = []
    for index, item in enumerate(raw):
        s = _Section(item, f"projects[{index}]", source)
        s.allow("id", "from_name", "to_name", "label_map")
        label_map = s.get("label_map", {}) or {}
        if not isinstance(label_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in label_map.items()
        ):
            raise s.error("label_map", "must map model labels to Label Studio label values")
        projects.append(
            ProjectConfig(
                id=s.int_value("id", None, minimum=1),
                from_name=s.opt_str("from_name"),
                to_name=s.opt_str("to_name"),
                label_map=dict(label_map),
            )
        )
    ids = [p.id for p in projects]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: projects lists the same id twice")
    return tuple(projects)


def _parse_server(s: _Section) -> ServerConfig:
    s.allow("host", "port", "webhook_secret", "allow_unauthenticated", "max_body_bytes")
    return ServerConfig(
        host=s.str_value("host", default="127.0.0.1"),
        port=s.int_value("port", 9090, minimum=0),
        webhook_secret=s.secret("webhook_secret"),
        allow_unauthenticated=s.bool_value("allow_unauthenticated", False),
        max_body_bytes=s.int_value("max_body_bytes", 50_000_000, minimum=1),
    )


def _parse_reconcile(s: _Section) -> ReconcileConfig:
    s.allow("on_startup", "interval_s")
    return ReconcileConfig(
        on_startup=s.bool_value("on_startup", True),
        interval_s=s.float_value("interval_s", 300.0),
    )


def _parse_worker(s: _Section) -> WorkerConfig:
    defaults = WorkerConfig()
    s.allow(*(f.name for f in fields(WorkerConfig)))
    return WorkerConfig(
        concurrency=s.int_value("concurrency", defaults.concurrency, minimum=1),
        settle_s=s.float_value("settle_s", defaults.settle_s),
        retry_base_s=s.float_value("retry_base_s", defaults.retry_base_s),
        retry_max_s=s.float_value("retry_max_s", defaults.retry_max_s),
        max_attempts=s.int_value("max_attempts", defaults.max_attempts, minimum=1),
        not_found_grace_s=s.float_value("not_found_grace_s", defaults.not_found_grace_s),
        outage_probe_s=s.float_value("outage_probe_s", defaults.outage_probe_s),
        batch_wait_s=s.float_value("batch_wait_s", defaults.batch_wait_s),
        idle_poll_s=s.float_value("idle_poll_s", defaults.idle_poll_s),
        shutdown_grace_s=s.float_value("shutdown_grace_s", defaults.shutdown_grace_s),
    )


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


class _Section:
    """Typed access to one mapping of the YAML document, with errors that name the key."""

    def __init__(self, raw: object, where: str, source: Path) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {where} must be a mapping")
        self.raw: dict[str, Any] = raw
        self.where = where
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where}.{key} {message}")

    def allow(self, *keys: str) -> None:
        unknown = sorted(set(map(str, self.raw)) - set(keys))
        if unknown:
            raise ConfigError(
                f"{self.source}: unknown key(s) {unknown} in {self.where}; allowed: {sorted(keys)}"
            )

    def section(self, key: str) -> _Section:
        return _Section(self.raw.get(key), key, self.source)

    def get(self, key: str, default: object) -> Any:
        value = self.raw.get(key, default)
        if isinstance(value, MissingEnv):
            raise self.error(key, f"uses ${{{value.name}}}, which is not set")
        return value

    def secret(self, key: str) -> str | MissingEnv | None:
        value = self.raw.get(key)
        if value is None or isinstance(value, MissingEnv):
            return value
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        return value

    def str_value(self, key: str, default: str | None = None, required: bool = False) -> str:
        value = self.get(key, default)
        if value is None and required:
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value:
            raise self.error(key, "must be a non-empty string")
        return value

    def opt_str(self, key: str) -> str | None:
        value = self.get(key, None)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.error(key, "must be a non-empty string or null")
        return value

    def str_list(self, key: str, required: bool = False) -> list[str]:
        value = self.get(key, None)
        if value is None and required:
            raise self.error(key, "is required")
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of strings")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {list(choices)}, not {value!r}")
        return str(value)

    def int_value(self, key: str, default: int | None, minimum: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}")
        return value

    def float_value(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {value!r}")
        return float(value)

    def bool_value(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def triple(
        self, key: str, default: tuple[float, float, float], positive: bool = False
    ) -> tuple[float, float, float]:
        value = self.get(key, list(default))
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise self.error(key, "must be a list of three numbers (R, G, B)")
        if positive and not all(v > 0 for v in value):
            raise self.error(key, "must be positive")
        return (float(value[0]), float(value[1]), float(value[2]))
