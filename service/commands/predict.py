"""Offline ``predict``: a folder of images -> mask files, overlays and a summary.

Output layout (the tutorial's, so ``upload`` and existing scripts read it):

    OUT/masks_binary/<label>/<stem>.png   0/255, one per label that passed min_pixels
    OUT/masks_semantic/<stem>.png         one byte per pixel: 0 = none, i = i-th label (1-based,
                                          model.labels order without background; where sigmoid
                                          labels overlap, the later label wins)
    OUT/overlays/<stem>.jpg               the masks coloured over the image, to judge thresholds
    OUT/summary.csv                       one row per image and label, plus one per failed image

Decoding runs in worker threads ahead of the model, and writing behind it, so the model is
the only thing the main thread waits for. An unreadable image is reported and skipped.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from service.config import PredictionConfig
from service.errors import ImageError
from service.model import ImagePrediction, Segmenter
from service.model.images import read_image

log = logging.getLogger(__name__)

# RGB colours for overlays, the first four as in the tutorial's label config.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 255),
    (0, 220, 220),
    (255, 0, 0),
    (80, 80, 255),
    (255, 200, 0),
    (0, 200, 0),
    (255, 128, 0),
    (128, 0, 255),
)
SUMMARY_FIELDS = (
    "image",
    "width",
    "height",
    "label",
    "pixels",
    "fraction",
    "threshold",
    "kept",
    "error",
)


@dataclass
class PredictReport:
    succeeded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.succeeded + len(self.failed)


def run_predict(
    model: Segmenter,
    paths: Sequence[Path],
    out_dir: Path,
    prediction: PredictionConfig,
    *,
    progress: bool | None = None,
) -> PredictReport:
    """Predict every image in ``paths`` and write the outputs; never raises for one bad image."""
    writer = OutputWriter(out_dir, model.labels)
    report = PredictReport()
    batch_size = model.batch_size
    stems: dict[str, str] = {}
    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="predict-io") as pool,
        writer.summary() as summary,
        tqdm(total=len(paths), unit="img", desc="predict", disable=_quiet(progress)) as bar,
    ):
        pending: list[Future[None]] = []
        decoded = _prefetch(pool, paths, prediction.max_pixels, window=2 * batch_size)
        for chunk in _chunks(decoded, batch_size):
            ready: list[tuple[Path, np.ndarray]] = []
            for path, image in chunk:
                reason = image if isinstance(image, str) else _stem_clash(stems, path)
                if reason is not None:
                    report.failed.append((path.name, reason))
                    summary.failure(path.name, reason)
                    log.warning("skipped %s: %s", path.name, reason)
                    bar.update(1)
                else:
                    ready.append((path, image))  # type: ignore[arg-type]
            for (path, image), result in zip(
                ready, model.predict_each([image for _, image in ready], prediction), strict=True
            ):
                if isinstance(result, str):
                    report.failed.append((path.name, result))
                    summary.failure(path.name, result)
                    log.warning("failed %s: %s", path.name, result)
                else:
                    summary.rows(path.name, result)
                    pending.append(pool.submit(writer.write, path.stem, image, result))
                    report.succeeded += 1
                bar.update(1)
            pending = _drain(pending, keep=batch_size)
        _drain(pending, keep=0)
    return report


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def _stem_clash(stems: dict[str, str], path: Path) -> str | None:
    other = stems.setdefault(path.stem, path.name)
    if other != path.name:
        return f"same file stem as {other}: its outputs would overwrite each other"
    return None


def _prefetch(
    pool: ThreadPoolExecutor, paths: Sequence[Path], max_pixels: int, window: int
) -> Iterator[tuple[Path, np.ndarray | str]]:
    """Decode images in the pool, at most ``window`` ahead; errors become reason strings."""
    futures: list[tuple[Path, Future[np.ndarray]]] = []
    queue = iter(paths)

    def fill() -> None:
        while len(futures) < window:
            path = next(queue, None)
            if path is None:
                return
            futures.append((path, pool.submit(read_image, path, max_pixels=max_pixels)))

    fill()
    while futures:
        path, future = futures.pop(0)
        try:
            yield path, future.result()
        except ImageError as exc:
            yield path, str(exc)
        fill()


def _chunks(
    items: Iterator[tuple[Path, np.ndarray | str]], size: int
) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    chunk: list[tuple[Path, np.ndarray | str]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _drain(pending: list[Future[None]], keep: int) -> list[Future[None]]:
    """Wait for the oldest writes so at most ``keep`` remain: bounds memory held by images."""
    while len(pending) > keep:
        pending.pop(0).result()
    return pending


class OutputWriter:
    def __init__(self, out_dir: Path, labels: tuple[str, ...]) -> None:
        self.out_dir = out_dir
        self.labels = labels
        for label in labels:
            (out_dir / "masks_binary" / label).mkdir(parents=True, exist_ok=True)
        (out_dir / "masks_semantic").mkdir(parents=True, exist_ok=True)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)

    def summary(self) -> SummaryWriter:
        return SummaryWriter(self.out_dir / "summary.csv")

    def write(self, stem: str, image: np.ndarray, result: ImagePrediction) -> None:
        semantic = np.zeros((result.height, result.width), dtype=np.uint8)
        overlay = image.astype(np.float32)
        for index, item in enumerate(result.labels):
            if not item.kept:
                continue
            _write_png(self.out_dir / "masks_binary" / item.label / f"{stem}.png", item.mask)
            semantic[item.mask] = index + 1
            colour = np.array(PALETTE[index % len(PALETTE)], dtype=np.float32)
            overlay[item.mask] = overlay[item.mask] * 0.55 + colour * 0.45
        _write_png(self.out_dir / "masks_semantic" / f"{stem}.png", semantic, scale=False)
        canvas = overlay.astype(np.uint8)
        thickness = max(1, min(result.height, result.width) // 300)
        for index, item in enumerate(result.labels):
            if item.kept:
                contours, _ = cv2.findContours(
                    item.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
                )
                cv2.drawContours(canvas, contours, -1, PALETTE[index % len(PALETTE)], thickness)
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ImageError(f"cannot encode overlay for {stem}")
        (self.out_dir / "overlays" / f"{stem}.jpg").write_bytes(data.tobytes())


class SummaryWriter:
    """``summary.csv``, written row by row so an interrupted run still has its rows."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(SUMMARY_FIELDS)

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def rows(self, name: str, result: ImagePrediction) -> None:
        area = result.width * result.height
        for item in result.labels:
            self._csv.writerow(
                (
                    name,
                    result.width,
                    result.height,
                    item.label,
                    item.pixels,
                    f"{item.pixels / area:.6f}",
                    f"{item.threshold:g}",
                    int(item.kept),
                    "",
                )
            )
        self._file.flush()

    def failure(self, name: str, reason: str) -> None:
        self._csv.writerow((name, "", "", "", "", "", "", "", reason))
        self._file.flush()


def _write_png(path: Path, mask: np.ndarray, scale: bool = True) -> None:
    data = mask.astype(np.uint8) * 255 if scale else mask
    ok, encoded = cv2.imencode(".png", data)
    if not ok:
        raise ImageError(f"cannot encode {path.name}")
    path.write_bytes(encoded.tobytes())
