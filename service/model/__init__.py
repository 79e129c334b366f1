"""The model stage: image decoding, the segmenter contract and its runtimes (torch lives in
``torchscript.py`` only, and is loaded only when a TorchScript model is). Everything outside
this package loads a model with :func:`load_segmenter` and uses it as a :class:`Segmenter`."""

from __future__ import annotations

from service.config import ModelConfig
from service.model.base import ImagePrediction, LabelMask, Segmenter


def load_segmenter(config: ModelConfig) -> Segmenter:
    """The model ``config`` names, in its runtime: TorchScript, the one runtime today; a second
    runtime (ONNX Runtime, by the file's kind) is chosen here."""
    from service.model.torchscript import SegmentationModel  # torch: only when used

    return SegmentationModel.load(config)


__all__ = ["ImagePrediction", "LabelMask", "Segmenter", "load_segmenter"]
