"""Check a TorchScript segmentation model against held-out synthetic shapes.

    .venv/bin/python scripts/eval_demo_model.py                  # models/demo_unet.pt
    .venv/bin/python scripts/eval_demo_model.py other.pt --min-iou 0.9

Feeds the model the way the runner's demo config does: each image resized to 256x256
(stretched if its aspect ratio differs), RGB scaled to [0, 1] and standardised with the
training mean/std, sigmoid on the logits, probabilities resized back to the image with
bilinear interpolation, then each class thresholded at 0.5 on its own. IoU per class is summed
intersections over summed unions across the whole set. Exits 1 if any class is below
``--min-iou``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # Runs from a checkout without installing the package.
    sys.path.insert(0, str(REPO))

from service.local.synthetic import LABELS, make_sample  # noqa: E402

# Must match scripts/train_demo_model.py and the demo config.yaml.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
INPUT_SIZE = (256, 256)  # height, width
THRESHOLD = 0.5
# Training draws its seeds as [seed, index] with small seeds, and 1_000_000 + seed for its
# own held-out set; this one is apart from both.
EVAL_SEED = 7_000_000
# (height, width) of the sets and how many images each: square at the model's input size, and
# landscape / portrait images that the runner stretches to it.
SETS = (((256, 256), 200), ((240, 320), 25), ((320, 240), 25))


def load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch marks its TorchScript loader deprecated; TorchScript is still the contract.
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu")
    model.eval()
    return model


def predict(model: torch.jit.ScriptModule, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB of one size -> (N, C, H, W) bool masks, as the runner makes them."""
    height, width = images.shape[1:3]
    if (height, width) != INPUT_SIZE:
        size = (INPUT_SIZE[1], INPUT_SIZE[0])
        images = np.stack([cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = torch.sigmoid(model(x.contiguous()))
    if probabilities.shape[-2:] != (height, width):
        probabilities = F.interpolate(
            probabilities, size=(height, width), mode="bilinear", align_corners=False
        )
    masks: np.ndarray = (probabilities >= THRESHOLD).numpy()
    return masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=REPO / "models" / "demo_unet.pt")
    parser.add_argument("--min-iou", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    labels = len(LABELS)
    totals = {"intersection": np.zeros(labels), "union": np.zeros(labels)}
    rows: list[tuple[str, np.ndarray]] = []
    index = 0
    for (height, width), count in SETS:
        intersection, union = np.zeros(labels), np.zeros(labels)
        for start in range(0, count, args.batch):
            samples = []
            for _ in range(min(args.batch, count - start)):
                samples.append(
                    make_sample(np.random.default_rng([args.seed, index]), height, width)
                )
                index += 1
            predicted = predict(model, np.stack([s.image for s in samples]))
            truth = np.stack([s.masks for s in samples])
            if predicted.shape != truth.shape:
                print(f"model output {predicted.shape} does not match {truth.shape}")
                return 2
            intersection += (predicted & truth).sum(axis=(0, 2, 3))
            union += (predicted | truth).sum(axis=(0, 2, 3))
        rows.append((f"{count} x {height}x{width}", intersection / np.maximum(union, 1)))
        totals["intersection"] += intersection
        totals["union"] += union
    overall = totals["intersection"] / np.maximum(totals["union"], 1)

    print(f"model {args.model}, {index} images (height x width), seed {args.seed}")
    print(f"{'IoU':<18}" + "".join(f"{label:>11}" for label in LABELS) + f"{'mean':>11}")
    for name, ious in [*rows, ("all", overall)]:
        print(f"{name:<18}" + "".join(f"{iou:>11.4f}" for iou in ious) + f"{ious.mean():>11.4f}")
    failing = [label for label, iou in zip(LABELS, overall, strict=True) if iou < args.min_iou]
    verdict = f"FAIL: {', '.join(failing)} below" if failing else "ok: every class at or above"
    print(f"{verdict} {args.min_iou} ({time.perf_counter() - started:.0f}s)")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
