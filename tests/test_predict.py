"""``ls-autoseg predict`` end to end on a temporary folder, through the CLI entry point."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.config import ModelConfig, PredictionConfig, write_config


def write_predict_config(path: Path, model: ModelConfig) -> Path:
    return write_config(
        path,
        dataclasses.replace(model, batch_size=2),
        prediction=PredictionConfig(min_pixels=0, prob_upsample=False),
    )


def read_png(path: Path) -> np.ndarray:
    data = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert data is not None, path
    return data


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    a = np.zeros((30, 40, 3), dtype=np.uint8)
    a[5:15, 5:25] = (255, 0, 0)
    a[10:25, 20:35] = (0, 255, 0)
    a[10:15, 20:25] = (255, 255, 0)  # yellow: both red and green
    Image.fromarray(a).save(folder / "a.png")
    b = np.zeros((20, 50, 3), dtype=np.uint8)
    b[:, :10] = (255, 0, 0)  # left band red; stored sideways with EXIF "rotate 90 CW"
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(b).save(buf, format="JPEG", exif=exif, quality=100, subsampling=0)
    (folder / "b rotated ü.jpg").write_bytes(buf.getvalue())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return folder


def test_predict_writes_every_output_and_reports_the_corrupt_file(
    tmp_path: Path, images_dir: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    config = write_predict_config(tmp_path / "c.yaml", colour_model(channels=2))
    out = tmp_path / "out"
    code = main(
        ["predict", "--config", str(config), "--images-dir", str(images_dir), "--out-dir", str(out)]
    )
    assert code == 1  # the corrupt file failed, the others ran

    red = read_png(out / "masks_binary" / "red" / "a.png")
    green = read_png(out / "masks_binary" / "green" / "a.png")
    assert red.dtype == np.uint8 and set(np.unique(red)) == {0, 255}
    expected_red = np.zeros((30, 40), dtype=np.uint8)
    expected_red[5:15, 5:25] = 255
    np.testing.assert_array_equal(red, expected_red)
    assert (green[10:25, 20:35] == 255).all() and green.sum() == 15 * 15 * 255

    semantic = read_png(out / "masks_semantic" / "a.png")
    assert semantic[6, 6] == 1 and semantic[20, 30] == 2 and semantic[0, 0] == 0
    assert semantic[12, 22] == 2  # overlap: the later label wins

    # EXIF orientation 6: the 20x50 image is shown 50 high, 20 wide; the red band on top.
    rotated = read_png(out / "masks_binary" / "red" / "b rotated ü.png")
    assert rotated.shape == (50, 20)
    assert (rotated[:8] == 255).all() and not rotated[12:].any()
    assert not (out / "masks_binary" / "green" / "b rotated ü.png").exists()  # empty: not written

    overlay = cv2.imdecode(
        np.frombuffer((out / "overlays" / "a.jpg").read_bytes(), np.uint8), cv2.IMREAD_COLOR
    )
    assert overlay.shape == (30, 40, 3)

    with (out / "summary.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["image"], r["label"]): r for r in rows}
    assert by_key[("a.png", "red")]["pixels"] == "200"
    assert by_key[("a.png", "red")]["width"] == "40"
    assert by_key[("a.png", "green")]["fraction"] == f"{225 / 1200:.6f}"
    assert by_key[("b rotated ü.jpg", "red")]["height"] == "50"
    assert by_key[("b rotated ü.jpg", "green")]["kept"] == "0"
    failure = by_key[("corrupt.jpg", "")]
    assert "corrupt.jpg" in failure["error"] and failure["width"] == ""


def test_flags_override_the_config(
    tmp_path: Path, images_dir: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    (images_dir / "corrupt.jpg").unlink()
    config = write_predict_config(tmp_path / "c.yaml", colour_model(channels=2))
    out = tmp_path / "out"
    args = ["predict", "--config", str(config), "--images-dir", str(images_dir)]
    # In a.png red covers 200 pixels, green 225: a min-pixels of 210 drops red only.
    assert (
        main([*args, "--out-dir", str(out), "--min-pixels", "210", "--thresholds", "red=0.5"]) == 0
    )
    assert not (out / "masks_binary" / "red" / "a.png").exists()
    assert (out / "masks_binary" / "green" / "a.png").exists()
    # A dim red square has p = 0.877: a threshold of 0.9 drops it, 0.8 keeps it.
    dim = np.zeros((8, 8, 3), dtype=np.uint8)
    dim[2:6, 2:6, 0] = 140
    Image.fromarray(dim).save(images_dir / "dim.png")
    assert main([*args, "--out-dir", str(tmp_path / "o2"), "--thresholds", "red=0.9"]) == 0
    assert not (tmp_path / "o2" / "masks_binary" / "red" / "dim.png").exists()
    assert (tmp_path / "o2" / "masks_binary" / "red" / "a.png").exists()
    assert main([*args, "--out-dir", str(tmp_path / "o3"), "--thresholds", "default=0.8"]) == 0
    assert read_png(tmp_path / "o3" / "masks_binary" / "red" / "dim.png").sum() == 16 * 255


def test_usage_errors_exit_2_with_a_message(
    tmp_path: Path,
    images_dir: Path,
    colour_model: Callable[..., ModelConfig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_predict_config(tmp_path / "c.yaml", colour_model(channels=2))
    base = ["predict", "--config", str(config), "--out-dir", str(tmp_path / "o")]
    assert main([*base, "--images-dir", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([*base, "--images-dir", str(images_dir), "--thresholds", "purple=0.5"]) == 2
    assert "'purple', which is not a model label" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*base, "--images-dir", str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
