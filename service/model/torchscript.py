"""The model runner: RGB images in, one boolean mask per label out. torch lives here only.

Contract (README, "Model contract"): a TorchScript file whose ``forward(x)`` takes float32
``[N, 3, H, W]`` RGB scaled to [0, 1] then normalised with ``(x - mean) / std``, and returns
logits ``[N, C, h, w]`` with one channel per configured label (any h, w).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from service.config import ModelConfig, PredictionConfig, Thresholds
from service.errors import AutosegError, ModelError
from service.model.base import ImagePrediction, LabelMask

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"model.device is {name!r} but this machine has no CUDA device")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"model.device is {name!r} but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(name)


class SegmentationModel:
    """A loaded model plus the pre- and post-processing its config describes."""

    def __init__(self, module: Any, config: ModelConfig, device: torch.device) -> None:
        self._module = module
        self.config = config
        self.device = device
        self._mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255.0)

    @classmethod
    def load(cls, config: ModelConfig) -> SegmentationModel:
        """Load and check the model; a channel count that differs from the labels fails here."""
        # One intra-op thread per CPU this process may use (a container's share, not the
        # host's count); decoding and posting run in other threads beside it.
        torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)) or 1)
        device = resolve_device(config.device)
        if not config.path.is_file():
            raise ModelError(f"model file not found: {config.path} (model.path)")
        with warnings.catch_warnings():
            # TorchScript is the contract's format; torch flags its loader as deprecated.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(config.path), map_location=device
                )
            except Exception as exc:  # torch raises RuntimeError, ValueError, zipfile errors
                raise ModelError(
                    f"cannot load {config.path} as a TorchScript model: {_short_error(exc)}"
                ) from exc
        module.eval()
        model = cls(module, config, device)
        model._check_channels()
        log.info(
            "model loaded: %s on %s, labels %s", config.path.name, device, ",".join(config.labels)
        )
        return model

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.output_labels

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def _check_channels(self) -> None:
        side = max(64, self.config.size_divisor * 2)
        height, width = self.config.input_size or (side, side)
        probe = np.zeros((height, width, 3), dtype=np.uint8)
        logits = self._forward([probe])
        channels = logits.shape[1]
        if channels != len(self.config.labels):
            raise ModelError(
                f"{self.config.path.name} outputs {channels} channel(s) but model.labels "
                f"names {len(self.config.labels)} ({', '.join(self.config.labels)}): "
                "list one label per output channel, in order"
            )

    # ------------------------------------------------------------------ inference

    def predict(
        self, images: Sequence[np.ndarray], prediction: PredictionConfig
    ) -> list[ImagePrediction]:
        """Masks for each ``(H, W, 3) uint8`` RGB image, in batches of ``model.batch_size``."""
        out: list[ImagePrediction] = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            out.extend(self._predict_batch(images[start : start + size], prediction))
        return out

    def predict_each(
        self, images: Sequence[np.ndarray], prediction: PredictionConfig
    ) -> list[ImagePrediction | str]:
        """Like :meth:`predict`, but a failure becomes that image's reason string.

        If a batch fails, each image is tried alone, so one image cannot sink the others.
        """
        if not images:
            return []
        try:
            return list(self.predict(images, prediction))
        except AutosegError as exc:
            if len(images) == 1:
                return [str(exc)]
        out: list[ImagePrediction | str] = []
        for image in images:
            out.extend(self.predict_each([image], prediction))
        return out

    def _predict_batch(
        self, images: Sequence[np.ndarray], prediction: PredictionConfig
    ) -> list[ImagePrediction]:
        with torch.inference_mode():
            logits = self._forward(images)
            _, _, out_h, out_w = logits.shape
            padded_h, padded_w = self._batch_shape(images)
            results = []
            for index, image in enumerate(images):
                height, width = image.shape[:2]
                if self.config.input_size is None:
                    # Crop the padding away, in the output's own resolution.
                    valid_h = max(1, round(out_h * height / padded_h))
                    valid_w = max(1, round(out_w * width / padded_w))
                    one = logits[index, :, :valid_h, :valid_w]
                else:
                    one = logits[index]
                results.append(self._masks(one, height, width, prediction))
            return results

    def _batch_shape(self, images: Sequence[np.ndarray]) -> tuple[int, int]:
        if self.config.input_size is not None:
            return self.config.input_size
        div = self.config.size_divisor
        height = max(img.shape[0] for img in images)
        width = max(img.shape[1] for img in images)
        return math.ceil(height / div) * div, math.ceil(width / div) * div

    def _forward(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        padded_h, padded_w = self._batch_shape(images)
        batch = np.zeros((len(images), padded_h, padded_w, 3), dtype=np.uint8)
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ModelError(f"expected an (H, W, 3) uint8 image, got {image.shape}")
            if self.config.input_size is not None:
                image = _resize(image, padded_h, padded_w)
            batch[index, : image.shape[0], : image.shape[1]] = image
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self._mean) * self._inv_std
        if self.config.input_size is None:
            # Padding in normalised space is zero: the mean colour, not black.
            for index, image in enumerate(images):
                x[index, :, image.shape[0] :, :] = 0.0
                x[index, :, :, image.shape[1] :] = 0.0
        try:
            logits = self._module(x)
        except Exception as exc:
            raise ModelError(f"model forward failed: {_short_error(exc)}") from exc
        if (
            not isinstance(logits, torch.Tensor)
            or logits.ndim != 4
            or logits.shape[0] != len(images)
        ):
            shape = (
                tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            )
            raise ModelError(f"model must return logits [N, C, h, w], returned {shape}")
        return logits.float()

    def _masks(
        self, logits: torch.Tensor, height: int, width: int, prediction: PredictionConfig
    ) -> ImagePrediction:
        config = self.config
        probs = torch.sigmoid(logits) if config.activation == "sigmoid" else logits.softmax(0)
        if prediction.prob_upsample:
            probs = _upsample(probs, height, width, "bilinear")
            masks = _threshold(probs, config, prediction.thresholds)
        else:
            low = _threshold(probs, config, prediction.thresholds)
            masks = _upsample(low.to(torch.uint8), height, width, "nearest").bool()
        found = masks.flatten(1).sum(1).tolist()
        arrays = masks.cpu().numpy()
        labels = []
        for channel, label in enumerate(config.labels):
            if label == config.background:
                continue
            pixels = int(found[channel])
            labels.append(
                LabelMask(
                    label=label,
                    mask=arrays[channel],
                    pixels=pixels,
                    threshold=prediction.thresholds.for_label(label),
                    kept=pixels > 0 and pixels >= prediction.min_pixels,
                )
            )
        return ImagePrediction(width=width, height=height, labels=tuple(labels))


def _short_error(exc: Exception) -> str:
    """One line: TorchScript puts the real reason on the last line of a long trace."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _threshold(probs: torch.Tensor, config: ModelConfig, thresholds: Thresholds) -> torch.Tensor:
    limits = torch.tensor(
        [thresholds.for_label(label) for label in config.labels], device=probs.device
    ).view(-1, 1, 1)
    above = probs >= limits
    if config.activation == "softmax":
        # One label per pixel: the arg-max, kept only if it also clears its threshold.
        winner = probs.argmax(0, keepdim=True)
        channels = torch.arange(probs.shape[0], device=probs.device).view(-1, 1, 1)
        above &= winner == channels
    return above


def _upsample(t: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    if t.shape[-2:] == (height, width):
        return t
    if mode == "bilinear":
        return F.interpolate(t[None], size=(height, width), mode=mode, align_corners=False)[0]
    return F.interpolate(t[None], size=(height, width), mode=mode)[0]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] * image.shape[1] > height * width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized: np.ndarray = cv2.resize(image, (width, height), interpolation=interpolation)
    return resized
