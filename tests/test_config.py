from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Any

import pytest

from service.config import (
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
    find_config,
    load_config,
    parse_threshold_flag,
    parse_thresholds,
    write_config,
)
from service.config.section import field_defaults
from service.errors import ConfigError
from service.queue import open_queue

MINIMAL = "model:\n  path: m.pt\n  labels: [a, b]\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_gets_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), environ={})
    assert config.model.path == tmp_path.resolve() / "m.pt"
    assert config.model.labels == ("a", "b")
    assert config.model.activation == "sigmoid"
    assert config.prediction.thresholds.for_label("a") == 0.5
    assert config.state_dir == tmp_path.resolve() / "state"
    assert config.label_studio.token is None


def test_env_variables_are_substituted(tmp_path: Path) -> None:
    text = MINIMAL + "label_studio:\n  url: http://${HOST_X}:8080\n  token: ${TOK}\n"
    config = load_config(write(tmp_path, text), environ={"HOST_X": "ls", "TOK": "secret"})
    assert config.label_studio.url == "http://ls:8080"
    assert config.require(config.label_studio.token, "label_studio.token") == "secret"


def test_missing_env_is_an_error_only_where_the_value_is_needed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "label_studio:\n  token: ${NOPE}\n"), {})
    assert config.label_studio.token == MissingEnv("NOPE")
    with pytest.raises(ConfigError, match="NOPE is not set"):
        config.require(config.label_studio.token, "label_studio.token")


def test_missing_env_inside_a_longer_string_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NOPE"):
        load_config(write(tmp_path, MINIMAL + "label_studio:\n  url: http://${NOPE}/\n"), {})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour: red\n", r"unknown key\(s\) \['colour'\] in config"),
        ("prediction:\n  treshold: 1\n", r"unknown key\(s\) \['treshold'\] in prediction"),
        ("prediction:\n  thresholds: {c: 0.3}\n", "'c', which is not a model label"),
        ("prediction:\n  thresholds: {a: 3}\n", "between 0 and 1"),
        ("prediction:\n  min_pixels: -1\n", "min_pixels must be >= 0"),
        ("projects: [{id: 1}, {id: 1}]\n", "same id twice"),
        ("projects: [{id: x}]\n", "must be an integer"),
        ("label_studio: {url: localhost:8080}\n", "must start with http"),
        ("label_studio: {bulk_predictions: always}\n", "bulk_predictions must be one of"),
        ("label_studio: {bulk_predictions: 2}\n", "bulk_predictions must be one of"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + extra), environ={})


@pytest.mark.parametrize(
    ("written", "mode"), [("on", "on"), ("off", "off"), ("'off'", "off"), ("auto", "auto")]
)
def test_bulk_predictions_reads_bare_yaml_on_and_off(
    tmp_path: Path, written: str, mode: str
) -> None:
    """YAML 1.1 reads a bare on/off as a boolean: the setting takes it as meant."""
    text = MINIMAL + f"label_studio: {{bulk_predictions: {written}}}\n"
    assert load_config(write(tmp_path, text), environ={}).label_studio.bulk_predictions == mode


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("  labels: []\n", "at least one label"),
        ("  labels: [a, a]\n", "duplicates"),
        ("  labels: [a]\n  input_size: [10]\n", r"\[height, width\]"),
        ("  labels: [a]\n  device: gpu\n", "cuda:N"),
        ("  labels: [a]\n  background: a\n", "only meaningful with activation: softmax"),
        ("  labels: [a]\n  activation: softmax\n  background: z\n", "not one of labels"),
        ("  labels: [a]\n  std: [1, 0, 1]\n", "positive"),
        ("  labels: [a]\n  batch_size: 0\n", ">= 1"),
    ],
)
def test_bad_model_settings(tmp_path: Path, model: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "model:\n  path: m.pt\n" + model), environ={})


