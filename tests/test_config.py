from __future__ import annotations

from pathlib import Path

import pytest

from service.config import (
    MissingEnv,
    find_config,
    load_config,
    parse_threshold_flag,
    parse_thresholds,
)
from service.errors import ConfigError

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
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + extra), environ={})


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
