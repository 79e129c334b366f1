"""``ls-autoseg serve`` in a subprocess, and waiting for a server to answer: what the tests,
the benchmarks and ``lsserver`` share (``tests/`` keeps its own fixtures on top of these).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from service.errors import ServiceStartError


def wait_http(
    url: str,
    timeout_s: float,
    *,
    alive: Callable[[], bool] | None = None,
    interval_s: float = 0.2,
    request_timeout_s: float = 2.0,
) -> bool:
    """GET ``url`` until it answers 200 and return True; return False once ``alive()`` says
    the server is gone or ``timeout_s`` has passed (the caller knows which and what to say)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            if httpx.get(url, timeout=request_timeout_s).status_code == 200:
                return True
        except httpx.HTTPError:
            pass  # not listening yet, or busy starting up
        time.sleep(interval_s)
    return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServiceProcess:
    """``python -m service.cli serve --config FILE`` in a subprocess, as an operator runs it.

    It runs in a process group of its own (a benchmark counts the group's CPU time; a Ctrl-C
    meant for the caller does not reach it, the caller stops it). Its output is appended to
    ``log``, so a restarted service keeps one log. ``env`` is copied; change ``self.env``
    before ``start`` to restart it with another token. ``command`` replaces the ``serve``
    command line (a benchmark that serves the app its own way); ``cli`` still runs
    ``service.cli``.
    """

    def __init__(
        self,
        config: Path,
        port: int,
        log: Path,
        env: Mapping[str, str],
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.env = dict(env)
        self.command = list(command or self._cli_command("serve"))
        self.process: subprocess.Popen[bytes] | None = None

    def _cli_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "service.cli", *args, "--config", str(self.config)]

    def start(self, timeout_s: float = 120.0, ready_path: str = "/ready") -> None:
        """Start it and wait until ``ready_path`` answers 200; ``ServiceStartError`` with the
        log's tail if it exits or is not ready in time (it is then killed)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_http(f"{self.url}{ready_path}", timeout_s, alive=self.alive):
            return
        if self.alive():
            self.kill()
            problem = f"was not ready within {timeout_s:.0f} s"
        else:
            problem = f"exited with code {self.process.returncode}"
        raise ServiceStartError(f"the service {problem}; {self.log}:\n{self.tail()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Another ``ls-autoseg`` command (``status``, ``hook``, ``backfill``...) on the same
        config and environment."""
        return subprocess.run(
            self._cli_command(*args), env=self.env, capture_output=True, text=True, check=False
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        """Send ``sig`` and return the exit code; killed if it has not exited in ``timeout_s``.
        None if it was never started; the code it had if it exited already."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)