@pytest.mark.parametrize(
    ("label", "reason"),
    [
        ("../../x", "a label names one folder"),
        ("a/b", "a label names one folder"),
        ("'..\\x'", "a label names one folder"),
        ("..", "'.' and '..' are not folder names"),
        (".", "'.' and '..' are not folder names"),
        ("'   '", "must not be empty"),
        ('"a\\tb"', "control characters"),
        ('"a\\0b"', "control characters"),
        ("' a'", "leading or trailing spaces"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_a_label_that_is_not_one_safe_folder_name_is_refused(
    tmp_path: Path, label: str, reason: str
) -> None:
    text = f"model:\n  path: m.pt\n  labels: [ok, {label}]\n"
    with pytest.raises(ConfigError, match=r"model\.labels .* cannot be used: ") as caught:
        load_config(write(tmp_path, text), environ={})
    assert reason in str(caught.value)


def test_labels_with_spaces_dots_and_unicode_are_folder_names(tmp_path: Path) -> None:
    labels = ("façade ü", "a.b", "..x", "label_a")
    text = "model:\n  path: m.pt\n  labels: [" + ", ".join(f"'{v}'" for v in labels) + "]\n"
    assert load_config(write(tmp_path, text), environ={}).model.labels == labels


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  labels: [a]\n", r"model\.path is required"),
        (MINIMAL + "projects: [{}]\n", r"projects\[0\]\.id is required"),
        (MINIMAL + "projects: {id: 1}\n", "projects must be a list"),
        (MINIMAL + "server: {port: -1}\n", r"server\.port must be >= 0"),
        (MINIMAL + "server: {host: ''}\n", r"server\.host must be a non-empty string"),
        (MINIMAL + "server: {webhook_secret: 5}\n", "webhook_secret must be a string"),
        (MINIMAL + "label_studio: {token_type: oauth}\n", r"\['auto', 'pat', 'legacy'\]"),
        (MINIMAL + "label_studio: {timeout_s: fast}\n", "timeout_s must be a number"),
        (MINIMAL + "reconcile: {on_startup: 1}\n", "on_startup must be true or false"),
        (MINIMAL + "prediction: {score: 1.5}\n", "score must be between 0 and 1"),
        (MINIMAL + "prediction: {max_pixels: 0}\n", r"max_pixels must be >= 1"),
        (MINIMAL + "server: []\n", "server must be a mapping"),
        (MINIMAL + "server: {request_timeout_s: 0}\n", r"server\.request_timeout_s must be > 0"),
        (MINIMAL + "server: {request_timeout_s: .inf}\n", "request_timeout_s must be a finite"),
        (MINIMAL + "server: {max_connections: 0}\n", r"server\.max_connections must be >= 1"),
    ],
)
def test_each_section_checks_its_fields_by_their_types(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ={})


def test_a_null_device_is_the_default_device(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "  device: null\n"), environ={})
    assert config.model.device == ModelConfig(path=Path(), labels=("a",)).device


def test_yaml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"), environ={})


def test_thresholds_flag_and_mapping() -> None:
    flag = parse_threshold_flag("a=0.6, default=0.3,", ("a", "b"))
    thresholds = parse_thresholds(flag, ("a", "b"), "--thresholds")
    assert thresholds.for_label("a") == 0.6
    assert thresholds.for_label("b") == 0.3
    with pytest.raises(ConfigError, match="not LABEL=VALUE"):
        parse_threshold_flag("a:0.5", ("a",))
    with pytest.raises(ConfigError, match="not a number"):
        parse_threshold_flag("a=high", ("a",))


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LS_AUTOSEG_CONFIG", raising=False)
    bundled = find_config(None)
    assert bundled.name == "config.yaml" and bundled.parent != tmp_path
    local = write(tmp_path, MINIMAL)
    assert find_config(None).resolve() == local.resolve()
    other = tmp_path / "other.yaml"
    other.write_text(MINIMAL)
    monkeypatch.setenv("LS_AUTOSEG_CONFIG", str(other))
    assert find_config(None) == other
    with pytest.raises(ConfigError, match="not found"):
        find_config(tmp_path / "missing.yaml")


def test_shipped_config_parses(repo_config) -> None:  # type: ignore[no-untyped-def]
    assert repo_config.model.path.name == "demo_unet.pt"
    assert repo_config.projects[0].id == 1


@pytest.mark.parametrize(
    ("worker", "message"),
    [
        ("concurrency: 0", r"worker\.concurrency must be >= 1"),
        ("max_attempts: 0", r"worker\.max_attempts must be >= 1"),
        ("max_attempts: 2.5", "must be an integer"),
        ("settle_s: -1", r"worker\.settle_s must be a finite number >= 0"),
        ("retry_max_s: .inf", r"worker\.retry_max_s must be a finite number >= 0"),
        ("idle_poll_s: .nan", "finite number"),
        ("shutdown_grace_s: soon", "must be a number"),
        ("max_inflight_megapixels: 0", r"worker\.max_inflight_megapixels must be > 0"),
        ("max_inflight_megapixels: -5", "finite number >= 0"),
        ("retries: 3", r"unknown key\(s\) \['retries'\] in worker"),
    ],
)
def test_bad_worker_settings(tmp_path: Path, worker: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + f"worker:\n  {worker}\n"), environ={})


