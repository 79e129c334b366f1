"""Mask and stream recipes shared by ``scripts/make_rle_golden.py`` and ``tests/test_rle.py``.

A recipe is a small JSON-able dict; ``build_mask(recipe)`` makes the same 0/255 uint8 mask
from it in any environment, so the golden file stores recipes and the SDK's output, never
the masks. The golden file also stores each mask's sha256, which catches a recipe that
stopped building the same mask (say, a numpy release that changes a random stream).

``build_stream`` writes valid brush RLE streams with block choices that ``mask2rle`` never
makes (literal blocks of several words, repeat blocks of one word, runs split anywhere,
other word sizes and run-size classes), to check that a decoder reads any valid stream.

Only numpy and the standard library: the generator runs this under Label Studio's own
virtual environment, the tests under ours.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import numpy.typing as npt

Recipe = dict[str, Any]
Mask = npt.NDArray[np.uint8]

FOREGROUND = 255

# Pixel runs whose word counts (4 per pixel) sit on mask2rle's class limits: 8, 16 and 256
# words, and 65536 words, where it starts splitting a run into 65536-word blocks.
LADDER = [1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32767, 32768, 32769, 49152, 49153]


def mask_sha256(mask: Mask) -> str:
    """Fingerprint of a mask's shape and pixels."""
    digest = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def build_mask(recipe: Recipe) -> Mask:
    """The 0/255 uint8 mask a recipe describes."""
    kind, h, w = recipe["kind"], int(recipe["h"]), int(recipe["w"])
    rows = np.arange(h)[:, None]
    cols = np.arange(w)[None, :]
    if kind == "fill":
        on = np.full((h, w), bool(recipe["value"]))
    elif kind == "runs":
        lengths = np.asarray(recipe["runs"], dtype=np.int64)
        if int(lengths.sum()) != h * w:
            raise ValueError(f"runs sum to {int(lengths.sum())}, not {h * w}")
        values = (np.arange(lengths.size) + int(recipe["first"])) % 2 == 1
        on = np.repeat(values, lengths).reshape(h, w)
    elif kind == "hstripes":
        on = np.broadcast_to((rows // int(recipe["period"])) % 2 == 0, (h, w))
    elif kind == "vstripes":
        on = np.broadcast_to((cols // int(recipe["period"])) % 2 == 0, (h, w))
    elif kind == "checker":
        cell = int(recipe["cell"])
        on = (rows // cell + cols // cell) % 2 == 0
    elif kind == "noise":
        on = np.random.default_rng(int(recipe["seed"])).random((h, w)) < float(recipe["p"])
    elif kind == "blobs":
        on = _blobs(h, w, int(recipe["n"]), int(recipe["seed"]))
    elif kind == "lines":
        on = _lines(h, w, int(recipe["n"]), int(recipe["seed"]))
    else:
        raise ValueError(f"unknown mask recipe kind {kind!r}")
    return np.where(on, np.uint8(FOREGROUND), np.uint8(0))


def _blobs(h: int, w: int, n: int, seed: int) -> npt.NDArray[np.bool_]:
    """Ellipses and rectangles of random size and place, possibly cut by the border."""
    rng = np.random.default_rng(seed)
    rows = np.arange(h)[:, None].astype(np.float64)
    cols = np.arange(w)[None, :].astype(np.float64)
    on = np.zeros((h, w), dtype=np.bool_)
    for _ in range(n):
        cy, cx = rng.random() * h, rng.random() * w
        ry, rx = 0.5 + rng.random() * h / 3, 0.5 + rng.random() * w / 3
        if rng.random() < 0.7:
            on |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        else:
            on |= (np.abs(rows - cy) <= ry) & (np.abs(cols - cx) <= rx)
    return on


def _lines(h: int, w: int, n: int, seed: int) -> npt.NDArray[np.bool_]:
    """Thin horizontal, vertical and diagonal strokes: many short runs."""
    rng = np.random.default_rng(seed)
    on = np.zeros((h, w), dtype=np.bool_)
    for _ in range(n):
        width = 1 + int(rng.integers(0, 3))
        direction = int(rng.integers(0, 3))
        if direction == 0:
            r = int(rng.integers(0, h))
            on[r : r + width, :] = True
        elif direction == 1:
            c = int(rng.integers(0, w))
            on[:, c : c + width] = True
        else:
            offset = int(rng.integers(-w, h))
            rows = np.arange(h)[:, None]
            cols = np.arange(w)[None, :]
            on |= np.abs(rows - cols - offset) < width
    return on


def edge_recipes() -> list[Recipe]:
    """Named edge cases: empty/full, 1x1, stripes, run-length limits, odd shapes."""
    return [
        {"name": "empty_64x48", "kind": "fill", "h": 48, "w": 64, "value": 0},
        {"name": "full_64x48", "kind": "fill", "h": 48, "w": 64, "value": 1},
        {"name": "pixel_off_1x1", "kind": "fill", "h": 1, "w": 1, "value": 0},
        {"name": "pixel_on_1x1", "kind": "fill", "h": 1, "w": 1, "value": 1},
        {"name": "full_300x300", "kind": "fill", "h": 300, "w": 300, "value": 1},
        {"name": "empty_300x300", "kind": "fill", "h": 300, "w": 300, "value": 0},
        {
            "name": "half_300x300",
            "kind": "runs",
            "h": 300,
            "w": 300,
            "first": 1,
            "runs": [45000, 45000],
        },
        {
            "name": "half_300x300_bottom",
            "kind": "runs",
            "h": 300,
            "w": 300,
            "first": 0,
            "runs": [45000, 45000],
        },
        # 16384 pixels = 65536 words: exactly one full block, then one word-run past it.
        {
            "name": "run_65536_words",
            "kind": "runs",
            "h": 1,
            "w": 16384 + 7,
            "first": 1,
            "runs": [16384, 7],
        },
        {
            "name": "run_65540_words",
            "kind": "runs",
            "h": 1,
            "w": 16385 + 7,
            "first": 1,
            "runs": [16385, 7],
        },
        {
            "name": "run_65532_words",
            "kind": "runs",
            "h": 1,
            "w": 16383 + 7,
            "first": 1,
            "runs": [16383, 7],
        },
        {
            "name": "run_131072_words",
            "kind": "runs",
            "h": 128,
            "w": 257,
            "first": 0,
            "runs": [32768, 128 * 257 - 32768],
        },
        {
            "name": "run_ladder",
            "kind": "runs",
            "h": 1,
            "w": sum(LADDER),
            "first": 0,
            "runs": LADDER,
        },
        {
            "name": "run_ladder_fg_first",
            "kind": "runs",
            "h": 1,
            "w": sum(LADDER),
            "first": 1,
            "runs": LADDER,
        },
        {"name": "hstripes_1px_40x33", "kind": "hstripes", "h": 40, "w": 33, "period": 1},
        {"name": "vstripes_1px_40x33", "kind": "vstripes", "h": 40, "w": 33, "period": 1},
        {"name": "hstripes_3px_50x70", "kind": "hstripes", "h": 50, "w": 70, "period": 3},
        {"name": "vstripes_17px_31x200", "kind": "vstripes", "h": 31, "w": 200, "period": 17},
        {"name": "checker_1px_32x32", "kind": "checker", "h": 32, "w": 32, "cell": 1},
        {"name": "checker_1px_7x13", "kind": "checker", "h": 7, "w": 13, "cell": 1},
        {"name": "checker_5px_45x61", "kind": "checker", "h": 45, "w": 61, "cell": 5},
        {"name": "blobs_1x5000", "kind": "blobs", "h": 1, "w": 5000, "n": 6, "seed": 11},
        {"name": "blobs_5000x1", "kind": "blobs", "h": 5000, "w": 1, "n": 6, "seed": 12},
        {"name": "noise_1x5000", "kind": "noise", "h": 1, "w": 5000, "p": 0.5, "seed": 13},
        {"name": "noise_5000x1", "kind": "noise", "h": 5000, "w": 1, "p": 0.3, "seed": 14},
        {"name": "noise_7x13", "kind": "noise", "h": 7, "w": 13, "p": 0.5, "seed": 15},
        {"name": "blobs_7x13", "kind": "blobs", "h": 7, "w": 13, "n": 2, "seed": 16},
        {"name": "noise_100x100", "kind": "noise", "h": 100, "w": 100, "p": 0.5, "seed": 17},
        {"name": "noise_sparse_120x90", "kind": "noise", "h": 120, "w": 90, "p": 0.02, "seed": 18},
        {"name": "noise_dense_90x120", "kind": "noise", "h": 90, "w": 120, "p": 0.98, "seed": 19},
        {"name": "blobs_400x600", "kind": "blobs", "h": 400, "w": 600, "n": 5, "seed": 20},
        {"name": "lines_256x256", "kind": "lines", "h": 256, "w": 256, "n": 20, "seed": 21},
    ]


def random_recipes(count: int, seed: int) -> list[Recipe]:
    """``count`` seeded random recipes of varied size, density and structure."""
    rng = np.random.default_rng(seed)
    recipes: list[Recipe] = []
    for i in range(count):
        kind = str(
            rng.choice(["noise", "blobs", "blobs", "lines", "hstripes", "vstripes", "checker"])
        )
        shape = int(rng.integers(0, 4))
        if shape == 0:  # skinny
            h, w = (
                (1, int(rng.integers(1, 3000)))
                if rng.random() < 0.5
                else (int(rng.integers(1, 3000)), 1)
            )
        elif shape == 1:  # small
            h, w = int(rng.integers(1, 24)), int(rng.integers(1, 24))
        else:
            h, w = int(rng.integers(16, 200)), int(rng.integers(16, 200))
        recipe: Recipe = {"name": f"random_{i:03d}_{kind}", "kind": kind, "h": h, "w": w}
        if kind == "noise":
            # Keep noise small: it costs the most bytes in the golden file.
            recipe["h"], recipe["w"] = min(h, 48), min(w, 48)
            recipe["p"] = float(rng.choice([0.01, 0.1, 0.5, 0.9, 0.99]))
            recipe["seed"] = int(rng.integers(0, 2**31))
        elif kind in ("blobs", "lines"):
            recipe["n"] = int(rng.integers(1, 8))
            recipe["seed"] = int(rng.integers(0, 2**31))
        elif kind in ("hstripes", "vstripes"):
            recipe["period"] = int(rng.integers(1, 9))
        else:
            recipe["cell"] = int(rng.integers(1, 9))
        recipes.append(recipe)
    return recipes


# ------------------------------------------------------------------------------------------
# Streams with other block choices


def stream_recipes() -> list[Recipe]:
    """Hand-built streams: word content, word size, run classes and block-choice style."""
    recipes: list[Recipe] = []
    styles = ["rgba", "runs", "random", "literal_only", "one_word_repeats"]
    class_sets = [[3, 4, 8, 16], [1, 2, 3, 4], [16, 16, 16, 16], [5, 7, 11, 13], [2, 6, 9, 16]]
    rng = np.random.default_rng(2024)
    for i in range(40):
        style = styles[i % len(styles)]
        classes = class_sets[(i // len(styles)) % len(class_sets)]
        word_bits = 8 if style == "rgba" or i % 3 else int(rng.integers(1, 9))
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        recipes.append(
            {
                "name": f"stream_{i:02d}_{style}_ws{word_bits}",
                "style": style,
                "h": h,
                "w": w,
                "word_bits": word_bits,
                "class_bits": classes,
                "seed": int(rng.integers(0, 2**31)),
            }
        )
    # Wider words than Label Studio writes: the SDK cannot decode these, our decoder can.
    for i, word_bits in enumerate([9, 12, 16, 24, 32]):
        recipes.append(
            {
                "name": f"stream_wide_{i}_ws{word_bits}",
                "style": "runs",
                "h": 13,
                "w": 11,
                "word_bits": word_bits,
                "class_bits": [2, 4, 8, 16],
                "seed": 100 + i,
            }
        )
    return recipes


def stream_words(recipe: Recipe) -> npt.NDArray[np.int64]:
    """The H*W*4 words a stream recipe encodes."""
    rng = np.random.default_rng(int(recipe["seed"]))
    h, w, word_bits = int(recipe["h"]), int(recipe["w"]), int(recipe["word_bits"])
    top = (1 << word_bits) - 1
    n = h * w * 4
    if recipe["style"] == "rgba":
        # What a brush stroke in a colour looks like: (r, g, b, 255) on (0, 0, 0, 0).
        on = build_mask({"kind": "blobs", "h": h, "w": w, "n": 3, "seed": recipe["seed"]}) > 0
        colour = np.array([int(rng.integers(0, 256)), 0, int(rng.integers(0, 256)), 255])
        return np.where(on[..., None], colour, 0).reshape(-1).astype(np.int64)
    # Runs of random lengths and values, some of them single words.
    lengths = rng.geometric(0.15, size=n)
    values = rng.integers(0, top + 1, size=lengths.size)
    values[rng.random(values.size) < 0.5] = 0
    return np.repeat(values, lengths)[:n].astype(np.int64)


def build_stream(recipe: Recipe) -> bytes:
    """A valid brush RLE stream for ``stream_words(recipe)`` with random block choices."""
    words = stream_words(recipe).tolist()
    rng = np.random.default_rng(int(recipe["seed"]) + 1)
    word_bits = int(recipe["word_bits"])
    classes = [int(c) for c in recipe["class_bits"]]
    style = recipe["style"]
    bits = [f"{len(words):032b}", f"{word_bits - 1:05b}"]
    bits += [f"{c - 1:04b}" for c in classes]
    i, n = 0, len(words)
    while i < n:
        run = 1
        while i + run < n and words[i + run] == words[i]:
            run += 1
        most = 1 << max(classes)
        if style == "one_word_repeats":
            repeat, count = True, 1
        elif style == "literal_only":
            repeat, count = False, int(rng.integers(1, min(n - i, most) + 1))
        elif run > 1 and rng.random() < 0.85:
            repeat = True
            count = run if rng.random() < 0.7 else int(rng.integers(1, run + 1))
            count = min(count, most)
        else:
            repeat = False
            count = int(rng.integers(1, min(n - i, 12, most) + 1))
        fitting = [k for k, c in enumerate(classes) if (1 << c) >= count]
        k = int(rng.choice(fitting))
        bits.append(("1" if repeat else "0") + f"{k:02b}" + f"{count - 1:0{classes[k]}b}")
        if repeat:
            bits.append(f"{words[i]:0{word_bits}b}")
        else:
            bits.extend(f"{v:0{word_bits}b}" for v in words[i : i + count])
        i += count
    text = "".join(bits)
    # Pad to a byte, sometimes the SDK's way (a whole zero byte when already aligned).
    pad = (-len(text)) % 8
    if pad == 0 and rng.random() < 0.5:
        pad = 8
    text += "0" * pad
    return int(text, 2).to_bytes(len(text) // 8, "big")
