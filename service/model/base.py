"""The segmenter contract: what the worker, ``predict`` and the service need from a model.

A segmenter takes RGB images and returns, per image, one boolean mask per output label, or the
reason that image failed. ``SegmentationModel`` (``torchscript.py``, TorchScript) is today's one
implementation; another runtime (ONNX Runtime, an instance-segmentation model) implements
:class:`Segmenter` and passes the same tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.config import PredictionConfig


@dataclass(frozen=True)
class LabelMask:
    """One label's mask for one image, before and after ``min_pixels``."""

    label: str
    mask: np.ndarray  # (H, W) bool at the image's own size
    pixels: int
    threshold: float
    kept: bool  # False when below min_pixels: the mask is not posted or written


@dataclass(frozen=True)
class ImagePrediction:
    width: int
    height: int
    labels: tuple[LabelMask, ...]

    @property
    def kept(self) -> tuple[LabelMask, ...]:
        return tuple(m for m in self.labels if m.kept)


class Segmenter(Protocol):
    """A loaded model with its pre- and post-processing."""

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels that produce masks, in output order (the background channel excluded)."""
        ...

    @property
    def batch_size(self) -> int:
        """How many images one call of the model should get, at most."""
        ...

    def predict_each(
        self, images: Sequence[np.ndarray], prediction: PredictionConfig
    ) -> list[ImagePrediction | str]:
        """One result per ``(H, W, 3) uint8`` RGB image, in order: its masks, or the reason it
        failed (one image never sinks the others)."""
        ...
