from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageError
from service.model.images import decode_image, list_images, read_image

LIMIT = 10_000_000


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_rgb_png_round_trips_exactly() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), max_pixels=LIMIT)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize(("orientation", "shape"), [(1, (20, 40)), (6, (40, 20)), (8, (40, 20))])
def test_exif_orientation_is_applied(orientation: int, shape: tuple[int, int]) -> None:
    # 40 wide x 20 high, left half red, right half blue.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    out = decode_image(data, max_pixels=LIMIT)
    assert out.shape[:2] == shape
    if orientation == 6:  # rotated 90 degrees clockwise for display: left half goes on top
        assert out[5, 10, 0] > 200 and out[35, 10, 2] > 200
    if orientation == 8:  # 90 counter-clockwise: left half goes to the bottom
        assert out[35, 10, 0] > 200 and out[5, 10, 2] > 200


def test_grayscale_palette_and_alpha_become_rgb() -> None:
    gray = Image.fromarray(np.full((5, 6), 77, dtype=np.uint8), "L")
    np.testing.assert_array_equal(decode_image(encode(gray, "PNG"), max_pixels=LIMIT), 77)

    palette = gray.convert("P")
    assert decode_image(encode(palette, "PNG"), max_pixels=LIMIT).shape == (5, 6, 3)

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque red, bottom fully transparent -> white
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=LIMIT)
    np.testing.assert_array_equal(out[0, 0], (200, 0, 0))
    np.testing.assert_array_equal(out[3, 0], (255, 255, 255))


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    out = decode_image(data, max_pixels=LIMIT)
    assert out.shape == (1, 3, 3)
    assert list(out[0, :, 0]) == [0, 127, 255]


def test_corrupt_and_empty_and_truncated_data_fail_with_reasons() -> None:
    with pytest.raises(ImageError, match=r"x\.jpg: not a JPEG, PNG, WebP, GIF, BMP or TIFF"):
        decode_image(b"this is not an image at all", max_pixels=LIMIT, name="x.jpg")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", max_pixels=LIMIT)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(pixels), "JPEG")
    with pytest.raises(ImageError, match=r"x\.jpg: corrupt or truncated"):
        decode_image(jpeg[: len(jpeg) // 2], max_pixels=LIMIT, name="x.jpg")


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("MPO", {}),
    ],
)
def test_every_format_a_browser_shows_is_decoded(fmt: str, kwargs: dict[str, object]) -> None:
    img = Image.new("RGB", (6, 4), (200, 10, 10))
    out = decode_image(encode(img, fmt, **kwargs), max_pixels=LIMIT)
    assert out.shape == (4, 6, 3)
    assert out[0, 0, 0] > 150 and out[0, 0, 1] < 60


@pytest.mark.parametrize(
    ("fmt", "reason"),
    [
        ("EPS", r"PostScript/EPS is not an image format a browser shows"),
        ("PPM", r"PBM/PGM/PPM is not an image format a browser shows"),
        ("ICO", r"ICO is not an image format a browser shows"),
        ("PCX", r"not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
        ("TGA", r"not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
        ("SGI", r"not a JPEG, PNG, WebP, GIF, BMP or TIFF image"),
    ],
)
def test_formats_a_browser_does_not_show_fail_with_a_reason(fmt: str, reason: str) -> None:
    data = encode(Image.new("RGB", (8, 8), (1, 2, 3)), fmt)
    Image.open(io.BytesIO(data)).verify()  # Pillow itself reads it: only our check refuses
    with pytest.raises(ImageError, match=rf"^x\.{fmt.lower()}: {reason}"):
        decode_image(data, max_pixels=LIMIT, name=f"x.{fmt.lower()}")


def test_documents_pillow_cannot_read_are_named_too() -> None:
    for data, kind in ((b"%PDF-1.7\n%", "PDF"), (b'<?xml version="1.0"?><svg/>', "XML/SVG")):
        with pytest.raises(ImageError, match=rf"^doc: {kind} is not an image format"):
            decode_image(data, max_pixels=LIMIT, name="doc")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds almost no data: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_refuses_before_decoding() -> None:
    with pytest.raises(ImageError, match=r"bomb.png: 5000x3000 is 15 megapixels, over the limit"):
        decode_image(png_header_only(5000, 3000), max_pixels=LIMIT, name="bomb.png")
    with pytest.raises(ImageError, match=r"bomb.png: 1600 megapixels, over the limit of 10 "):
        decode_image(png_header_only(40000, 40000), max_pixels=LIMIT, name="bomb.png")
    # Over Pillow's own hard limit too: still our error type, never MemoryError.
    with pytest.raises(ImageError, match=r"1600 megapixels, over the limit of 179"):
        decode_image(png_header_only(40000, 40000), max_pixels=2_000_000_000, name="bomb.png")


def test_read_image_and_list_images(tmp_path: Path) -> None:
    Image.new("RGB", (3, 2), (1, 2, 3)).save(tmp_path / "b.png")
    Image.new("RGB", (3, 2)).save(tmp_path / "a.JPG")
    (tmp_path / "notes.txt").write_text("x")
    Image.new("RGB", (3, 2)).save(tmp_path / "c.ppm")  # no browser shows it: not listed
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    np.testing.assert_array_equal(read_image(tmp_path / "b.png", max_pixels=LIMIT)[0, 0], (1, 2, 3))
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(tmp_path / "missing.png", max_pixels=LIMIT)
