"""The runner's machinery, on few-line fake models whose right answer is known exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from service.config import ModelConfig, PredictionConfig, Thresholds
from service.errors import ModelError
from service.model.torchscript import SegmentationModel


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """Random rectangles of pure red, green and yellow on black."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for colour in ((255, 0, 0), (0, 255, 0), (255, 255, 0)):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        image[y : y + rng.integers(4, height // 2 + 5), x : x + rng.integers(4, width // 2 + 5)] = (
            colour
        )
    return image


def test_masks_are_exact_at_full_resolution(
    colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    model = SegmentationModel.load(colour_model(channels=2))
    images = [scene(37, 53, 0), scene(64, 40, 1), scene(20, 90, 2)]  # one batch, three sizes
    results = model.predict(images, prediction)
    assert [(r.height, r.width) for r in results] == [(37, 53), (64, 40), (20, 90)]
    for image, result in zip(images, results, strict=True):
        red, green = result.labels
        assert (red.label, green.label) == ("red", "green")
        np.testing.assert_array_equal(red.mask, image[..., 0] > 127)
        np.testing.assert_array_equal(green.mask, image[..., 1] > 127)
        assert red.pixels == int((image[..., 0] > 127).sum())


def test_padding_is_cropped_and_strided_output_upsampled(
    colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    # A model that returns 1/4 resolution; image sizes that are multiples of 4 but not of 8.
    model = SegmentationModel.load(colour_model(channels=1, stride=4))
    image = np.zeros((44, 36, 3), dtype=np.uint8)
    image[8:24, 4:20, 0] = 255  # aligned with the 4-pixel grid
    small = np.zeros((12, 12, 3), dtype=np.uint8)
    truth = image[..., 0] > 0
    big, tiny = model.predict([image, small], prediction)
    assert big.labels[0].mask.shape == (44, 36)
    np.testing.assert_array_equal(big.labels[0].mask, truth)
    assert tiny.labels[0].pixels == 0
    # Bilinear probabilities round the square's corners off, and change nothing else.
    big, _ = model.predict([image, small], dataclasses.replace(prediction, prob_upsample=True))
    differ = np.argwhere(big.labels[0].mask != truth)
    assert {tuple(p) for p in differ} <= {(8, 4), (8, 19), (23, 4), (23, 19)}


def test_fixed_input_size_resizes_and_maps_back(
    colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    model = SegmentationModel.load(colour_model(channels=1, input_size=(32, 32)))
    image = np.zeros((300, 200, 3), dtype=np.uint8)
    image[:150, :, 0] = 255  # top half red
    (result,) = model.predict([image], dataclasses.replace(prediction, prob_upsample=True))
    mask = result.labels[0].mask
    assert mask.shape == (300, 200)
    assert mask[:140].all() and not mask[160:].any()


def test_thresholds_and_min_pixels(
    colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    model = SegmentationModel.load(colour_model(channels=2))
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[:, :5, 0] = 140  # logit (140/255 - .5) * 40 = 1.96 -> p = 0.877
    image[0, 0, 1] = 255  # a single green pixel
    settings = dataclasses.replace(
        prediction, thresholds=Thresholds(default=0.5, per_label={"red": 0.9}), min_pixels=2
    )
    (result,) = model.predict([image], settings)
    red, green = result.labels
    assert red.pixels == 0 and red.threshold == 0.9 and not red.kept
    assert green.pixels == 1 and not green.kept  # under min_pixels
    (result,) = model.predict([image], dataclasses.replace(settings, thresholds=Thresholds(0.8)))
    assert result.labels[0].pixels == 50 and result.labels[0].kept
    assert [m.label for m in result.kept] == ["red"]


def test_softmax_gives_one_label_per_pixel_and_hides_background(
    colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    config = colour_model(channels=3, activation="softmax", background="blue")
    model = SegmentationModel.load(config)
    assert model.labels == ("red", "green")
    image = np.zeros((6, 6, 3), dtype=np.uint8)
    image[:, :2] = (255, 0, 0)
    image[:, 2:4] = (255, 255, 0)  # red and green tie: arg-max takes the first, p = 0.5
    image[:, 4:] = (0, 0, 255)  # background
    (result,) = model.predict([image], dataclasses.replace(prediction, thresholds=Thresholds(0.4)))
    red, green = result.labels
    assert (red.label, green.label) == ("red", "green")
    np.testing.assert_array_equal(red.mask[0], [1, 1, 1, 1, 0, 0])
    assert not green.mask.any()
    assert not (red.mask & green.mask).any()


def test_channel_count_mismatch_fails_at_load_naming_both_numbers(
    colour_model: Callable[..., ModelConfig],
) -> None:
    config = colour_model(channels=2)
    wrong = dataclasses.replace(config, labels=("a", "b", "c"))
    with pytest.raises(ModelError, match=r"outputs 2 channel\(s\) but model.labels names 3"):
        SegmentationModel.load(wrong)


def test_missing_and_broken_model_files(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    config = colour_model()
    with pytest.raises(ModelError, match="model file not found"):
        SegmentationModel.load(dataclasses.replace(config, path=tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"cannot load .*junk\.pt as a TorchScript model"):
        SegmentationModel.load(dataclasses.replace(config, path=junk))
    with pytest.raises(ModelError, match="no CUDA device"):
        SegmentationModel.load(dataclasses.replace(config, device="cuda:3"))


class ListModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


def test_output_not_matching_the_contract(
    tmp_path: Path, colour_model: Callable[..., ModelConfig]
) -> None:
    path = tmp_path / "list.pt"
    torch.jit.save(torch.jit.script(ListModel()), str(path))
    with pytest.raises(ModelError, match=r"must return logits \[N, C, h, w\]"):
        SegmentationModel.load(dataclasses.replace(colour_model(), path=path))


def test_batches_larger_than_batch_size_are_split(
    colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    model = SegmentationModel.load(colour_model(channels=1, batch_size=2))
    images = [scene(16, 16, seed) for seed in range(5)]
    results = model.predict(images, prediction)
    assert len(results) == 5
    for image, result in zip(images, results, strict=True):
        np.testing.assert_array_equal(result.labels[0].mask, image[..., 0] > 127)


class PickyModel(torch.nn.Module):
    """Fails on inputs wider than 64 pixels, like a model with a size limit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 64:
            raise RuntimeError("input too wide")
        return x[:, :1] * 40.0 - 20.0


def test_predict_each_isolates_the_image_that_breaks_the_batch(
    tmp_path: Path, colour_model: Callable[..., ModelConfig], prediction: PredictionConfig
) -> None:
    path = tmp_path / "picky.pt"
    torch.jit.save(torch.jit.script(PickyModel()), str(path))
    config = dataclasses.replace(colour_model(channels=1), path=path)
    model = SegmentationModel.load(config)
    good, wide = scene(16, 16, 0), scene(16, 80, 1)
    with pytest.raises(ModelError, match="input too wide"):
        model.predict([good, wide], prediction)
    first, second = model.predict_each([good, wide], prediction)
    assert not isinstance(first, str)
    np.testing.assert_array_equal(first.labels[0].mask, good[..., 0] > 127)
    assert isinstance(second, str) and "input too wide" in second
