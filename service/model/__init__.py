"""The model stage: image decoding, the segmenter contract and its runtimes (torch lives in
``torchscript.py`` only)."""

from __future__ import annotations

from service.model.base import ImagePrediction, LabelMask, Segmenter
from service.model.torchscript import SegmentationModel, resolve_device

__all__ = ["ImagePrediction", "LabelMask", "SegmentationModel", "Segmenter", "resolve_device"]
