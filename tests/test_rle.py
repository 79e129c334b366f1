"""service.results.rle against Label Studio's own codec (label_studio_sdk.converter.brush).

Golden data (tests/data/rle_golden.json.gz, written by scripts/make_rle_golden.py under
Label Studio's venv) holds, per recipe of tests/rle_cases.py, the SDK's ``mask2rle`` bytes;
the masks themselves are rebuilt here from the recipes. The ``labelstudio`` test runs a
fresh random set through the real SDK in a subprocess.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rle_cases

from service.errors import RLEError
from service.results import rle

TESTS = Path(__file__).resolve().parent
GOLDEN = json.loads(gzip.decompress((TESTS / "data" / "rle_golden.json.gz").read_bytes()))
STREAM_GOLDEN = {entry["recipe"]["name"]: entry for entry in GOLDEN["streams"]}


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [entry["recipe"]["name"] for entry in entries]


# ------------------------------------------------------------------------------------------
# Byte identity with the SDK, and round trips


@pytest.mark.parametrize("entry", GOLDEN["masks"], ids=_ids(GOLDEN["masks"]))
def test_encode_matches_sdk_and_decodes_back(entry: dict[str, Any]) -> None:
    mask = rle_cases.build_mask(entry["recipe"])
    assert rle_cases.mask_sha256(mask) == entry["mask_sha256"], (
        "the recipe no longer builds the mask the golden file was made from; "
        "rerun scripts/make_rle_golden.py"
    )
    expected = list(base64.b64decode(entry["rle"]))

    assert rle.encode(mask) == expected
    decoded = rle.decode(expected, *mask.shape)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


def test_golden_covers_the_edge_cases() -> None:
    names = {entry["recipe"]["name"] for entry in GOLDEN["masks"]}
    assert {recipe["name"] for recipe in rle_cases.edge_recipes()} <= names
    assert sum(name.startswith("random_") for name in names) >= 300


def test_golden_streams_hold_the_sdk_class_quirks() -> None:
    """mask2rle's quirks are in the golden data, so byte identity really checks them."""
    by_name = {e["recipe"]["name"]: base64.b64decode(e["rle"]) for e in GOLDEN["masks"]}
    # 90000 pixels = 360000 words: five 65536-word blocks and the rest, 27 bits each:
    # 53 + 6 * 27 = 215 bits, padded to 27 bytes.
    assert len(by_name["full_300x300"]) == 27
    # A 1x1 mask is one 4-word run in the 3-bit class: 53 + 14 = 67 bits -> 9 bytes.
    assert len(by_name["pixel_on_1x1"]) == 9
    # 16385 pixels are 65540 words: a 65536-word block, then the 4-word rest in the 16-bit
    # class (27 bits, not 14), then 7 pixels (28 words, 8-bit class, 19 bits): 126 bits.
    assert len(by_name["run_65540_words"]) == 16
    # 12288 words: one 27-bit block, 80 bits, already a whole byte: a zero byte follows.
    full = by_name["full_64x48"]
    assert len(full) == 11
    assert full[-1] == 0


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int64, np.float32])
def test_any_nonzero_pixel_is_opaque_foreground(dtype: Any) -> None:
    on = rle_cases.build_mask({"kind": "blobs", "h": 37, "w": 53, "n": 4, "seed": 5}) > 0
    reference = rle.encode(on.astype(np.uint8) * 255)
    assert rle.encode(on.astype(dtype)) == reference
    np.testing.assert_array_equal(rle.decode(rle.encode(on.astype(dtype)), 37, 53), on * 255)


def test_mixed_nonzero_values_and_views_encode_like_0_255() -> None:
    rng = np.random.default_rng(3)
    mask = rle_cases.build_mask({"kind": "noise", "h": 64, "w": 80, "p": 0.4, "seed": 8})
    shades = np.where(mask > 0, rng.integers(1, 256, mask.shape), 0).astype(np.uint8)
    assert rle.encode(shades) == rle.encode(mask)
    # Non-contiguous views: a transpose and a strided slice.
    assert rle.encode(mask.T) == rle.encode(np.ascontiguousarray(mask.T))
    assert rle.encode(mask[::3, 1::2]) == rle.encode(mask[::3, 1::2].copy())


def test_decode_accepts_list_bytes_and_arrays() -> None:
    mask = rle_cases.build_mask({"kind": "lines", "h": 30, "w": 40, "n": 5, "seed": 2})
    encoded = rle.encode(mask)
    assert all(isinstance(value, int) and 0 <= value <= 255 for value in encoded)
    for form in (
        encoded,
        bytes(encoded),
        bytearray(encoded),
        np.array(encoded, dtype=np.uint8),
        np.array(encoded, dtype=np.int64),
    ):
        np.testing.assert_array_equal(rle.decode(form, 30, 40), mask)


