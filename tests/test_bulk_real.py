"""Bulk prediction posts against real Label Studio 1.23.2 servers: the session's, which runs
with ``constants.BULK_PREDICTIONS_FLAG`` (as quickstart and the compose files do), and one
started here without it (its legacy import)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ls_fixtures import brush_result, misfit_batch, new_brush_project, tasks_of
from service_harness import ServiceEnv, assert_correct, make_env, upload, wait_for_predictions

from service.config import ModelConfig
from service.errors import LabelStudioError
from service.labelstudio import PredictionIn
from service.labelstudio.client import LabelStudioClient
from service.local import lsserver

pytestmark = pytest.mark.labelstudio

MakeClient = Callable[..., LabelStudioClient]


@pytest.fixture(scope="module")
def legacy_ls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lsserver.LocalLabelStudio]:
    """A Label Studio started without the flag, as one is by default."""
    server = lsserver.start(tmp_path_factory.mktemp("legacy-ls"), bulk_predictions_flag=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def legacy_client(legacy_ls: lsserver.LocalLabelStudio) -> MakeClient:
    def make(token: str | None = None, **kwargs: object) -> LabelStudioClient:
        return LabelStudioClient(legacy_ls.url, token or legacy_ls.legacy_token, retries=2)  # type: ignore[arg-type]

    return make


def test_bulk_is_cheap_tells_the_two_import_paths_apart_and_stores_nothing(
    ls_client: MakeClient, legacy_client: MakeClient
) -> None:
    async def ask(make: MakeClient) -> tuple[bool, int]:
        async with make() as ls:
            project = await new_brush_project(ls)
            await ls.import_tasks(project.id, [{"data": {"image": "/x.png"}}])
            cheap = await ls.bulk_is_cheap(project.id)
            assert await ls.bulk_is_cheap(project.id) == cheap  # asking again changes nothing
            stored = sum([t.total_predictions async for t in ls.iter_tasks(project.id)])
            return cheap, stored

    assert asyncio.run(ask(ls_client)) == (True, 0)
    assert asyncio.run(ask(legacy_client)) == (False, 0)


def test_the_legacy_import_drops_misfits_and_the_batched_one_stores_batches_before_a_bad_id(
    ls_client: MakeClient, legacy_client: MakeClient
) -> None:
    async def legacy() -> None:
        async with legacy_client() as ls:
            project = await new_brush_project(ls)
            first, second = await ls.import_tasks(
                project.id, [{"data": {"image": "/a.png"}}, {"data": {"image": "/b.png"}}]
            )
            assert await ls.import_predictions(project.id, misfit_batch(first, second, "v2")) == 2

    async def batched() -> None:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            ids = await ls.import_tasks(
                project.id, [{"data": {"image": f"/{i}.png"}} for i in range(502)]
            )
            # Label Studio's batch is 500: a bad id in the second fails the call after the
            # first batch was stored (why ls-autoseg sends at most 500 and reads after errors)
            items = [PredictionIn(t, brush_result(), 0.5, "v3") for t in ids[:501]]
            items.append(PredictionIn(max(ids) + 1000, brush_result(), 0.5, "v3"))
            with pytest.raises(LabelStudioError) as info:
                await ls.import_predictions(project.id, items)
            assert info.value.status_code == 400, info.value
            tasks = [t async for t in ls.iter_tasks(project.id, fields_all=True)]
            assert {t.id for t in tasks if t.predictions} == set(ids[:500])
            # ... and its counters were never updated: only the predictions themselves (and
            # the filters on their versions, which the worker's reads use) tell what is there
            assert sum(t.total_predictions for t in tasks) == 0
            lean = await ls.untouched_tasks(project.id, ids, "v3")
            assert set(lean) == set(ids[500:])

    asyncio.run(legacy())
    asyncio.run(batched())


@pytest.mark.parametrize("where", ["legacy-auto", "session-off"])
def test_the_service_stores_exactly_one_correct_prediction_each_without_bulk(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    legacy_ls: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    legacy_client: MakeClient,
    colour_model: Callable[..., ModelConfig],
    where: str,
) -> None:
    """``auto`` on a Label Studio without the flag, and ``off`` on one with it: one POST a
    prediction (the bulk path is what the rest of the suite runs, on the session's server)."""
    server, client = (
        (legacy_ls, legacy_client) if where == "legacy-auto" else (label_studio, ls_client)
    )
    mode = "auto" if where == "legacy-auto" else "off"
    env: ServiceEnv = make_env(
        tmp_path, server, client, colour_model(channels=2), label_studio={"bulk_predictions": mode}
    )
    try:
        env.service.start()
        pictures = upload(client, env.project, [f"img_{i}.png" for i in range(6)])
        tasks = wait_for_predictions(client, env.project, 6)
        assert_correct(tasks, pictures, set())
        assert env.service.stop() == 0
        log = env.service.log.read_text()
        if mode == "auto":
            assert "one request each (Label Studio runs without the bulk import's" in log
    finally:
        env.service.kill()
    assert_correct(tasks_of(client, env.project), pictures, set())
