from __future__ import annotations

import pytest

from service.commands.naming import image_file_name, match_key, sanitize


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/data/upload/1/e48e4582-img_0.jpg", "img_0.jpg"),
        ("/data/upload/12/0a1b2c3d-fa%C3%A7ade_%C3%BC.png", "façade_ü.png"),
        ("/data/upload/1/img_0.jpg", "img_0.jpg"),  # no prefix: nothing removed
        ("/data/local-files/?d=images/batch%201/cat%20one.jpg", "cat one.jpg"),
        ("https://cdn.example.com/a/b/photo.JPG?X-Amz-Signature=abc", "photo.JPG"),
        ("s3://bucket/folder/e48e4582-x.png", "e48e4582-x.png"),  # prefix only on uploads
    ],
)
def test_image_file_name(url: str, name: str) -> None:
    assert image_file_name(url) == name


def test_sanitize_matches_djangos_rules() -> None:
    assert sanitize(" img 0.jpg ") == "img_0.jpg"
    assert sanitize("façade ü (1).png") == "façade_ü_1.png"
    assert sanitize("a/b\\c:d.png") == "abcd.png"


def test_match_key_pairs_a_local_stem_with_the_stored_name() -> None:
    assert match_key("img 0") == match_key("img_0.jpg") == "img_0"
    assert match_key("façade ü (1)") == match_key(
        image_file_name("/data/upload/3/deadbeef-fa%C3%A7ade_%C3%BC_1.png")
    )
    assert match_key("img 0") != match_key("img 1")
