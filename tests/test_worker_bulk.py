"""Bulk posts (label_studio.bulk_predictions) against the fake Label Studio of
test_worker_faults.py, for the faults a real server cannot produce on demand: a bulk call that
times out after storing, one that fails halfway, a 5xx. The real server's side is in
test_labelstudio_real.py and test_service_real.py."""

from __future__ import annotations

import re

import pytest
from test_worker_faults import (
    PROJECT,
    TASK_RE,
    FakeLabelStudio,
    Run,
    assert_one_correct_prediction_each,
)
from test_worker_faults import queue as queue  # the fixtures, found by their names
from test_worker_faults import run as run

from service.queue import JobState
from service.queue.sqlite import SQLiteJobQueue

BULK = f"POST /api/projects/{PROJECT}/import/predictions"


def reasons(queue: SQLiteJobQueue, tasks: list[int]) -> list[str]:
    return [str(queue.get(PROJECT, t, "v1").reason) for t in tasks]  # type: ignore[union-attr]


def test_auto_finds_the_cheap_bulk_path_and_posts_groups_in_one_call_each(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 17)))
    run(fake, bulk_predictions="auto", batch_wait_s=0.5)
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert all(fake.predictions[t][0]["bulk"] for t in fake.tasks)
    assert "POST /api/predictions/" not in fake.requests
    calls = fake.requests.count(BULK)
    # one question (task 0, refused), then one call per post group: 16 tasks in batches of 4
    assert 2 <= calls <= 1 + 4, fake.requests
    assert [r for r in fake.requests if TASK_RE.match(r.split()[1])] == []
    assert all(re.fullmatch(r"prediction \(bulk of \d+\)", r) for r in reasons(queue, fake.tasks))


def test_auto_on_a_label_studio_without_the_flag_posts_one_by_one(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 9)), bulk_cheap=False)
    run(fake, bulk_predictions="auto")
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert fake.requests.count(BULK) == 1  # the question only, asked once
    assert fake.requests.count("POST /api/predictions/") == 8


def test_off_never_asks_and_on_never_asks_either(run: Run, queue: SQLiteJobQueue) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 9)), bulk_cheap=False)
    run(fake, bulk_predictions="on", batch_wait_s=0.5)
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert "POST /api/predictions/" not in fake.requests
    assert all(fake.predictions[t][0]["bulk"] for t in fake.tasks)
    # on: no question; every call stored its whole group
    assert queue.counts()[JobState.DONE] == 8


def test_a_bulk_call_that_times_out_after_storing_is_not_posted_again(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 9)))
    fake.faults = {("POST", r"/import/predictions$"): ["timeout-after"]}
    run(fake, bulk_predictions="on", batch_wait_s=0.5)
    assert_one_correct_prediction_each(fake, fake.tasks)
    first = [t for t in fake.tasks if queue.get(PROJECT, t, "v1").attempts == 2]  # type: ignore[union-attr]
    assert first, "the timed-out call's jobs were retried"
    # each retry read its task first, found the prediction, and ended without a second post
    assert all(r == "exists" for r in reasons(queue, first)), reasons(queue, first)


def test_a_bulk_call_that_fails_halfway_stores_each_task_once_and_the_bad_one_fails_alone(
    run: Run, queue: SQLiteJobQueue
) -> None:
    """Label Studio checks and stores a batch at a time (here 2): a task deleted between the
    check before the post and the call fails the call after the batches before it."""
    fake = FakeLabelStudio(tasks=list(range(1, 9)), import_batch=2)
    deleted: list[int] = []

    def handler_deleting_before_the_first_bulk_call(request):  # type: ignore[no-untyped-def]
        if request.url.path.endswith("/import/predictions") and not deleted:
            items = __import__("json").loads(request.content)
            victim = items[len(items) // 2 + 1]["task"] if len(items) > 2 else None
            if victim is not None:
                deleted.append(victim)
                fake.tasks.remove(victim)
        return original(request)

    original = fake.handler
    fake.handler = handler_deleting_before_the_first_bulk_call  # type: ignore[method-assign]
    run(fake, bulk_predictions="on", batch_wait_s=0.5)
    assert deleted, "the first bulk call had more than two predictions"
    (victim,) = deleted
    assert victim not in fake.predictions
    assert_one_correct_prediction_each(fake, fake.tasks)
    stored_first = [t for t in fake.tasks if fake.predictions[t][0].get("bulk")]
    posted_alone = [t for t in fake.tasks if not fake.predictions[t][0].get("bulk")]
    assert stored_first and posted_alone  # some before the bad batch, the rest one by one
    failed = queue.get(PROJECT, victim, "v1")
    assert failed is not None and failed.state is JobState.FAILED, failed
    assert "404" in str(failed.reason) or "not found" in str(failed.reason).lower(), failed.reason
    assert any("stored by a bulk call that then failed" in r for r in reasons(queue, fake.tasks))


def test_a_bulk_call_answered_500_is_retried_through_the_queue(
    run: Run, queue: SQLiteJobQueue
) -> None:
    fake = FakeLabelStudio(tasks=list(range(1, 9)))
    fake.faults = {("POST", r"/import/predictions$"): [500]}
    run(fake, bulk_predictions="on", batch_wait_s=0.5)
    assert_one_correct_prediction_each(fake, fake.tasks)
    assert max(queue.get(PROJECT, t, "v1").attempts for t in fake.tasks) == 2  # type: ignore[union-attr]
    assert queue.counts()[JobState.FAILED] == 0


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_post_stored_only_after_the_retrys_recheck_is_undone_on_a_local_queue(
    run: Run, queue: SQLiteJobQueue, mode: str
) -> None:
    """The post got no answer and Label Studio stored it late: after the retry's re-check,
    just before the retry's own post. The retry knows (its reason) and keeps the first."""
    fake = FakeLabelStudio(tasks=list(range(1, 5)))
    path = r"/import/predictions$" if mode == "on" else r"^/api/predictions/$"
    fake.faults = {("POST", path): ["timeout-late"]}
    run(fake, bulk_predictions=mode, batch_wait_s=0.5)
    assert fake.deleted, "the later prediction of a raced task was deleted"
    assert_one_correct_prediction_each(fake, fake.tasks)
    for task in fake.tasks:  # the one that stayed is the first stored for its task
        (kept,) = fake.predictions[task]
        assert kept["id"] == min(i for t, i in fake.history if t == task)