def test_decode_words_is_the_rgba_array() -> None:
    mask = rle_cases.build_mask({"kind": "checker", "h": 6, "w": 10, "cell": 2})
    words = rle.decode_words(rle.encode(mask))
    assert words.dtype == np.uint8
    np.testing.assert_array_equal(words, np.repeat(mask.reshape(-1), 4))


def test_large_streams_round_trip() -> None:
    """A stream of several MiB: the parser reads it in more than one window."""
    mask = rle_cases.build_mask({"kind": "noise", "h": 1500, "w": 1700, "p": 0.5, "seed": 4})
    encoded = rle.encode(mask)
    assert len(encoded) * 8 > 2 * rle._WINDOW_BITS
    np.testing.assert_array_equal(rle.decode(encoded, 1500, 1700), mask)


# ------------------------------------------------------------------------------------------
# Streams with block choices mask2rle never makes


STREAMS = rle_cases.stream_recipes()


@pytest.mark.parametrize("recipe", STREAMS, ids=[recipe["name"] for recipe in STREAMS])
def test_decode_any_valid_stream(recipe: dict[str, Any]) -> None:
    stream = rle_cases.build_stream(recipe)
    expected = rle_cases.stream_words(recipe)
    words = rle.decode_words(stream)

    np.testing.assert_array_equal(words.astype(np.int64), expected)
    bits = recipe["word_bits"]
    assert words.dtype == (np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)
    alpha = expected.reshape(recipe["h"], recipe["w"], 4)[..., 3]
    np.testing.assert_array_equal(
        rle.decode(stream, recipe["h"], recipe["w"]), np.where(alpha != 0, 255, 0)
    )
    golden = STREAM_GOLDEN.get(recipe["name"])
    if bits <= 8:
        assert golden is not None, "stream missing from the golden file: regenerate it"
        assert hashlib.sha256(stream).hexdigest() == golden["stream_sha256"]
        # The SDK's decode_rle read the same words from the same stream.
        assert hashlib.sha256(words.tobytes()).hexdigest() == golden["words_sha256"]


def _stream(bits: str) -> bytes:
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def test_decode_hand_written_literal_and_repeat_blocks() -> None:
    """One pixel (255, 0, 0, 255), one transparent pixel, written block by block.

    Header: 8 words, 8-bit words, classes of 2, 3, 4, 5 bits. Then a literal block of 4
    words (class 0, 2 bits, count-1 = 3), a repeat block of 3 zero words (class 1, 3 bits,
    count-1 = 2) and a one-word literal (class 3, 5 bits).
    """
    header = f"{8:032b}" + f"{7:05b}" + "0001" + "0010" + "0011" + "0100"
    literal = "0" + "00" + "11" + "11111111" + "00000000" + "00000000" + "11111111"
    repeat = "1" + "01" + "010" + "00000000"
    single = "0" + "11" + "00000" + "00000000"
    stream = _stream(header + literal + repeat + single)

    np.testing.assert_array_equal(rle.decode_words(stream), [255, 0, 0, 255, 0, 0, 0, 0])
    np.testing.assert_array_equal(rle.decode(stream, 1, 2), [[255, 0]])


def test_decode_one_bit_words() -> None:
    header = f"{8:032b}" + f"{0:05b}" + "0000" * 4  # 1-bit words, every class 1 bit
    blocks = [
        "1" + "00" + "1" + "1",  # repeat 2 x 1
        "0" + "00" + "1" + "0" + "1",  # literal 0, 1
        "1" + "00" + "1" + "1",  # repeat 2 x 1
        "1" + "11" + "1" + "1",  # repeat 2 x 1, class 3
    ]
    np.testing.assert_array_equal(
        rle.decode_words(_stream(header + "".join(blocks))), [1, 1, 0, 1, 1, 1, 1, 1]
    )


# ------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), (1, 1, 1)])
def test_encode_refuses_masks_that_are_not_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(RLEError, match="2-D"):
        rle.encode(np.zeros(shape, dtype=np.uint8))


def test_encode_refuses_masks_without_pixels() -> None:
    with pytest.raises(RLEError, match="no pixels"):
        rle.encode(np.zeros((0, 5), dtype=np.uint8))


def test_encode_refuses_masks_over_the_32_bit_word_count() -> None:
    # A broadcast view: the shape of a 1 GiB mask without the memory.
    huge = np.broadcast_to(np.uint8(255), (32768, 32769))
    with pytest.raises(RLEError, match="32 bits"):
        rle.encode(huge)
    rle.check_shape(1, rle.MAX_PIXELS)
    with pytest.raises(RLEError, match="32 bits"):
        rle.check_shape(1, rle.MAX_PIXELS + 1)
    assert rle.MAX_PIXELS * 4 <= 2**32 - 1 < (rle.MAX_PIXELS + 1) * 4


