"""The model stage: image decoding, the segmenter contract and its runtimes (torch lives in
``torchscript.py`` only). Everything outside this package loads a model with
:func:`load_segmenter` and uses it as a :class:`Segmenter`."""

from __future__ import annotations

from service.config import ModelConfig
from service.model.base import ImagePrediction, LabelMask, Segmenter
from service.model.torchscript import SegmentationModel, resolve_device


def load_segmenter(config: ModelConfig) -> Segmenter:
    """The model ``config`` names, in its runtime: TorchScript, the one runtime today; a second
    runtime (ONNX Runtime, by the file's kind) is chosen here."""
    return SegmentationModel.load(config)


__all__ = [
    "ImagePrediction",
    "LabelMask",
    "SegmentationModel",
    "Segmenter",
    "load_segmenter",
    "resolve_device",
]
