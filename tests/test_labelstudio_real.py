"""service.labelstudio against a real Label Studio 1.23.2 (started once per session)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from ls_fixtures import BRUSH_CONFIG, BRUSH_LABELS, brush_result, misfit_batch, new_brush_project
from PIL import Image

from service.constants import SECRET_HEADER, TASKS_CREATED
from service.errors import AuthError, LabelStudioError, NotFoundError
from service.labelstudio import PredictionIn
from service.labelstudio.client import LabelStudioClient
from service.labelstudio.queries import LEAN_FIELDS, untouched_query
from service.labelstudio.webhooks import ensure_webhook
from service.local import lsserver
from service.metrics import NoMetrics
from service.queue import Job, JobState
from service.worker.outage import OutageWatch
from service.worker.tasks import TaskReader

pytestmark = pytest.mark.labelstudio

MakeClient = Callable[..., LabelStudioClient]


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real network, with a list of the paths requested."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _new_pat(ls_client: MakeClient) -> str:
    async with ls_client() as ls:
        return await ls.create_pat(replace_existing=True)


def test_legacy_token_verifies(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    async def run() -> str:
        async with ls_client() as ls:
            assert ls.token_type == "legacy"
            return await ls.verify()

    assert asyncio.run(run()) == label_studio.username


def test_pat_works_and_survives_access_token_expiry(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    transport = RecordingTransport()

    async def run() -> None:
        pat = await _new_pat(ls_client)
        async with ls_client(pat, transport=transport) as ls:
            assert ls.token_type == "pat"
            assert await ls.verify() == label_studio.username
            credentials = ls._sender.credentials
            first = credentials._access
            # the cached access token is past its refresh time: refreshed before use
            credentials._access_expires_at = time.monotonic() - 1
            assert await ls.verify() == label_studio.username
            assert credentials._access != first
            # the server refuses the cached token although it looks fresh: one refresh on 401
            transport.paths.clear()
            credentials._access = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIn0.bm9wZQ"
            credentials._access_expires_at = time.monotonic() + 300
            assert await ls.verify() == label_studio.username
            assert transport.paths == [
                "/api/current-user/whoami",
                "/api/token/refresh/",
                "/api/current-user/whoami",
            ]

    asyncio.run(run())


def test_token_mix_ups_give_helpful_auth_errors(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    async def refused(token: str, token_type: Any = "auto") -> AuthError:
        async with ls_client(token, token_type=token_type) as ls:
            with pytest.raises(AuthError) as info:
                await ls.verify()
        assert token not in str(info.value)
        return info.value

    async def run() -> None:
        pat = await _new_pat(ls_client)
        error = await refused(pat, "legacy")
        assert error.status_code == 401
        assert "Personal Access Token (a JWT) but was sent as a legacy token" in str(error)
        error = await refused(label_studio.legacy_token, "pat")
        assert "looks like a legacy token" in str(error)
        error = await refused("f" * 40)
        assert "Invalid token." in str(error) and "Copy it again" in str(error)
        # a revoked PAT (replacing it revokes the old one)
        await _new_pat(ls_client)
        error = await refused(pat)
        assert "revoked" in str(error) and "Account & Settings" in str(error)

    asyncio.run(run())


def test_legacy_tokens_disabled_in_the_organization(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    def jwt_settings(headers: dict[str, str], legacy_enabled: bool) -> None:
        body = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": legacy_enabled}
        response = httpx.post(f"{label_studio.url}/api/jwt/settings", json=body, headers=headers)
        response.raise_for_status()

    pat = asyncio.run(_new_pat(ls_client))
    access = httpx.post(f"{label_studio.url}/api/token/refresh/", json={"refresh": pat})
    bearer = {"Authorization": f"Bearer {access.raise_for_status().json()['access']}"}

    async def run() -> None:
        async with ls_client() as ls:
            with pytest.raises(AuthError) as info:
                await ls.verify()
        message = str(info.value)
        assert "legacy token authentication has been disabled" in message
        assert "Personal Access Token" in message and "/api/jwt/settings" in message
        async with ls_client(pat) as ls:
            assert await ls.verify() == label_studio.username

    jwt_settings({"Authorization": f"Token {label_studio.legacy_token}"}, legacy_enabled=False)
    try:
        asyncio.run(run())
    finally:
        jwt_settings(bearer, legacy_enabled=True)


def test_wrong_url_is_named(ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio) -> None:
    async def run() -> None:
        async with LabelStudioClient(
            f"{label_studio.url}/not-here", label_studio.legacy_token, retries=0
        ) as ls:
            await ls.verify()

    with pytest.raises(LabelStudioError, match=r"does not look like Label Studio.*Check the URL"):
        asyncio.run(run())


def test_get_project_parses_the_brush_control(ls_client: MakeClient) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            created = await new_brush_project(ls, "brush parse")
            project = await ls.get_project(created.id)
            with pytest.raises(NotFoundError):
                await ls.get_project(created.id + 10_000)
        assert project.title == "brush parse"
        assert project.label_config == BRUSH_CONFIG
        assert project.model_version is None
        (control,) = project.controls
        assert control.name == "tag"
        assert control.type == "BrushLabels"
        assert control.to_name == ("image",)
        assert [(i.type, i.value) for i in control.inputs] == [("Image", "image")]
        assert control.labels == BRUSH_LABELS
        assert project.control("tag") == control

    asyncio.run(run())


def test_250_tasks_are_paged_completely_and_filtered(ls_client: MakeClient) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            tasks = [{"data": {"image": f"/data/upload/0/{i}.png"}} for i in range(250)]
            ids = await ls.import_tasks(project.id, tasks)
            assert len(ids) == 250
            listed = [task async for task in ls.iter_tasks(project.id, page_size=100)]
            assert [t.id for t in listed] == sorted(ids)
            assert [t.data["image"] for t in listed] == [t["data"]["image"] for t in tasks]
            assert all(t.annotations is None and t.total_predictions == 0 for t in listed)

            await ls.create_prediction(PredictionIn(ids[0], brush_result(), 0.5, "v1"))
            no_predictions = {
                "filters": {
                    "conjunction": "and",
                    "items": [
                        {
                            "filter": "filter:tasks:total_predictions",
                            "operator": "equal",
                            "type": "Number",
                            "value": 0,
                        }
                    ],
                }
            }
            todo = [t.id async for t in ls.iter_tasks(project.id, query=no_predictions)]
            assert todo == sorted(ids)[1:]
            full = [t async for t in ls.iter_tasks(project.id, page_size=100, fields_all=True)]
            assert len(full) == 250
            assert full[0].predictions is not None and len(full[0].predictions) == 1
            assert full[0].predictions_model_versions == ("v1",)

    asyncio.run(run())


def test_get_tasks_reads_the_named_tasks_of_one_project_in_full(ls_client: MakeClient) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            other = await new_brush_project(ls)
            tasks = [{"data": {"image": f"/data/upload/0/{i}.png"}} for i in range(130)]
            ids = await ls.import_tasks(project.id, tasks)
            (foreign,) = await ls.import_tasks(other.id, tasks[:1])
            await ls.create_annotation(ids[3], brush_result())
            await ls.create_prediction(PredictionIn(ids[4], brush_result(), 0.5, "v9"))
            # more than one request's worth (100), in no particular order, with a duplicate,
            # a task of another project and one that does not exist
            wanted = [*reversed(ids[:120]), ids[5], foreign, max(ids) + 10_000]
            found = await ls.get_tasks(project.id, wanted)
            assert sorted(found) == sorted(ids[:120])
            assert all(
                found[i].data["image"] == t["data"]["image"]
                for i, t in zip(ids[:120], tasks, strict=False)
            )
            annotated = found[ids[3]]
            assert annotated.annotations is not None and len(annotated.annotations) == 1
            predicted = found[ids[4]]
            assert predicted.predictions is not None
            assert [p.model_version for p in predicted.predictions] == ["v9"]
            plain = found[ids[5]]
            assert plain.annotations is not None and len(plain.annotations) == 0
            assert await ls.get_tasks(project.id, []) == {}

    asyncio.run(run())


def test_untouched_tasks_reads_lean_and_leaves_out_what_needs_no_work(
    ls_client: MakeClient,
) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            other = await new_brush_project(ls)
            tasks = [{"data": {"image": f"/data/upload/0/{i}.png"}} for i in range(110)]
            tasks[1]["annotations"] = [{"result": brush_result()}]  # imported with one
            ids = await ls.import_tasks(project.id, tasks)
            (foreign,) = await ls.import_tasks(other.id, tasks[:1])
            plain, imported_annotated, annotated, skipped, exact, longer, other_version = ids[:7]
            await ls.create_annotation(annotated, brush_result())
            await ls.create_annotation(skipped, [], was_cancelled=True)
            for task, version in ((exact, "v1"), (longer, "v1-old"), (other_version, "w2")):
                await ls.create_prediction(PredictionIn(task, brush_result(), 0.5, version))
            wanted = [*ids, foreign, max(ids) + 10_000]
            found = await ls.untouched_tasks(project.id, wanted, "v1")
            # Label Studio compares versions as substrings: "v1-old" counts as "v1" here
            needing = set(ids) - {imported_annotated, annotated, skipped, exact, longer}
            assert set(found) == needing
            lean = found[plain]
            assert lean.data["image"] == tasks[0]["data"]["image"]
            assert lean.annotations is None and lean.predictions is None  # not serialized
            assert found[other_version].total_annotations == 0
            # the worker's reader: the missing ones read again in full, checked exactly
            outcomes = await reader(ls).read(project.id, [job(project.id, t) for t in ids[:7]])
            verdicts = {
                job.task: (str(o) if isinstance(o, BaseException) else "work")
                for job, o in outcomes
            }
            assert verdicts == {
                plain: "work",
                imported_annotated: "annotated",
                annotated: "annotated",
                skipped: "annotated",
                exact: "exists",
                longer: "work",
                other_version: "work",
            }

    asyncio.run(run())


def test_counters_of_imported_tasks_are_set_before_the_webhook(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    """The lean reads trust the task's counters: read from inside Label Studio's webhook
    (the import request waits for it), a task imported with an annotation, or a skipped one,
    already counts it, and the untouched filter leaves it out; the web UI's import has not
    committed its tasks yet at that moment (read again after worker.settle_s)."""
    seen: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = [t["id"] for t in body.get("tasks", [])]
            project = body["project"]["id"]
            headers = {"Authorization": f"Token {label_studio.legacy_token}"}
            with httpx.Client(base_url=label_studio.url, headers=headers, timeout=10) as http:
                lean = http.get(
                    "/api/tasks/",
                    params={
                        "project": project,
                        "include": LEAN_FIELDS,
                        "query": json.dumps({"selectedItems": {"all": False, "included": ids}}),
                    },
                ).json()["tasks"]
                untouched = http.get(
                    "/api/tasks/",
                    params={
                        "project": project,
                        "include": LEAN_FIELDS,
                        "query": json.dumps(untouched_query("v1", ids=ids)),
                    },
                ).json()["tasks"]
            seen.append(
                {
                    "counters": {
                        t["id"]: (t["total_annotations"], t["cancelled_annotations"]) for t in lean
                    },
                    "untouched": sorted(t["id"] for t in untouched),
                }
            )
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def run() -> tuple[list[int], list[int]]:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            await ls.create_webhook(
                project.id, f"http://127.0.0.1:{server.server_address[1]}/", {}, [TASKS_CREATED]
            )
            api = await ls.import_tasks(
                project.id,
                [
                    {"data": {"image": "/a.png"}, "annotations": [{"result": brush_result()}]},
                    {
                        "data": {"image": "/b.png"},
                        "annotations": [{"result": [], "was_cancelled": True}],
                    },
                    {"data": {"image": "/c.png"}},
                ],
            )
            uploads = await ls.upload_files(project.id, [("d.png", png_bytes())], commit=False)
            await ls.reimport(project.id, uploads)
            return api, uploads

    try:
        (annotated, skipped, plain), _ = asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()
    api_import, ui_import = seen
    assert api_import["counters"] == {annotated: (1, 0), skipped: (0, 1), plain: (0, 0)}
    assert api_import["untouched"] == [plain]
    assert ui_import == {"counters": {}, "untouched": []}  # not committed yet


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def reader(ls: LabelStudioClient) -> TaskReader:
    return TaskReader(ls, OutageWatch(ls, NoMetrics(), probe_s=1), "v1", not_found_grace_s=30)


def job(project: int, task: int) -> Job:
    now = time.time()
    return Job(task, project, task, "v1", JobState.RUNNING, 1, None, now, now, now)


def test_files_with_odd_names_round_trip(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    files = [("img 0.jpg", os.urandom(3000)), ("façade ü.png", os.urandom(2000))]
    media = label_studio.data_dir / "media"  # LABEL_STUDIO_BASE_DATA_DIR/media

    async def run() -> None:
        async with ls_client() as ls, ls_client(media_root=media) as direct:
            project = await new_brush_project(ls)
            ids = await ls.upload_files(project.id, files)
            assert len(ids) == 2
            for task_id, (_, content) in zip(ids, files, strict=True):
                task = await ls.get_task(task_id)
                url = task.data["image"]
                assert url.startswith(f"/data/upload/{project.id}/")
                assert await ls.files.download(task_id, url) == content
                # The same file where media_root says Label Studio keeps it: read from disk.
                assert direct.files.disk.path_for(url) is not None, url
                assert await direct.files.download(task_id, url) == content
            names = [(await ls.get_task(i)).data["image"] for i in ids]
            assert names[0].endswith("-img_0.jpg")  # Label Studio sanitizes the name
            with pytest.raises(NotFoundError):  # Label Studio itself answers 500 here
                await ls.files.download(ids[0], f"/data/upload/{project.id}/nothere.png")

    asyncio.run(run())


def test_two_step_import_like_the_web_ui(ls_client: MakeClient) -> None:
    files = [(f"ui {i}.png", os.urandom(100)) for i in range(3)]

    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            upload_ids = await ls.upload_files(project.id, files, commit=False)
            assert len(upload_ids) == 3
            assert [t async for t in ls.iter_tasks(project.id)] == []
            assert await ls.reimport(project.id, upload_ids) == 3
            tasks = [t async for t in ls.iter_tasks(project.id)]
            assert len(tasks) == 3
            downloaded = {await ls.files.download(t.id, t.data["image"]) for t in tasks}
            assert downloaded == {content for _, content in files}

    asyncio.run(run())


def test_local_files_url_downloads(
    ls_client: MakeClient, label_studio: lsserver.LocalLabelStudio
) -> None:
    root = label_studio.data_dir / "local-images"
    (root / "sub dir").mkdir(parents=True, exist_ok=True)
    content = os.urandom(500)
    (root / "sub dir" / "a b.png").write_bytes(content)

    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            storage = {"project": project.id, "path": str(root), "use_blob_urls": True}
            headers = {"Authorization": f"Token {label_studio.legacy_token}"}
            async with httpx.AsyncClient(base_url=label_studio.url, headers=headers) as raw:
                response = await raw.post("/api/storages/localfiles/", json=storage)
                response.raise_for_status()
            (task_id,) = await ls.import_tasks(project.id, [{"data": {"image": "x"}}])
            url = "/data/local-files/?d=local-images/sub%20dir/a%20b.png"
            assert await ls.files.download(task_id, url) == content
            with pytest.raises(NotFoundError, match=re.escape("d=local-images/nothere.png")):
                await ls.files.download(task_id, "/data/local-files/?d=local-images/nothere.png")

    asyncio.run(run())


def test_predictions_create_read_import_delete(ls_client: MakeClient) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            other = await new_brush_project(ls)
            tasks = [{"data": {"image": f"/data/upload/0/{i}.png"}} for i in range(2)]
            first, second = await ls.import_tasks(project.id, tasks)
            (foreign,) = await ls.import_tasks(other.id, tasks[:1])

            pid = await ls.create_prediction(PredictionIn(first, brush_result(), 0.75, "seg-v1"))
            task = await ls.get_task(first)
            assert task.total_predictions == 1
            assert task.predictions is not None
            (prediction,) = task.predictions
            assert (prediction.id, prediction.model_version, prediction.score) == (
                pid,
                "seg-v1",
                0.75,
            )
            assert [dict(r) for r in prediction.result] == brush_result()
            assert task.predictions_model_versions == ("seg-v1",)
            # With the task's project in the body (saves Label Studio its lookup): the same.
            with_project = await ls.create_prediction(
                PredictionIn(second, brush_result(), 0.6, "seg-v0"), project=project.id
            )
            (stored,) = (await ls.get_task(second)).predictions or ()
            assert (stored.id, stored.model_version) == (with_project, "seg-v0")
            await ls.delete_prediction(with_project)

            # 1.23.2 drops predictions that do not fit the label config, without an error
            batch = misfit_batch(first, second, "seg-v2")
            # The session's Label Studio runs the batched import (BULK_PREDICTIONS_FLAG): it
            # checks nothing against the label config and stores all four (the legacy path
            # drops the two misfits: test_bulk_real.py), so ls-autoseg validates its own.
            assert await ls.import_predictions(project.id, batch) == 4
            assert (await ls.get_task(second)).total_predictions == 3
            # one task of another project fails the whole request
            with pytest.raises(LabelStudioError) as info:
                await ls.import_predictions(
                    project.id, [PredictionIn(foreign, brush_result(), 0.5, "x")]
                )
            assert info.value.status_code == 400

            await ls.delete_prediction(pid)
            task = await ls.get_task(first)
            assert task.predictions is not None
            assert [p.model_version for p in task.predictions] == ["seg-v2"]
            with pytest.raises(NotFoundError):
                await ls.delete_prediction(pid)

    asyncio.run(run())


def test_annotations_create_and_delete(ls_client: MakeClient) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            (task_id,) = await ls.import_tasks(project.id, [{"data": {"image": "/x.png"}}])
            annotation = await ls.create_annotation(task_id, brush_result("label_d"))
            assert annotation.task == task_id
            assert not annotation.was_cancelled and not annotation.ground_truth
            assert annotation.completed_by is not None
            assert [dict(r) for r in annotation.result] == brush_result("label_d")
            skipped = await ls.create_annotation(task_id, [], was_cancelled=True)
            assert skipped.was_cancelled

            task = await ls.get_task(task_id)
            assert (task.total_annotations, task.cancelled_annotations) == (1, 1)
            assert task.annotations is not None
            assert {a.id for a in task.annotations} == {annotation.id, skipped.id}
            # get_task expands completed_by into a user object; it is parsed to the id
            assert {a.completed_by for a in task.annotations} == {annotation.completed_by}

            await ls.delete_annotation(annotation.id)
            await ls.delete_annotation(skipped.id)
            assert (await ls.get_task(task_id)).annotations == ()
            with pytest.raises(NotFoundError):
                await ls.delete_annotation(annotation.id)

    asyncio.run(run())


def test_webhooks_create_list_update(ls_client: MakeClient) -> None:
    async def run() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            hook = await ls.create_webhook(
                project.id,
                "http://127.0.0.1:9/hook",  # loopback: allowed because SSRF protection is off
                {"X-Autoseg-Secret": "s3cret"},
                ["TASKS_CREATED", "ANNOTATION_CREATED"],
            )
            assert hook.project == project.id
            assert hook.url == "http://127.0.0.1:9/hook"
            assert dict(hook.headers) == {"X-Autoseg-Secret": "s3cret"}
            assert set(hook.actions) == {"TASKS_CREATED", "ANNOTATION_CREATED"}
            assert hook.send_payload and hook.is_active and not hook.send_for_all_actions
            assert await ls.list_webhooks(project.id) == [hook]

            # a PATCH without actions would clear them in Label Studio: the client keeps them
            moved = await ls.update_webhook(hook.id, url="http://127.0.0.1:10/hook")
            assert moved.url == "http://127.0.0.1:10/hook"
            assert set(moved.actions) == set(hook.actions)
            assert not moved.send_for_all_actions
            narrowed = await ls.update_webhook(hook.id, actions=["TASKS_CREATED"])
            assert narrowed.actions == ("TASKS_CREATED",)
            assert (await ls.list_webhooks(project.id))[0].actions == ("TASKS_CREATED",)

            await ls.delete_webhook(hook.id)
            assert await ls.list_webhooks(project.id) == []

    asyncio.run(run())


def test_ensure_webhook_is_idempotent_and_replaces_stale_ones(ls_client: MakeClient) -> None:
    url = "http://127.0.0.1:9/webhook"
    old = "http://127.0.0.1:8/webhook"  # an earlier run's port
    other = "http://127.0.0.1:7/elsewhere"  # someone else's: kept

    async def run() -> None:
        async with ls_client() as ls:
            project = (await new_brush_project(ls)).id
            kept = await ls.create_webhook(project, other, {}, ["TASKS_CREATED"])
            await ls.create_webhook(project, old, {}, ["TASKS_CREATED"])
            stale = lambda hook: hook.url.endswith("/webhook")  # noqa: E731
            first, created = await ensure_webhook(ls, project, url, "s1", stale=stale)
            assert created
            again, created = await ensure_webhook(ls, project, url, "s2", stale=stale)
            assert not created and again.id == first.id
            hooks = {hook.url: hook for hook in await ls.list_webhooks(project)}
            assert set(hooks) == {url, other} and hooks[other].id == kept.id
            assert dict(hooks[url].headers) == {SECRET_HEADER: "s2"}
            assert hooks[url].actions == (TASKS_CREATED,) and hooks[url].send_payload

    asyncio.run(run())
