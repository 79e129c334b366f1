"""Synthetic images of known shapes, for the demo model and for tests.

Each image has a textured, noisy background (colour gradient, soft irregular blobs, sometimes
stripes and thin lines) and 2-6 objects of the classes in ``LABELS``, each with a random size,
rotation and colour. Later objects occlude earlier ones, and the masks hold only what is
visible, so masks of different classes never overlap. Everything is drawn from the generator
passed in, so a seed gives the same sample on every machine.

numpy and cv2 only: the test suite uses this without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

LABELS: tuple[str, ...] = ("circle", "rectangle", "triangle")

_MIN_OBJECTS = 2
_MAX_OBJECTS = 6
# Object size (circle diameter, rectangle long side, triangle side) as a
# fraction of the image's shorter side.
_MIN_SIZE = 0.08
_MAX_SIZE = 0.35
# Below these, a person could not tell the class either: a shape mostly hidden behind
# another one or mostly outside the frame is redrawn elsewhere.
_MIN_VISIBLE = 0.6
_MIN_INSIDE = 0.6
# Euclidean RGB distance between an object's colour and the mean of what it covers.
_MIN_CONTRAST = 70.0
_PLACEMENT_TRIES = 30
# cv2 fills polygons with sub-pixel vertices given as fixed point with this many bits.
_SHIFT = 4

FloatImage = NDArray[np.float32]
Alpha = NDArray[np.float32]


@dataclass(frozen=True)
class Sample:
    """One synthetic image and the visible pixels of each class."""

    image: NDArray[np.uint8]
    """(H, W, 3) RGB."""
    masks: NDArray[np.bool_]
    """(len(LABELS), H, W), in ``LABELS`` order; no pixel is set in two classes."""


@dataclass(frozen=True)
class _Shape:
    label: int
    polygon: NDArray[np.float64] | None
    """(K, 2) x, y vertices; None for a circle."""
    center: tuple[float, float]
    radius: float

    def area(self) -> float:
        """Area of the whole shape, including what falls outside the image."""
        if self.polygon is None:
            return math.pi * self.radius**2
        x, y = self.polygon[:, 0], self.polygon[:, 1]
        return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def make_sample(rng: np.random.Generator, height: int = 256, width: int = 256) -> Sample:
    """Draw one image with 2-6 objects on a textured background.

    Object sizes are relative to ``min(height, width)``, so a 320x240 sample squeezed to
    256x256 shows the stretched shapes a resizing runner would feed a model.
    """
    if height < 32 or width < 32:
        raise ValueError(f"image must be at least 32x32, got {height}x{width}")
    image = _background(rng, height, width)
    # Visible object per pixel: -1 background, else index into `shapes`.
    owner = np.full((height, width), -1, dtype=np.int16)
    shapes: list[_Shape] = []
    # Pixels each shape had in the image when it was drawn, before anything covered it.
    drawn: list[int] = []
    for _ in range(int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))):
        placed = _place(rng, shapes, drawn, owner)
        if placed is None:
            continue
        shape, alpha = placed
        inside = alpha >= 0.5
        colour = _contrasting_colour(rng, image, inside)
        _paint(rng, image, alpha, colour)
        owner[inside] = len(shapes)
        shapes.append(shape)
        drawn.append(int(inside.sum()))
    pixels = _finish(rng, image)
    masks = np.zeros((len(LABELS), height, width), dtype=bool)
    for index, shape in enumerate(shapes):
        masks[shape.label] |= owner == index
    return Sample(image=pixels, masks=masks)


def _background(rng: np.random.Generator, height: int, width: int) -> FloatImage:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, stop = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    image: FloatImage = start + ramp[..., None] * (stop - start)

    # Low-frequency colour variation: a coarse random grid, smoothly upsampled.
    cells = int(rng.integers(2, 7))
    coarse = rng.normal(0, rng.uniform(10, 45), size=(cells, cells, 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)

    # Soft irregular blobs: thresholded smooth noise, so they are never shape-like.
    for _ in range(int(rng.integers(0, 4))):
        cells = int(rng.integers(3, 9))
        field = cv2.resize(
            rng.normal(size=(cells, cells)).astype(np.float32),
            (width, height),
            interpolation=cv2.INTER_CUBIC,
        )
        hard = (field > rng.uniform(0.5, 1.2)).astype(np.float32)
        blob = np.asarray(cv2.GaussianBlur(hard, (0, 0), rng.uniform(1.5, 6.0)), np.float32)
        strength = rng.uniform(0.3, 0.8)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        image += (strength * blob)[..., None] * (colour - image)

    if rng.random() < 0.35:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 24)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        wave = np.sin(phase).astype(np.float32)
        image += wave[..., None] * rng.uniform(5, 30, size=3).astype(np.float32)

    # Thin strokes: edges that belong to no class.
    for _ in range(int(rng.integers(0, 4))):
        points = rng.uniform(0, 1, size=(int(rng.integers(2, 5)), 2)) * (width, height)
        cv2.polylines(
            image,
            [np.round(points * (1 << _SHIFT)).astype(np.int32)],
            isClosed=False,
            color=tuple(float(c) for c in rng.uniform(0, 255, size=3)),
            thickness=int(rng.integers(1, 4)),
            lineType=cv2.LINE_AA,
            shift=_SHIFT,
        )
    return image


def _random_shape(rng: np.random.Generator, height: int, width: int, near: _Shape | None) -> _Shape:
    label = int(rng.integers(0, len(LABELS)))
    size = rng.uniform(_MIN_SIZE, _MAX_SIZE) * min(height, width)
    # Half the extent; an equilateral triangle of side `size` has circumradius size / sqrt(3).
    radius = size / math.sqrt(3) if LABELS[label] == "triangle" else size / 2
    if near is None:
        center = (rng.uniform(0, width), rng.uniform(0, height))
    else:
        # Touching or slightly overlapping a shape already drawn.
        direction = rng.uniform(0, 2 * math.pi)
        distance = (near.radius + radius) * rng.uniform(0.65, 1.0)
        center = (
            near.center[0] + distance * math.cos(direction),
            near.center[1] + distance * math.sin(direction),
        )
    rotation = rng.uniform(0, 2 * math.pi)
    polygon: NDArray[np.float64] | None
    if LABELS[label] == "circle":
        polygon = None
    elif LABELS[label] == "rectangle":
        half_long = radius
        half_short = radius * rng.uniform(0.4, 1.0)
        corners = np.array(
            [
                [-half_long, -half_short],
                [half_long, -half_short],
                [half_long, half_short],
                [-half_long, half_short],
            ]
        )
        polygon = _rotate(corners, rotation) + center
    else:
        # Near-equilateral, jittered so that triangles differ, but never a sliver.
        angles = rotation + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        angles += rng.uniform(-0.35, 0.35, size=3)
        radii = radius * rng.uniform(0.85, 1.0, size=3)
        polygon = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1) + center
    return _Shape(label=label, polygon=polygon, center=center, radius=radius)


def _rotate(points: NDArray[np.float64], angle: float) -> NDArray[np.float64]:
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, sin], [-sin, cos]])
    rotated: NDArray[np.float64] = points @ rotation
    return rotated


def _rasterize(shape: _Shape, height: int, width: int) -> Alpha:
    """Anti-aliased coverage in [0, 1]; the mask is coverage >= 0.5."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    scale = 1 << _SHIFT
    if shape.polygon is None:
        center = (round(shape.center[0] * scale), round(shape.center[1] * scale))
        cv2.circle(canvas, center, round(shape.radius * scale), 255, -1, cv2.LINE_AA, shift=_SHIFT)
    else:
        points = np.round(shape.polygon * scale).astype(np.int32)
        cv2.fillPoly(canvas, [points], 255, lineType=cv2.LINE_AA, shift=_SHIFT)
    alpha: Alpha = canvas.astype(np.float32) / np.float32(255)
    return alpha


