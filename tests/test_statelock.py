"""The state directory's lock: one ``serve`` per ``state_dir``, and a lock that a crash never
leaves behind. The same with real ``serve`` and ``backfill`` processes is in
tests/test_instances_real.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import cli
from service import config as settings
from service.errors import ConfigError
from service.statelock import LOCK_FILE, StateLock, holder

HOLD = (
    "import sys, time; from pathlib import Path; from service.statelock import StateLock;"
    " lock = StateLock.acquire(Path(sys.argv[1]), 'serve'); print('locked', flush=True);"
    " time.sleep(120)"
)


@pytest.fixture
def held_elsewhere(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on ``tmp_path / "state"``, as a running serve does."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "state")], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "locked\n"
    yield child
    child.kill()
    child.wait()
    child.stdout.close()


def test_a_held_state_dir_cannot_be_locked_again_and_says_who_holds_it(
    tmp_path: Path, held_elsewhere: subprocess.Popen[str]
) -> None:
    state = tmp_path / "state"
    assert StateLock.try_acquire(state, "serve") is None
    assert holder(state) == f"pid {held_elsewhere.pid} (serve)"
    with pytest.raises(ConfigError) as raised:
        StateLock.acquire(state, "serve")
    assert str(state) in str(raised.value) and f"pid {held_elsewhere.pid}" in str(raised.value)


def test_a_killed_holder_leaves_no_stale_lock(
    tmp_path: Path, held_elsewhere: subprocess.Popen[str]
) -> None:
    held_elsewhere.send_signal(signal.SIGKILL)
    held_elsewhere.wait()
    with StateLock.acquire(tmp_path / "state", "backfill") as lock:
        assert lock.held
        assert holder(tmp_path / "state") == f"pid {os.getpid()} (backfill)"
    assert not lock.held
    assert (tmp_path / "state" / LOCK_FILE).exists()  # kept: another may be locking it now


def test_one_process_cannot_lock_twice_and_release_frees_it(tmp_path: Path) -> None:
    first = StateLock.acquire(tmp_path, "serve")
    assert StateLock.try_acquire(tmp_path, "backfill") is None  # another descriptor: refused
    first.release()
    first.release()
    again = StateLock.try_acquire(tmp_path, "backfill")
    assert again is not None
    again.release()


def test_an_unusable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create the lock file"):
        StateLock.try_acquire(blocker / "state", "serve")


def test_a_second_serve_on_a_held_state_dir_exits_2_naming_it_and_the_holder(
    tmp_path: Path,
    held_elsewhere: subprocess.Popen[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LABEL_STUDIO_TOKEN", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("LS_AUTOSEG_WEBHOOK_SECRET", "a-secret-of-some-length")
    config = settings.write_config(
        tmp_path / "config.yaml",
        settings.ModelConfig(path=tmp_path / "never-loaded.pt", labels=("a",)),
        label_studio=settings.LabelStudioConfig(
            "http://127.0.0.1:9", settings.MissingEnv("LABEL_STUDIO_TOKEN")
        ),
        projects=[settings.ProjectConfig(1)],
        server=settings.ServerConfig(
            webhook_secret=settings.MissingEnv("LS_AUTOSEG_WEBHOOK_SECRET")
        ),
        state_dir=tmp_path / "state",
    )
    assert cli.main(["serve", "--config", str(config)]) == cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert f"state_dir {tmp_path / 'state'} is in use by pid {held_elsewhere.pid} (serve)" in error
