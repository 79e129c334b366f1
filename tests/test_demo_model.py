"""The bundled demo model through the real runner, on synthetic images of known shapes."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.config import Config
from service.local.synthetic import LABELS, make_sample
from service.model.torchscript import SegmentationModel

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(repo_config: Config) -> SegmentationModel:
    return SegmentationModel.load(repo_config.model)


def test_demo_config_matches_the_generator(repo_config: Config) -> None:
    assert repo_config.model.labels == LABELS
    assert repo_config.model.path.stat().st_size <= 5 * 1024 * 1024


@pytest.mark.parametrize(("height", "width"), [(256, 256), (240, 320), (360, 300)])
def test_demo_model_finds_the_shapes(
    demo: SegmentationModel, repo_config: Config, height: int, width: int
) -> None:
    rng = np.random.default_rng(424242 + height)  # seeds far from the training ones
    samples = [make_sample(rng, height, width) for _ in range(6)]
    results = demo.predict([s.image for s in samples], repo_config.prediction)
    inter = np.zeros(len(LABELS))
    union = np.zeros(len(LABELS))
    for sample, result in zip(samples, results, strict=True):
        assert (result.height, result.width) == (height, width)
        assert [m.label for m in result.labels] == list(LABELS)
        for index, item in enumerate(result.labels):
            truth = sample.masks[index]
            inter[index] += (item.mask & truth).sum()
            union[index] += (item.mask | truth).sum()
    iou = inter / np.maximum(union, 1)
    # Held-out figures are in the README; a margin below them keeps this robust on 6 images.
    assert (iou >= 0.7).all(), dict(zip(LABELS, iou.round(3), strict=True))


def test_an_image_of_nothing_gives_no_masks(demo: SegmentationModel, repo_config: Config) -> None:
    blank = np.full((200, 300, 3), 128, dtype=np.uint8)
    (result,) = demo.predict([blank], repo_config.prediction)
    assert not result.kept


def test_predict_right_after_install_needs_only_two_folders(tmp_path: Path) -> None:
    """The console script, from a folder with no config, on the bundled samples + a bad file."""
    exe = shutil.which("ls-autoseg", path=str(Path(sys.executable).parent))
    assert exe, "ls-autoseg console script not installed next to this python"
    images = tmp_path / "images"
    shutil.copytree(REPO / "samples" / "images", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    env = {k: v for k, v in os.environ.items() if k != "LS_AUTOSEG_CONFIG"}
    done = subprocess.run(
        [exe, "predict", "--images-dir", "images", "--out-dir", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # broken.jpg failed, the rest ran
    assert "broken.jpg" in done.stderr
    samples = sorted(p.stem for p in (REPO / "samples" / "images").glob("*.jpg"))
    overlays = sorted(p.stem for p in (tmp_path / "out" / "overlays").glob("*.jpg"))
    assert overlays == samples
    with (tmp_path / "out" / "summary.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    found = {r["label"] for r in rows if r["kept"] == "1"}
    assert found == set(LABELS)  # every shape class appears somewhere in the samples
    # sample_06 is stored 400 wide, 560 high with EXIF "rotate 90": it is shown 560x400,
    # and its masks have that displayed size.
    with Image.open(REPO / "samples" / "images" / "sample_06.jpg") as stored:
        assert stored.size == (400, 560)
    with Image.open(tmp_path / "out" / "masks_semantic" / "sample_06.png") as mask:
        assert mask.size == (560, 400)