def every_field_set(tmp_path: Path) -> dict[str, Any]:
    """Config's sections with a value other than the default in every field."""
    return {
        "model": ModelConfig(
            path=tmp_path / "models" / "m.pt",
            labels=("bg", "a", "b"),
            activation="softmax",
            background="bg",
            input_size=(64, 48),
            size_divisor=16,
            mean=(0.1, 0.2, 0.3),
            std=(0.4, 0.5, 0.6),
            device="cuda:1",
            batch_size=3,
            threads=2,
        ),
        "prediction": PredictionConfig(
            model_version="round-trip-v2",
            score=0.6,
            thresholds=Thresholds(default=0.4, per_label={"a": 0.7}),
            min_pixels=3,
            prob_upsample=False,
            max_pixels=1234,
        ),
        "label_studio": LabelStudioConfig(
            url="https://ls.example:8443",
            token=MissingEnv("ROUND_TRIP_TOKEN"),
            token_type="pat",
            timeout_s=12.5,
            download_timeout_s=7.5,
            allowed_image_hosts=("images.internal", "10.0.0.0/8"),
            media_root=tmp_path / "ls-data" / "media",
            local_files_root=tmp_path / "ls-files",
            bulk_predictions="off",
        ),
        "projects": (
            ProjectConfig(id=7, from_name="tag", to_name="image", label_map={"a": "A"}),
            ProjectConfig(id=9),
        ),
        "server": ServerConfig(
            host="0.0.0.0",
            port=9191,
            webhook_secret="plain-secret",
            allow_unauthenticated=True,
            max_body_bytes=1000,
            request_timeout_s=2.5,
            max_connections=50,
        ),
        "state_dir": tmp_path / "elsewhere" / "state",
        "reconcile": ReconcileConfig(on_startup=False, interval_s=60.0),
        "worker": WorkerConfig(
            concurrency=2,
            settle_s=0.5,
            retry_base_s=1.5,
            retry_max_s=30.0,
            max_attempts=3,
            not_found_grace_s=10.0,
            outage_probe_s=2.5,
            batch_wait_s=0.2,
            idle_poll_s=0.25,
            shutdown_grace_s=5.0,
            max_inflight_megapixels=64.5,
        ),
        "queue": QueueConfig(
            url="postgresql://autoseg@db.example:5432/jobs", retention_days=7.5, lease_s=20.0
        ),
    }


def test_every_field_set_differs_from_every_default(tmp_path: Path) -> None:
    """Keeps the round trip below honest when a field is added."""
    sections = every_field_set(tmp_path)
    assert set(sections) == {f.name for f in dataclasses.fields(Config)} - {"source"}
    for name, default in field_defaults(Config).items():
        assert sections[name] != default, name
    for section in (*sections["projects"][:1], *sections.values()):
        if dataclasses.is_dataclass(section):
            for key, default in field_defaults(type(section)).items():
                assert getattr(section, key) != default, f"{type(section).__name__}.{key}"


def test_written_config_reads_back_to_equal_values(tmp_path: Path) -> None:
    sections = every_field_set(tmp_path)
    path = write_config(tmp_path / "written" / "config.yaml", **sections)
    loaded = load_config(path, environ={})
    assert loaded == Config(source=path, **sections)
    text = path.read_text(encoding="utf-8")
    assert "${ROUND_TRIP_TOKEN}" in text and "plain-secret" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a plain secret
    token = load_config(path, environ={"ROUND_TRIP_TOKEN": "t0k"}).label_studio.token
    assert token == "t0k"


def test_written_paths_stay_relative_to_the_file_and_left_out_sections_take_defaults(
    tmp_path: Path,
) -> None:
    model = ModelConfig(path=Path("m.pt"), labels=("a",))
    path = write_config(tmp_path / "config.yaml", model, state_dir=Path("run/state"))
    text = path.read_text(encoding="utf-8")
    assert "prediction" not in text and "worker" not in text
    loaded = load_config(path, environ={})
    base = tmp_path.resolve()
    expected_model = dataclasses.replace(model, path=base / "m.pt")
    assert loaded == Config(source=path, model=expected_model, state_dir=base / "run" / "state")


