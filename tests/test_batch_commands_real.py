"""``upload``, ``annotations`` and ``replace-annotations`` against a real Label Studio.

The masks come from ``predict`` with an exact fake model (red -> one label, green -> another),
so every prediction read back from Label Studio can be decoded and compared with the mask
file it came from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ls_fixtures import new_brush_project, tasks_of
from PIL import Image

from service.cli import main
from service.commands.naming import image_file_name
from service.commands.upload import read_mask
from service.config import ModelConfig, PredictionConfig, ProjectConfig, write_config
from service.labelstudio import PredictionIn
from service.labelstudio.client import LabelStudioClient
from service.local import lsserver
from service.results import decode_result

pytestmark = pytest.mark.labelstudio

MakeClient = Callable[..., LabelStudioClient]
NAMES = ("img 0.png", "façade ü.png", "plain.png", "annotated.png")


def picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    y, x = rng.integers(0, 30), rng.integers(0, 40)
    image[y : y + 15, x : x + 20, 0] = 255  # red block
    image[5:12, 30:60, 1] = 255  # green band
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Setup:
    def __init__(self, tmp: Path, server: lsserver.LocalLabelStudio, project: int) -> None:
        self.tmp = tmp
        self.server = server
        self.project = project
        self.pred = tmp / "pred"

    def args(self, *extra: str) -> list[str]:
        return [
            "--base-url",
            self.server.url,
            "--token",
            self.server.legacy_token,
            "--project-id",
            str(self.project),
            *extra,
        ]


@pytest.fixture
def setup(
    tmp_path: Path,
    label_studio: lsserver.LocalLabelStudio,
    ls_client: MakeClient,
    colour_model: Callable[..., ModelConfig],
) -> Setup:
    images = tmp_path / "images"
    images.mkdir()
    for seed, name in enumerate(NAMES):
        (images / name).write_bytes(picture(seed))

    async def prepare() -> int:
        async with ls_client() as ls:
            project = await new_brush_project(ls)
            ids = await ls.upload_files(project.id, [(n, (images / n).read_bytes()) for n in NAMES])
            # A person annotated the last one: it must never get a prediction.
            await ls.create_annotation(ids[-1], [])
            return project.id

    project = asyncio.run(prepare())
    model = colour_model(channels=2)
    config = write_config(
        tmp_path / "predict.yaml",
        dataclasses.replace(model, labels=("red", "green")),
        prediction=PredictionConfig(min_pixels=0),
    )
    out = tmp_path / "pred"
    assert (
        main(
            ["predict", "--config", str(config), "--images-dir", str(images), "--out-dir", str(out)]
        )
        == 0
    )
    return Setup(tmp_path, label_studio, project)


def label_map_config(setup: Setup) -> Path:
    return write_config(
        setup.tmp / "ls.yaml",
        ModelConfig(path=Path("unused.pt"), labels=("red", "green")),
        prediction=PredictionConfig(model_version="test-v1", score=0.7, min_pixels=5),
        projects=[ProjectConfig(setup.project, label_map={"red": "label_a", "green": "label_b"})],
    )


def test_upload_dry_run_then_upload_then_nothing_twice(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    config = label_map_config(setup)
    base = ["upload", "--config", str(config), *setup.args("--pred-dir", str(setup.pred))]

    assert main(base) == 0
    out = capsys.readouterr().out
    assert "generated predictions=3" in out
    assert "dry-run: not uploading predictions" in out
    assert "skipped (annotated): 1" in out
    preview = json.loads((setup.pred / "labelstudio_predictions.json").read_text())
    assert len(preview) == 3 and all(p["model_version"] == "test-v1" for p in preview)
    assert len(json.loads((setup.pred / "labelstudio_tasks.json").read_text())) == 4
    assert all(t.total_predictions == 0 for t in tasks_of(ls_client, setup.project))

    assert main([*base, "--upload"]) == 0
    out = capsys.readouterr().out
    assert "uploaded predictions=3" in out

    tasks = tasks_of(ls_client, setup.project)
    by_name = {image_file_name(t.data["image"]): t for t in tasks}
    assert set(by_name) == {"img_0.png", "façade_ü.png", "plain.png", "annotated.png"}
    assert by_name["annotated.png"].total_predictions == 0
    for stored, local in (
        ("img_0.png", "img 0"),
        ("façade_ü.png", "façade ü"),
        ("plain.png", "plain"),
    ):
        (prediction,) = by_name[stored].predictions or ()
        assert prediction.model_version == "test-v1" and prediction.score == pytest.approx(0.7)
        decoded = dict(decode_result(r) for r in prediction.result)
        assert set(decoded) == {"label_a", "label_b"}
        for value, label in (("label_a", "red"), ("label_b", "green")):
            expected = read_mask(setup.pred / "masks_binary" / label / f"{local}.png")
            assert decoded[value].shape == (48, 64)
            np.testing.assert_array_equal(decoded[value] > 0, expected)
            assert set(np.unique(decoded[value])) == {0, 255}

    # The second run finds every task done and posts nothing.
    assert main([*base, "--upload"]) == 0
    out = capsys.readouterr().out
    assert "generated predictions=0" in out
    assert "already have 'test-v1' predictions): 3" in out
    assert sum(t.total_predictions for t in tasks_of(ls_client, setup.project)) == 3


def test_an_image_predicted_with_nothing_found_gets_an_empty_prediction(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    images = setup.tmp / "images"
    blank = io.BytesIO()
    Image.new("RGB", (64, 48)).save(blank, format="PNG")  # no red, no green: nothing found
    (images / "blank.png").write_bytes(blank.getvalue())
    (images / "broken.png").write_bytes(b"not a png")  # predict fails on it
    predict = ["predict", "--config", str(setup.tmp / "predict.yaml"), "--images-dir"]
    assert main([*predict, str(images), "--out-dir", str(setup.pred)]) == 1  # broken.png
    assert not any((setup.pred / "masks_binary").glob("*/blank.png"))

    async def add_tasks() -> list[int]:
        async with ls_client() as ls:
            files = [("blank.png", blank.getvalue()), ("broken.png", b"x"), ("unseen.png", b"x")]
            return await ls.upload_files(setup.project, files)

    blank_id, broken_id, unseen_id = asyncio.run(add_tasks())
    config = label_map_config(setup)
    base = ["upload", "--config", str(config), *setup.args("--pred-dir", str(setup.pred))]
    capsys.readouterr()
    assert main([*base, "--upload"]) == 0
    out = capsys.readouterr().out
    assert "generated predictions=4 (empty: 1)" in out and "uploaded predictions=4" in out
    assert f"tasks never predicted (no masks, not in summary.csv): 1 [{unseen_id}]" in out
    assert "tasks whose image predict failed on: 1" in out
    assert f"task {broken_id}: broken.png: " in out
    by_id = {t.id: t for t in tasks_of(ls_client, setup.project)}
    (empty,) = by_id[blank_id].predictions or ()
    assert empty.result == () and empty.model_version == "test-v1"
    assert by_id[unseen_id].total_predictions == 0 and by_id[broken_id].total_predictions == 0

    # Done is done: the second run posts nothing and still names what was never predicted.
    assert main([*base, "--upload"]) == 0
    out = capsys.readouterr().out
    assert "generated predictions=0" in out
    assert "already have 'test-v1' predictions): 4" in out
    assert f"tasks never predicted (no masks, not in summary.csv): 1 [{unseen_id}]" in out


def test_names_that_do_not_match_fail_before_any_upload(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["upload", *setup.args("--pred-dir", str(setup.pred), "--upload")]
    # The model's labels (red, green) are not the project's values and no label_map is given.
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "green, red are not label values of BrushLabels 'tag'" in err
    assert "'label_a', 'label_b', 'label_c', 'label_d'" in err
    config = label_map_config(setup)
    assert main(["upload", "--config", str(config), *base[1:], "--from-name", "brush"]) == 2
    assert "from_name 'brush' is not a BrushLabels control" in capsys.readouterr().err
    assert main(["upload", "--config", str(config), *base[1:], "--to-name", "img"]) == 2
    assert "to_name 'img' is not what BrushLabels 'tag' labels" in capsys.readouterr().err
    # --label-map on the command line does what the config's label_map does.
    mapped = [*base[:-1], "--label-map", "red=label_c,green=label_d"]
    assert main(mapped) == 0
    preview = json.loads((setup.pred / "labelstudio_predictions.json").read_text())
    assert {r["value"]["brushlabels"][0] for p in preview for r in p["result"]} == {
        "label_c",
        "label_d",
    }
    assert sum(t.total_predictions for t in tasks_of(ls_client, setup.project)) == 0


def test_wrong_token_explains_itself(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    args = setup.args("--pred-dir", str(setup.pred))
    args[args.index("--token") + 1] = "0" * 40
    assert main(["upload", *args]) == 2
    err = capsys.readouterr().err
    assert "401" in err or "Invalid token" in err or "token" in err.lower()
    assert "0" * 40 not in err


def annotate_and_plan(
    setup: Setup, capsys: pytest.CaptureFixture[str], *extra: str
) -> dict[str, Any]:
    tasks_json = setup.tmp / "tasks.json"
    config = label_map_config(setup)
    assert (
        main(
            [
                "upload",
                "--config",
                str(config),
                *setup.args("--pred-dir", str(setup.pred), "--tasks-out", str(tasks_json)),
            ]
        )
        == 0
    )
    ids = sorted(t["id"] for t in json.loads(tasks_json.read_text()))
    payload = setup.tmp / "annotations.json"
    assert main(
        [
            "annotations", "--tasks-json", str(tasks_json), "--pred-dir", str(setup.pred),
            "--out", str(payload), "--start-id", str(ids[0]), "--end-id", str(ids[-1]),
            "--label-map", "red=label_a,green=label_b", "--min-pixels", "0",
        ]
    ) == 0  # fmt: skip
    assert "generated annotations=4" in capsys.readouterr().out
    plan = setup.tmp / "plan.json"
    replace = [
        "replace-annotations", *setup.args(), "--annotations-json", str(payload),
        "--start-id", str(ids[0]), "--end-id", str(ids[-1]), "--plan-out", str(plan), *extra,
    ]  # fmt: skip
    assert main(replace) == 0
    return {"ids": ids, "plan": plan, "replace": replace, "payload": payload}


def test_replace_plans_spares_people_and_executes_once(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    run = annotate_and_plan(setup, capsys)
    out = capsys.readouterr().out
    assert "3 task(s) get a new annotation, 0 annotation(s) deleted, 1 skipped" in out
    assert "human annotation" in out
    plan = json.loads(run["plan"].read_text())
    assert [e["skip"] is None for e in plan["tasks"]] == [True, True, True, False]

    assert main([*run["replace"], "--execute"]) == 0
    tasks = tasks_of(ls_client, setup.project)
    assert [t.total_annotations for t in tasks] == [1, 1, 1, 1]
    human = tasks[-1].annotations or ()
    assert human[0].result == ()  # the person's (empty) annotation is untouched
    payload = {p["task"]: p["result"] for p in json.loads(run["payload"].read_text())}
    for task in tasks[:3]:
        (annotation,) = task.annotations or ()
        decoded = dict(decode_result(r) for r in annotation.result)
        for item in payload[task.id]:
            label, mask = decode_result(item)
            np.testing.assert_array_equal(decoded[label], mask)

    # Executing the same plan again changes nothing.
    assert main([*run["replace"], "--execute"]) == 0
    assert [t.total_annotations for t in tasks_of(ls_client, setup.project)] == [1, 1, 1, 1]

    # A new plan replaces ls-autoseg's own annotations: 3 deleted, 3 created.
    capsys.readouterr()
    assert main(run["replace"]) == 0
    assert "3 task(s) get a new annotation, 3 annotation(s) deleted" in capsys.readouterr().out
    backup = run["plan"].with_name("plan.json.backup.jsonl")
    assert main([*run["replace"], "--execute"]) == 0
    after = tasks_of(ls_client, setup.project)
    assert [t.total_annotations for t in after] == [1, 1, 1, 1]
    assert {a.id for t in after[:3] for a in t.annotations or ()}.isdisjoint(
        {a.id for t in tasks[:3] for a in t.annotations or ()}
    )
    saved = [json.loads(line) for line in backup.read_text().splitlines()]
    assert sorted(s["annotation"]["id"] for s in saved) == sorted(
        a.id for t in tasks[:3] for a in t.annotations or ()
    )


def test_replace_refuses_a_task_changed_since_the_plan(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    run = annotate_and_plan(setup, capsys)

    async def someone_annotates() -> None:
        async with ls_client() as ls:
            await ls.create_annotation(run["ids"][0], [])

    asyncio.run(someone_annotates())
    capsys.readouterr()
    assert main([*run["replace"], "--execute"]) == 1
    out = capsys.readouterr().out
    assert f"task {run['ids'][0]}: its annotations changed" in out and "nothing was changed" in out
    assert [t.total_annotations for t in tasks_of(ls_client, setup.project)] == [1, 0, 0, 1]


def test_replace_interrupted_halfway_is_finished_by_a_second_run(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    run = annotate_and_plan(setup, capsys)
    assert main([*run["replace"], "--execute"]) == 0  # first annotations by ls-autoseg
    assert main(run["replace"]) == 0  # plan: replace them

    from service.commands import annotations as module

    calls = {"n": 0}
    real = LabelStudioClient.delete_annotation

    async def crash_on_second_delete(self: LabelStudioClient, annotation_id: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process stops between two steps
        await real(self, annotation_id)

    LabelStudioClient.delete_annotation = crash_on_second_delete  # type: ignore[method-assign]
    try:
        assert main([*run["replace"], "--execute"]) == 130
    finally:
        LabelStudioClient.delete_annotation = real  # type: ignore[method-assign]
    # Halfway: the second task has its new annotation and still its old one. Nothing is lost.
    counts = [t.total_annotations for t in tasks_of(ls_client, setup.project)]
    assert counts == [1, 2, 1, 1]
    assert module.journal_path(run["plan"]).exists()

    assert main([*run["replace"], "--execute"]) == 0
    assert [t.total_annotations for t in tasks_of(ls_client, setup.project)] == [1, 1, 1, 1]


def sign_up_annotator(server: lsserver.LocalLabelStudio) -> tuple[int, str]:
    """A second user of the organization, signed up through the invite link as a person does;
    returns their user id and legacy token."""
    admin = {"Authorization": f"Token {server.legacy_token}"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        invite = http.get("/api/invite", headers=admin).json()["token"]
        http.get("/user/signup/", params={"token": invite})  # sets the CSRF cookie
        form = {
            "email": f"annotator-{uuid.uuid4().hex[:8]}@example.com",
            "password": f"Annotator-{uuid.uuid4().hex[:12]}",
            "csrfmiddlewaretoken": http.cookies["csrftoken"],
        }
        signed_up = http.post("/user/signup/", params={"token": invite}, data=form)
        assert signed_up.status_code == 302, signed_up.text[:500]
        user_id = http.get("/api/current-user/whoami").json()["id"]
        token = http.get("/api/current-user/token").json()["token"]
    assert isinstance(user_id, int) and isinstance(token, str)
    return user_id, token


def accept_prediction(
    ls_client: MakeClient, token: str | None, task_id: int, result: list[dict[str, Any]]
) -> int:
    """What Label Studio's editor posts when a person submits a prediction unchanged: its
    results, ``autoseg_`` ids and all, with the prediction it came from and the time spent."""

    async def run() -> int:
        async with ls_client() as ls:
            prediction = await ls.create_prediction(
                PredictionIn(task_id, result, score=0.9, model_version="test-v1")
            )
        async with ls_client(token) as person:
            made = await person.create_annotation(
                task_id, result, parent_prediction=prediction, lead_time=4.2
            )
        return made.id

    return asyncio.run(run())


def plan_output(replace: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Write a new plan; what the command printed."""
    capsys.readouterr()
    assert main(replace) == 0
    return capsys.readouterr().out


