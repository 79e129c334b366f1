"""Write tests/data/rle_golden.json.gz: Label Studio's own brush RLE for the shared recipes.

Run it with the Python of Label Studio's virtual environment (it needs label_studio_sdk,
which never goes into ours), from the repository root:

    ~/.cache/ls-autoseg/lsvenv-1.23.2/bin/python scripts/make_rle_golden.py

It imports only label_studio_sdk, numpy and tests/rle_cases.py (the recipes, shared with
tests/test_rle.py so that the test rebuilds the same masks instead of storing them). For
every mask recipe it stores the mask's sha256 and ``mask2rle(mask)``; for every hand-built
stream with words of at most 8 bits (the SDK's decoder writes uint8) it stores the stream's
sha256 and the sha256 of ``decode_rle(stream)``. Rerun it after changing a recipe.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rle_cases  # noqa: E402

OUT = ROOT / "tests" / "data" / "rle_golden.json.gz"
RANDOM_SEED = 7
RANDOM_COUNT = 300


def main() -> int:
    try:
        from label_studio_sdk.converter.brush import decode_rle, mask2rle
    except ImportError:
        print(
            "label_studio_sdk is not importable: run this with Label Studio's venv python, "
            "e.g. ~/.cache/ls-autoseg/lsvenv-1.23.2/bin/python scripts/make_rle_golden.py",
            file=sys.stderr,
        )
        return 2

    masks = []
    recipes = rle_cases.edge_recipes() + rle_cases.random_recipes(RANDOM_COUNT, RANDOM_SEED)
    for recipe in recipes:
        mask = rle_cases.build_mask(recipe)
        rle = bytes(mask2rle(mask))
        alpha = decode_rle(list(rle)).reshape(*mask.shape, 4)[..., 3]
        if not np.array_equal(alpha, mask):
            raise SystemExit(f"{recipe['name']}: the SDK does not round-trip its own RLE")
        masks.append(
            {
                "recipe": recipe,
                "mask_sha256": rle_cases.mask_sha256(mask),
                "rle": base64.b64encode(rle).decode("ascii"),
            }
        )

    streams = []
    for recipe in rle_cases.stream_recipes():
        if recipe["word_bits"] > 8:
            continue
        stream = rle_cases.build_stream(recipe)
        words = np.asarray(decode_rle(list(stream)), dtype=np.uint8)
        if not np.array_equal(words, rle_cases.stream_words(recipe)):
            raise SystemExit(f"{recipe['name']}: the SDK decodes other words than were built")
        streams.append(
            {
                "recipe": recipe,
                "stream_sha256": hashlib.sha256(stream).hexdigest(),
                "words_sha256": hashlib.sha256(words.tobytes()).hexdigest(),
                "n_words": int(words.size),
            }
        )

    golden = {
        "generator": "scripts/make_rle_golden.py",
        "label_studio_sdk": metadata.version("label-studio-sdk"),
        "numpy": np.__version__,
        "random_seed": RANDOM_SEED,
        "random_count": RANDOM_COUNT,
        "masks": masks,
        "streams": streams,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(golden, separators=(",", ":"), sort_keys=True).encode()
    OUT.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    print(
        f"wrote {OUT.relative_to(ROOT)}: {len(masks)} masks, {len(streams)} streams, "
        f"{OUT.stat().st_size} bytes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