def shipped_section(name: str) -> list[str]:
    """config.yaml's commented ``name:`` section, uncommented: its header and key lines."""
    text = (Path(__file__).resolve().parent.parent / "config.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index(f"# {name}:")
    block = [f"{name}:"]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[1:])
    return block


def test_shipped_config_documents_the_worker_section_with_its_defaults(tmp_path: Path) -> None:
    """config.yaml's commented ``worker:`` section, uncommented, is WorkerConfig's defaults."""
    block = shipped_section("worker")
    config = load_config(write(tmp_path, MINIMAL + "\n".join(block) + "\n"), environ={})
    assert len(block) - 1 == len(dataclasses.fields(WorkerConfig))
    assert config.worker == WorkerConfig()


def test_shipped_config_documents_the_queue_section_with_its_defaults(tmp_path: Path) -> None:
    block = shipped_section("queue")
    config = load_config(write(tmp_path, MINIMAL + "\n".join(block) + "\n"), environ={})
    assert len(block) - 1 == len(dataclasses.fields(QueueConfig))
    assert config.queue == QueueConfig() and config.queue.retention_days == 30


@pytest.mark.parametrize(
    ("queue", "message"),
    [
        ("retention_days: 0", r"queue\.retention_days must be > 0"),
        ("retention_days: -1", r"queue\.retention_days must be a finite number >= 0"),
        ("retention_days: .inf", "finite number"),
        ("retention_days: soon", "must be a number"),
        ("retention: 3", r"unknown key\(s\) \['retention'\] in queue"),
        ("lease_s: 0", r"queue\.lease_s must be > 0"),
        ("lease_s: -5", r"queue\.lease_s must be a finite number >= 0"),
        ("url: mysql://u:hunter2@db/jobs", r"queue\.url must be sqlite or a postgresql://"),
        ("url: /var/lib/jobs.sqlite3", r"queue\.url must be sqlite or a postgresql://"),
        ("url: ${NO_SUCH_QUEUE_URL}", r"NO_SUCH_QUEUE_URL"),
        ("url: 'postgresql://u:hunter2%zz@db/jobs'", r"queue\.url is not a PostgreSQL URL"),
        ("url: 'postgresql://u:hunter2@db/jobs?foo=1'", r"queue\.url is not a PostgreSQL URL"),
    ],
)
def test_bad_queue_settings(tmp_path: Path, queue: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config = load_config(write(tmp_path, MINIMAL + f"queue:\n  {queue}\n"), environ={})
        open_queue(config)  # a ${NAME} left unset is refused where the URL is needed
    assert "hunter2" not in str(caught.value)  # a password in a refused URL is not echoed


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite", None),
        ("postgresql://u@h:5/d", "postgresql://u@h:5/d"),
        ("postgres://h/d", "postgres://h/d"),
    ],
)
def test_queue_url_names_the_backend(tmp_path: Path, url: str, expected: str | None) -> None:
    config = load_config(write(tmp_path, MINIMAL + f"queue: {{url: '{url}'}}\n"), environ={})
    assert config.queue.url == expected
    assert "u@h" not in repr(config.queue)  # never in a log line that shows the config


def test_queue_url_comes_from_the_environment(tmp_path: Path) -> None:
    text = MINIMAL + "queue: {url: '${LS_AUTOSEG_QUEUE_URL}'}\n"
    url = "postgresql://autoseg:s3cret@db:5432/jobs"
    config = load_config(write(tmp_path, text), environ={"LS_AUTOSEG_QUEUE_URL": url})
    assert config.queue.url == url


def test_a_whole_number_of_retention_days_reads_as_days(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "queue: {retention_days: 90}\n"), environ={})
    assert config.queue.retention_days == 90.0


@pytest.mark.parametrize("key", ["timeout_s", "download_timeout_s"])
@pytest.mark.parametrize("value", [0, -1, ".inf"])
def test_label_studio_timeouts_must_be_positive_and_finite(
    tmp_path: Path, key: str, value: object
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"model: {{path: m.pt, labels: [a]}}\nlabel_studio: {{{key}: {value}}}\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=rf"label_studio\.{key} must be"):
        load_config(path, environ={})
