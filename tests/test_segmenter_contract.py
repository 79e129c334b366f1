"""The segmenter contract (``service.model.base.Segmenter``): what the worker, ``predict`` and
the service rely on, run against every runtime. TorchScript is the one runtime today; a second
(ONNX Runtime, an instance-segmentation model) adds one parameter to ``segmenter``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from service.config import ModelConfig, PredictionConfig
from service.model import Segmenter, load_segmenter

RUNTIMES = ["torchscript"]


@pytest.fixture(params=RUNTIMES)
def segmenter(
    request: pytest.FixtureRequest, colour_model: Callable[..., ModelConfig]
) -> Segmenter:
    """A segmenter whose exact answer is known: label c is "colour channel c is bright"."""
    if request.param == "torchscript":
        return load_segmenter(colour_model(channels=2, batch_size=3))
    raise AssertionError(f"no opener for runtime {request.param}")


def picture(
    height: int, width: int, red: tuple[slice, slice], green: tuple[slice, slice]
) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[(*red, 0)] = 255
    image[(*green, 1)] = 255
    return image


def test_labels_and_batch_size_come_from_the_model_config(segmenter: Segmenter) -> None:
    assert segmenter.labels == ("red", "green")
    assert segmenter.batch_size == 3


def test_one_result_per_image_in_order_with_masks_at_the_images_own_size(
    segmenter: Segmenter, prediction: PredictionConfig
) -> None:
    images = [
        picture(30, 40, (slice(2, 12), slice(5, 25)), (slice(15, 25), slice(10, 30))),
        picture(17, 61, (slice(0, 17), slice(0, 3)), (slice(4, 9), slice(50, 61))),
        picture(64, 8, (slice(60, 64), slice(0, 8)), (slice(0, 1), slice(0, 1))),
        picture(5, 5, (slice(0, 0), slice(0, 0)), (slice(0, 5), slice(0, 5))),
    ]  # more images than one batch
    results = segmenter.predict_each(images, prediction)
    assert len(results) == len(images)
    for image, result in zip(images, results, strict=True):
        assert not isinstance(result, str), result
        assert (result.height, result.width) == image.shape[:2]
        assert [m.label for m in result.labels] == list(segmenter.labels)
        for channel, mask in enumerate(result.labels):
            assert mask.mask.dtype == np.bool_
            np.testing.assert_array_equal(mask.mask, image[..., channel] > 127)
            assert mask.pixels == int(mask.mask.sum())


def test_a_bad_image_fails_alone_with_a_reason(
    segmenter: Segmenter, prediction: PredictionConfig
) -> None:
    good = picture(20, 20, (slice(0, 10), slice(0, 10)), (slice(10, 20), slice(10, 20)))
    grey = np.zeros((20, 20), dtype=np.uint8)  # not (H, W, 3)
    results = segmenter.predict_each([good, grey, good], prediction)
    assert len(results) == 3
    assert isinstance(results[1], str) and results[1]
    for result in (results[0], results[2]):
        assert not isinstance(result, str), result
        np.testing.assert_array_equal(result.labels[0].mask, good[..., 0] > 127)


def test_no_images_no_results(segmenter: Segmenter, prediction: PredictionConfig) -> None:
    assert segmenter.predict_each([], prediction) == []
