"""The worker's ledger of held jobs: a slot is freed once per job, whatever settles it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.queue import Job, JobState
from service.worker.held import Held


def job(job_id: int) -> Job:
    return Job(job_id, 7, 100 + job_id, "v1", JobState.RUNNING, 1, None, 0.0, 0.0, 0.0)


def test_settling_frees_the_slot_once_and_refuses_a_second_settle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = Held(capacity=3)
    first, second = job(1), job(2)
    assert held.hold(first) and held.hold(second)
    assert (held.busy, held.room) == (2, 1)
    with held.settling(first) as ok:
        assert ok
        assert held.busy == 2  # still held while its outcome is being recorded
        assert not held.holds(first) and held.holds(second)
    assert (held.busy, held.room) == (1, 2)
    with (
        caplog.at_level(logging.ERROR, logger="service.worker.held"),
        held.settling(first) as again,
    ):
        assert not again
    assert held.busy == 1  # not 0: the second settle freed nothing
    assert "job 1 task 101 settled again (not held): refused" in caplog.text


def test_a_settle_begun_already_is_refused_and_an_error_frees_the_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = Held(capacity=2)
    held.hold(job(1))
    with pytest.raises(RuntimeError, match="journal"), held.settling(job(1)) as ok:
        assert ok
        with held.settling(job(1)) as nested:
            assert not nested
        raise RuntimeError("journal write failed")
    assert held.busy == 0
    assert "settled again (being settled)" in caplog.text


def test_a_job_claimed_twice_is_held_once(caplog: pytest.LogCaptureFixture) -> None:
    held = Held(capacity=2)
    assert held.hold(job(5))
    assert not held.hold(job(5))
    assert held.busy == 1
    assert "job 5 task 105 claimed again while held here" in caplog.text


def test_wait_for_room_returns_when_a_job_is_settled() -> None:
    async def main() -> None:
        held = Held(capacity=1)
        held.hold(job(1))
        stop = asyncio.Event()
        waiter = asyncio.create_task(held.wait_for_room(stop))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # full: nothing settled yet
        with held.settling(job(1)):
            pass
        await asyncio.wait_for(waiter, 1)
        assert held.room == 1

    asyncio.run(main())
