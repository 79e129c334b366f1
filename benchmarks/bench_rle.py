"""Time service.results.rle against Label Studio's own brush codec, in the same process.

Needs label_studio_sdk, which lives only in Label Studio's virtual environment, so run it
with that environment's Python from the repository root:

    ~/.cache/ls-autoseg/lsvenv-1.23.2/bin/python benchmarks/bench_rle.py

Two masks: a 4096x3072 mask of a few seeded ellipses and polygons (~18% foreground, what a
segmentation model gives) and 1024x1024 uniform noise (p = 0.5, the worst case: a run per
two pixels). It first checks that our bytes equal the SDK's and that both decoders agree
(and stops if not), then prints the median time of several runs of each (the SDK's and ours
interleaved, so that both see the same load on a shared machine), and the ratio against its
target. Takes well under a minute, most of it in the SDK's noise decoder.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.results import rle

TARGETS = {"encode": {"blobs": 15.0, "noise": 5.0}, "decode": {"blobs": 10.0, "noise": 10.0}}
SEED = 20251124


def blob_mask(height: int = 3072, width: int = 4096, fraction: float = 0.18) -> np.ndarray:
    """Seeded ellipses and convex polygons, added until ``fraction`` of the mask is covered."""
    rng = np.random.default_rng(SEED)
    mask = np.zeros((height, width), dtype=bool)
    while mask.mean() < fraction:
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(60, 420), rng.uniform(60, 560)
        top, bottom = int(max(cy - ry, 0)), int(min(cy + ry + 1, height))
        left, right = int(max(cx - rx, 0)), int(min(cx + rx + 1, width))
        if top >= bottom or left >= right:
            continue
        ys = np.arange(top, bottom, dtype=np.float64)[:, None] - cy
        xs = np.arange(left, right, dtype=np.float64)[None, :] - cx
        if rng.random() < 0.5:
            inside = (ys / ry) ** 2 + (xs / rx) ** 2 <= 1.0
        else:
            # A convex polygon: corners on the ellipse at sorted random angles.
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))))
            py, px = ry * np.sin(angles), rx * np.cos(angles)
            inside = np.ones(ys.shape[0:1] + xs.shape[1:2], dtype=bool)
            for k in range(angles.size):
                y0, x0 = py[k], px[k]
                y1, x1 = py[(k + 1) % angles.size], px[(k + 1) % angles.size]
                inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
        mask[top:bottom, left:right] |= inside
    return mask.astype(np.uint8) * 255


def noise_mask(size: int = 1024) -> np.ndarray:
    return (np.random.default_rng(SEED).random((size, size)) < 0.5).astype(np.uint8) * 255


def _timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1000.0


def compare_ms(
    sdk: Callable[[], Any], ours: Callable[[], Any], rounds: int, per_round: int
) -> tuple[float, float]:
    """Median ms of ``sdk`` and of ``ours``, interleaved so both see the same machine load.

    Each round times the SDK once and ours ``per_round`` times.
    """
    sdk_times: list[float] = []
    our_times: list[float] = []
    for _ in range(rounds):
        sdk_times.append(_timed(sdk))
        our_times.extend(_timed(ours) for _ in range(per_round))
    return statistics.median(sdk_times), statistics.median(our_times)


def main() -> int:
    try:
        from label_studio_sdk.converter.brush import decode_rle, mask2rle
    except ImportError:
        print(
            "label_studio_sdk is not importable from this Python. Run the benchmark with "
            "Label Studio's venv:\n"
            "    ~/.cache/ls-autoseg/lsvenv-1.23.2/bin/python benchmarks/bench_rle.py",
            file=sys.stderr,
        )
        return 2

    cases = {"blobs": blob_mask(), "noise": noise_mask()}
    # (rounds, our runs per round): the SDK runs once a round.
    repeats = {"blobs": (9, 5), "noise": (3, 3)}
    print(f"numpy {np.__version__}, python {sys.version.split()[0]}")
    for name, mask in cases.items():
        h, w = mask.shape
        print(f"{name}: {w}x{h}, {mask.mean() / 255:.1%} foreground")

    lines = []
    failed = False
    for name, mask in cases.items():
        sdk_rle = mask2rle(mask)
        if rle.encode(mask) != sdk_rle:
            print(f"ABORT: encode({name}) differs from the SDK's mask2rle", file=sys.stderr)
            return 1
        sdk_alpha = decode_rle(sdk_rle).reshape(*mask.shape, 4)[..., 3]
        if not np.array_equal(rle.decode(sdk_rle, *mask.shape), sdk_alpha):
            print(f"ABORT: decode({name}) differs from the SDK's decode_rle", file=sys.stderr)
            return 1
        if not np.array_equal(rle.decode_words(sdk_rle), decode_rle(sdk_rle)):
            print(f"ABORT: decode_words({name}) differs from decode_rle", file=sys.stderr)
            return 1

        rounds, per_round = repeats[name]
        timings = {
            "encode": compare_ms(
                lambda m=mask: mask2rle(m), lambda m=mask: rle.encode(m), rounds, per_round
            ),
            "decode": compare_ms(
                lambda r=sdk_rle: decode_rle(r),
                lambda r=sdk_rle, s=mask.shape: rle.decode(r, *s),
                rounds,
                per_round,
            ),
        }
        for operation, (sdk_ms, ours_ms) in timings.items():
            ratio = sdk_ms / ours_ms
            target = TARGETS[operation][name]
            verdict = "PASS" if ratio >= target else "FAIL"
            failed |= verdict == "FAIL"
            lines.append(
                f"{operation} {name}: sdk {sdk_ms:.1f} ms, ours {ours_ms:.1f} ms, "
                f"ratio {ratio:.1f}x (target >= {target:g}x: {verdict})"
            )
        words_ms = statistics.median(
            _timed(lambda r=sdk_rle: rle.decode_words(r)) for _ in range(rounds * per_round)
        )
        lines.append(
            f"decode_words {name} (flat RGBA words, like decode_rle): ours {words_ms:.1f} ms, "
            f"ratio {timings['decode'][0] / words_ms:.1f}x (no target)"
        )
        print(lines[-3], lines[-2], lines[-1], sep="\n", flush=True)
    print("all targets met" if not failed else "SOME TARGETS MISSED")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
