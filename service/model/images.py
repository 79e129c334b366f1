"""Image decoding: bytes or a file -> an RGB ``uint8`` array as a browser would show it.

Pillow reads the header first, so the pixel-count guard fires before any memory is spent on
a decompression bomb; EXIF orientation is applied because Label Studio's editor shows JPEGs
rotated as their EXIF says, and a mask must have the displayed width and height.

Only the formats a browser shows are opened (``BROWSER_FORMATS``): Label Studio's editor cannot
show anything else, so a mask for it is useless, and Pillow's other plugins (EPS runs
Ghostscript, PSD, ICNS, ...) are attack surface that a task's data must not reach.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageError

# Pillow's format names. The JPEG plugin also opens MPO, the multi-picture JPEG of cameras.
BROWSER_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
# Leading bytes of common formats outside BROWSER_FORMATS, to say what a refused file is.
_OTHER_FORMATS = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"icns", "ICNS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"P1", "PBM/PGM/PPM"),
    (b"P2", "PBM/PGM/PPM"),
    (b"P3", "PBM/PGM/PPM"),
    (b"P4", "PBM/PGM/PPM"),
    (b"P5", "PBM/PGM/PPM"),
    (b"P6", "PBM/PGM/PPM"),
    (b"gimp xcf", "GIMP XCF"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"DDS ", "DDS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
)


def read_image(path: Path, *, max_pixels: int) -> np.ndarray:
    """Decode an image file; see :func:`decode_image`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path.name}: cannot read file: {exc.strerror}") from exc
    return decode_image(data, max_pixels=max_pixels, name=path.name)


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> np.ndarray:
    """Decode to ``(H, W, 3) uint8`` RGB with EXIF orientation applied.

    Grayscale, palette, alpha, CMYK and 16-bit images are converted; transparent pixels are
    composited over white. Raises ImageError for unreadable, truncated or oversized images.
    """
    if not data:
        raise ImageError(f"{name}: empty file")
    with warnings.catch_warnings():
        # Our own max_pixels guard below replaces Pillow's bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=BROWSER_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(
                        f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, "
                        f"over the limit of {max_pixels / 1e6:.0f} (prediction.max_pixels)"
                    )
                img.load()
                # In place: a copy of every image costs ~0.5 ms at 1024x768 (most are upright).
                ImageOps.exif_transpose(img, in_place=True)
                return _to_rgb(img)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            # Pillow refuses twice its MAX_IMAGE_PIXELS (~179 MP) before we see the size.
            found = re.search(r"\((\d+) pixels\)", str(exc))
            pixels = int(found.group(1)) if found else 0
            raise ImageError(
                f"{name}: {pixels / 1e6:.0f} megapixels, over the limit of "
                f"{min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)) / 1e6:.0f} "
                "(prediction.max_pixels, capped by Pillow's decompression-bomb limit)"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: {_unsupported(data)}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the header alone, before any pixel is decoded; None when the
    data is no image :func:`decode_image` would open (it then says why)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=BROWSER_FORMATS) as img:
                return img.size
        except (Image.DecompressionBombError, OSError, SyntaxError, ValueError):
            return None  # UnidentifiedImageError is an OSError


def _unsupported(data: bytes) -> str:
    accepted = "JPEG, PNG, WebP, GIF, BMP or TIFF"
    head = data[:16].lstrip()
    kind = next((label for magic, label in _OTHER_FORMATS if head.startswith(magic)), None)
    if kind is not None:
        return f"{kind} is not an image format a browser shows; accepted: {accepted}"
    return f"not a {accepted} image (the formats a browser shows), or a corrupt one"


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit grayscale: scale the full 16-bit range down, not clip at 255.
        values = np.asarray(img).astype(np.float32)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
