"""Task data URLs -> bytes: what the worker downloads, from Label Studio or another host.

Whoever imports tasks writes these URLs, so every hop is checked (``urls``) before it is
fetched, and the whole download runs within a deadline (``label_studio.download_timeout_s``).
"""

from __future__ import annotations

import asyncio
import base64

import httpx

from service.errors import DownloadTimeout, LabelStudioError, NotFoundError
from service.labelstudio.disk import DiskFiles
from service.labelstudio.transport import Sender
from service.labelstudio.types import CLOUD_SCHEMES, DEFAULT_MAX_BYTES
from service.labelstudio.urls import shown_url


class Files:
    """Downloads through ``sender``: its token goes to Label Studio's own host only; files
    ``disk`` reaches (Label Studio's uploads and local files on this machine) read from disk."""

    def __init__(self, sender: Sender, timeout_s: float, disk: DiskFiles | None = None) -> None:
        self.sender = sender
        self.timeout_s = timeout_s
        self.disk = disk if disk is not None else DiskFiles(None, None)

    def serves(self, url: str) -> bool:
        """Whether Label Studio itself answers a download of this task URL (a root-relative
        path, its own host, a cloud URI it resolves): the worker counts those against Label
        Studio's load, and other hosts' downloads not."""
        url = url.strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in CLOUD_SCHEMES or (url.startswith("/") and not url.startswith("//")):
            return True
        try:
            return self.sender.is_label_studio(httpx.URL(url))
        except httpx.InvalidURL:
            return False

    async def download(
        self,
        task_id: int,
        url: str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float | None = None,
    ) -> bytes:
        """The bytes behind a task data URL (see ``_download``), within ``timeout_s`` (default:
        the client's ``download_timeout_s``) for the whole download: redirects, retries and
        every byte. A host that trickles its answer raises ``DownloadTimeout`` (retryable)
        instead of holding the job for as long as it likes."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit) as deadline:
                return await self._download(task_id, url, max_bytes)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise DownloadTimeout(f"download of {_shown_url(url)} took over {limit:g} s") from exc

    async def _download(self, task_id: int, url: str, max_bytes: int) -> bytes:
        """The bytes behind a task data URL.

        ``/data/upload/...``, ``/data/local-files/?d=...`` and absolute URLs on Label Studio's
        own host are fetched with the token; other http(s) hosts without it (also after a
        redirect back); ``s3://``, ``gs://`` and ``azure-blob://`` URIs through
        ``/tasks/{task_id}/resolve/``, whose presigned redirect is followed without the token.
        More than ``max_bytes`` raises ImageError. Whoever imports tasks writes these URLs:
        each hop is checked first (``urls``: Label Studio's file paths only, other hosts only
        at public or ``allowed_image_hosts`` addresses), else RefusedURL.
        """
        url = url.strip()
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in CLOUD_SCHEMES:
            return await self._download_cloud(task_id, url, max_bytes)
        shown = shown_url(url)
        if url.startswith("/") and not url.startswith("//"):
            on_disk = self.disk.path_for(url)  # RefusedURL if it leads outside its root
            if on_disk is not None:
                return await asyncio.to_thread(self.disk.read, on_disk, max_bytes)
            if url.startswith("/data/local-files"):
                shown = url  # ?d= is the file's path, not a secret
            return await self.sender.fetch(self.sender.data_url(url), shown, max_bytes)
        if scheme in ("http", "https"):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL as exc:
                raise LabelStudioError(f"task {task_id}: invalid image URL {shown}: {exc}") from exc
            return await self.sender.fetch(target, shown, max_bytes)
        raise LabelStudioError(
            f"task {task_id}: cannot download {shown[:200]!r}: expected /data/..., http(s)://, "
            "s3://, gs:// or azure-blob://"
        )

    async def _download_cloud(self, task_id: int, uri: str, max_bytes: int) -> bytes:
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode("ascii")
        resolve = httpx.URL(
            self.sender.url(f"/tasks/{int(task_id)}/resolve/"), params={"fileuri": fileuri}
        )
        try:
            # messages show the bucket and key, never the presigned URL's signature
            return await self.sender.fetch(resolve, uri, max_bytes)
        except NotFoundError as exc:
            raise NotFoundError(
                f"task {task_id}: {uri} not found: Label Studio could not resolve it (no cloud "
                "storage of the project matches the bucket, or the task is gone), or the storage "
                f"has no such object ({exc})",
                404,
            ) from exc


def _shown_url(url: str) -> str:
    """A task URL fit for a job's reason: no query string (signatures), no user:password@."""
    return shown_url(url.strip())[:300]
