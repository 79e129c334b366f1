"""Label Studio's files read from disk (``label_studio.media_root`` / ``local_files_root``,
service/labelstudio/disk.py), through the real client: what is under a root is read without a
request, a URL that normalises outside it is refused and nothing is read or fetched, and a
file not there is downloaded as before. Label Studio is an ``httpx.MockTransport`` that
records every request (the real server's layout is checked in test_quickstart_real.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.errors import ImageError, RefusedURL
from service.labelstudio.client import LabelStudioClient

TOKEN = "0123456789abcdef0123456789abcdef01234567"


def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Label Studio's media and local-files roots with a file each, and a secret beside."""
    media, local = tmp_path / "ls" / "media", tmp_path / "files"
    (media / "upload" / "3").mkdir(parents=True)
    (media / "upload" / "3" / "ab12cd34-img 1.png").write_bytes(b"uploaded image")
    (local / "set a").mkdir(parents=True)
    (local / "set a" / "img.png").write_bytes(b"local image")
    (tmp_path / "secret.txt").write_bytes(b"not for task data")
    return media, local, tmp_path / "secret.txt"


def download(
    tmp_path: Path, url: str, *, max_bytes: int | None = None
) -> tuple[bytes | BaseException, list[str]]:
    if not (tmp_path / "ls").exists():
        roots(tmp_path)
    media, local = tmp_path / "ls" / "media", tmp_path / "files"
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(200, content=b"over http", headers={"Content-Type": "image/png"})

    async def run() -> bytes | BaseException:
        async with LabelStudioClient(
            "http://ls.test",
            TOKEN,
            transport=httpx.MockTransport(handler),
            media_root=media,
            local_files_root=local,
        ) as client:
            try:
                if max_bytes is None:
                    return await client.files.download(1, url)
                return await client.files.download(1, url, max_bytes=max_bytes)
            except Exception as exc:
                return exc

    return asyncio.run(run()), asked


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/data/upload/3/ab12cd34-img%201.png", b"uploaded image"),
        ("/data/upload/3/ab12cd34-img 1.png", b"uploaded image"),
        ("/data/local-files/?d=set%20a/img.png", b"local image"),
        ("/data/local-files?d=set+a/img.png", b"local image"),
    ],
)
def test_files_under_a_root_are_read_without_a_request(
    tmp_path: Path, url: str, expected: bytes
) -> None:
    data, asked = download(tmp_path, url)
    assert (data, asked) == (expected, [])


@pytest.mark.parametrize(
    "url",
    [
        "/data/upload/3/../../../secret.txt",
        "/data/upload/3/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "/data/upload/%2F..%2F..%2Fsecret.txt",
        "/data/local-files/?d=../secret.txt",
        "/data/local-files/?d=/etc/passwd",
        "/data/upload/3/img%00.png",
        "/data/upload/3/escape",  # a symlink out of the root
    ],
)
def test_a_url_that_leads_outside_its_root_is_refused_and_nothing_is_read(
    tmp_path: Path, url: str
) -> None:
    media, _, secret = roots(tmp_path)
    (media / "upload" / "3" / "escape").symlink_to(secret)
    data, asked = download(tmp_path, url)
    assert isinstance(data, RefusedURL), data
    assert "outside" in str(data) or "cannot be read" in str(data)
    assert asked == []  # not fetched over HTTP either


def test_a_file_not_on_disk_is_downloaded_as_before(tmp_path: Path) -> None:
    data, asked = download(tmp_path, "/data/upload/3/not-there.png")
    assert data == b"over http"
    assert asked == ["http://ls.test/data/upload/3/not-there.png"]


def test_a_file_over_the_size_limit_fails_as_a_download_would(tmp_path: Path) -> None:
    data, asked = download(tmp_path, "/data/upload/3/ab12cd34-img%201.png", max_bytes=5)
    assert isinstance(data, ImageError) and asked == []


def test_without_roots_every_file_is_downloaded(tmp_path: Path) -> None:
    roots(tmp_path)
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, content=b"over http")

    async def run() -> bytes:
        async with LabelStudioClient(
            "http://ls.test", TOKEN, transport=httpx.MockTransport(handler)
        ) as client:
            return await client.files.download(1, "/data/upload/3/ab12cd34-img%201.png")

    assert asyncio.run(run()) == b"over http"
    assert asked == ["/data/upload/3/ab12cd34-img 1.png"]  # httpx gives the path decoded