def test_decode_refuses_truncated_streams() -> None:
    mask = rle_cases.build_mask({"kind": "blobs", "h": 40, "w": 50, "n": 3, "seed": 9})
    encoded = rle.encode(mask)
    # The last byte may be only padding; every shorter prefix misses block bits.
    for cut in range(len(encoded) - 1):
        with pytest.raises(RLEError):
            rle.decode(encoded[:cut], 40, 50)
    # 1x1: 67 bits in 9 bytes; 8 bytes cut the last word in half (zeros must not fill it).
    one = rle.encode(np.ones((1, 1), dtype=np.uint8))
    with pytest.raises(RLEError, match="truncated"):
        rle.decode(one[:8], 1, 1)


def test_decode_refuses_a_wrong_size_and_bad_input() -> None:
    encoded = rle.encode(np.full((4, 5), 255, dtype=np.uint8))
    with pytest.raises(RLEError, match="80 words"):
        rle.decode(encoded, 5, 5)
    with pytest.raises(RLEError, match=r"0\.\.255"):
        rle.decode([*encoded[:-1], 256], 4, 5)
    with pytest.raises(RLEError):
        rle.decode(np.array([encoded]), 4, 5)
    with pytest.raises(RLEError):
        rle.decode(7, 4, 5)  # type: ignore[arg-type]
    with pytest.raises(RLEError, match="header"):
        rle.decode(encoded[:6], 4, 5)


def test_decode_refuses_blocks_past_the_word_count() -> None:
    header = f"{8:032b}" + f"{7:05b}" + "0010" + "0011" + "0111" + "1111"
    too_long = "1" + "00" + "111" + "11111111"  # 8 words
    with pytest.raises(RLEError, match="past"):
        rle.decode_words(_stream(f"{4:032b}" + header[32:] + too_long))
    # And one block short of the count.
    with pytest.raises(RLEError, match="truncated"):
        rle.decode_words(_stream(f"{16:032b}" + header[32:] + too_long))


# ------------------------------------------------------------------------------------------
# Against the real SDK, fresh cases


SDK_SCRIPT = textwrap.dedent(
    """
    import base64, json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import rle_cases
    from label_studio_sdk.converter.brush import decode_rle, mask2rle
    job = json.load(sys.stdin)
    out = {"masks": [], "streams": []}
    for recipe in job["masks"]:
        rle = bytes(mask2rle(rle_cases.build_mask(recipe)))
        out["masks"].append(base64.b64encode(rle).decode())
    for recipe in job["streams"]:
        words = np.asarray(decode_rle(list(rle_cases.build_stream(recipe))), dtype=np.uint8)
        out["streams"].append(base64.b64encode(words.tobytes()).decode())
    json.dump(out, sys.stdout)
    """
)


@pytest.mark.labelstudio
def test_fresh_cases_against_the_sdk() -> None:
    from service.local.lsserver import installed_python

    python = installed_python()
    if python is None or not python.is_file():
        pytest.skip(
            "Label Studio's venv is not installed (service.local.lsserver.ensure_installed)"
        )
    seed = int.from_bytes(os.urandom(4), "big")
    masks = [
        *rle_cases.random_recipes(60, seed),
        {"name": "big_blobs", "kind": "blobs", "h": 700, "w": 900, "n": 6, "seed": seed},
        {"name": "big_noise", "kind": "noise", "h": 300, "w": 250, "p": 0.5, "seed": seed},
    ]
    streams = [
        {**recipe, "seed": (recipe["seed"] + seed) % 2**31}
        for recipe in rle_cases.stream_recipes()
        if recipe["word_bits"] <= 8
    ]
    result = subprocess.run(
        [str(python), "-c", SDK_SCRIPT, str(TESTS)],
        input=json.dumps({"masks": masks, "streams": streams}),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sdk = json.loads(result.stdout)
    for recipe, expected in zip(masks, sdk["masks"], strict=True):
        mask = rle_cases.build_mask(recipe)
        sdk_rle = list(base64.b64decode(expected))
        assert rle.encode(mask) == sdk_rle, f"{recipe} (seed {seed})"
        np.testing.assert_array_equal(rle.decode(sdk_rle, *mask.shape), mask)
    for recipe, expected in zip(streams, sdk["streams"], strict=True):
        words = rle.decode_words(rle_cases.build_stream(recipe))
        assert words.tobytes() == base64.b64decode(expected), f"{recipe} (seed {seed})"
