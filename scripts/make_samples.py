"""Write the bundled sample images (samples/images/) that the README's first command runs on.

Seeded synthetic scenes from service.local.synthetic at a few sizes, saved as JPEG; one is stored
sideways with an EXIF orientation tag, as phone photos often are. Run from the repo root:

    .venv/bin/python scripts/make_samples.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.local.synthetic import make_sample  # noqa: E402

SIZES = ((480, 640), (512, 512), (640, 480), (360, 480), (600, 800), (400, 560))


def main() -> None:
    out = ROOT / "samples" / "images"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261124)
    for index, (height, width) in enumerate(SIZES):
        sample = make_sample(rng, height, width)
        image = Image.fromarray(sample.image)
        name = out / f"sample_{index + 1:02d}.jpg"
        if index == len(SIZES) - 1:
            # Stored rotated 90 degrees counter-clockwise; EXIF 6 tells viewers to turn it back.
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(name, quality=90, exif=exif)
        else:
            image.save(name, quality=90)
        print(name.relative_to(ROOT))


if __name__ == "__main__":
    main()