def _place(
    rng: np.random.Generator,
    shapes: list[_Shape],
    drawn: list[int],
    owner: NDArray[np.int16],
) -> tuple[_Shape, Alpha] | None:
    """A new shape that is mostly inside the image and hides no earlier one too much."""
    height, width = owner.shape
    visible = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]
    keep = _MIN_VISIBLE * np.array(drawn, dtype=np.float64)
    for _ in range(_PLACEMENT_TRIES):
        near = shapes[int(rng.integers(0, len(shapes)))] if shapes and rng.random() < 0.4 else None
        shape = _random_shape(rng, height, width, near)
        alpha = _rasterize(shape, height, width)
        inside = alpha >= 0.5
        if inside.sum() < _MIN_INSIDE * shape.area():
            continue
        hidden = np.bincount(owner[inside] + 1, minlength=len(shapes) + 1)[1:]
        if np.all(visible - hidden >= keep):
            return shape, alpha
    return None


def _contrasting_colour(
    rng: np.random.Generator, image: FloatImage, mask: NDArray[np.bool_]
) -> NDArray[np.float32]:
    covered = image[mask].mean(axis=0) if mask.any() else image.mean(axis=(0, 1))
    best = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.linalg.norm(best - covered) >= _MIN_CONTRAST:
            break
        best = rng.uniform(0, 255, size=3)
    else:
        # Push away from what it covers, towards the far end of each channel.
        best = np.where(covered < 128, covered + _MIN_CONTRAST, covered - _MIN_CONTRAST)
    return best.astype(np.float32)


def _paint(
    rng: np.random.Generator, image: FloatImage, alpha: Alpha, colour: NDArray[np.float32]
) -> None:
    """Blend a shaded object into ``image`` in place."""
    left, top, box_width, box_height = cv2.boundingRect((alpha > 0).astype(np.uint8))
    if box_width == 0:
        return
    rows, cols = slice(top, top + box_height), slice(left, left + box_width)
    yy, xx = np.mgrid[rows, cols].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    shade = (xx * math.cos(angle) + yy * math.sin(angle)) / max(alpha.shape)
    fill = colour + (shade * rng.uniform(-40, 40))[..., None]
    image[rows, cols] += alpha[rows, cols, None] * (fill - image[rows, cols])


def _finish(rng: np.random.Generator, image: FloatImage) -> NDArray[np.uint8]:
    sigma = rng.uniform(0.0, 1.0)
    if sigma > 0.3:
        image = np.asarray(cv2.GaussianBlur(image, (0, 0), sigma), np.float32)
    image = image + rng.normal(0, rng.uniform(2, 12), size=image.shape).astype(np.float32)
    result: NDArray[np.uint8] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return result