def test_replace_spares_a_prediction_a_person_accepted_and_replaces_its_own(
    setup: Setup, ls_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    run = annotate_and_plan(setup, capsys)  # first: a dry-run upload, the payload, a plan
    ids, payload = run["ids"], json.loads(run["payload"].read_text())
    results = {p["task"]: p["result"] for p in payload}
    assert all(r["id"].startswith("autoseg_") for r in results[ids[0]])
    annotator, token = sign_up_annotator(setup.server)

    # Another user accepts the prediction of the first task, before any plan is written.
    accepted = accept_prediction(ls_client, token, ids[0], results[ids[0]])
    out = plan_output(run["replace"], capsys)
    assert "2 task(s) get a new annotation, 0 annotation(s) deleted, 2 skipped" in out
    assert f"task {ids[0]}: skipped: has 1 human annotation(s) [{accepted}]" in out
    assert main([*run["replace"], "--execute"]) == 0
    ours = {t.id: t.annotations for t in tasks_of(ls_client, setup.project)}
    assert [len(ours[i] or ()) for i in ids] == [1, 1, 1, 1]

    # The token's own user accepts a prediction in the editor too: a person's act.
    by_me = accept_prediction(ls_client, None, ids[1], results[ids[1]])
    out = plan_output(run["replace"], capsys)
    assert "1 task(s) get a new annotation, 1 annotation(s) deleted, 3 skipped" in out
    assert f"task {ids[1]}: skipped: has 1 human annotation(s) [{by_me}]" in out

    # A plan edited by hand to delete the annotator's work is refused as a whole.
    forged = json.loads(run["plan"].read_text())
    entry = next(e for e in forged["tasks"] if e["task"] == ids[0])
    entry.update(skip=None, delete=[accepted])
    forged_path = setup.tmp / "forged.json"
    forged_path.write_text(json.dumps(forged))
    forged_run = [forged_path if a == str(run["plan"]) else a for a in run["replace"]]
    capsys.readouterr()
    assert main([*map(str, forged_run), "--execute"]) == 1
    out = capsys.readouterr().out
    assert f"task {ids[0]}: the plan deletes annotation(s) [{accepted}] made by a person" in out

    assert main([*run["replace"], "--execute"]) == 0
    after = {t.id: t for t in tasks_of(ls_client, setup.project)}
    (kept,) = after[ids[0]].annotations or ()
    assert kept.id == accepted and kept.completed_by == annotator
    assert [r["id"] for r in kept.result] == [r["id"] for r in results[ids[0]]]
    assert {a.id for a in after[ids[1]].annotations or ()} == {
        by_me,
        *(a.id for a in ours[ids[1]] or ()),
    }
    (replaced,) = after[ids[2]].annotations or ()
    assert replaced.id not in {a.id for a in ours[ids[2]] or ()}
