"""What the benchmarks share: facts about the machine they ran on, a process's CPU time,
and waiting for a server they started. Imported by the scripts in this folder (run from the
repository root, ``benchmarks/`` is on ``sys.path`` as the script's own folder)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from pathlib import Path

import httpx


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (nan once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(
    process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float, what: str
) -> None:
    """Until ``url`` answers 200; exits the benchmark with ``log`` if ``process`` dies or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {what} exited ({process.returncode}):\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the {what} did not answer within {timeout_s:.0f} s:\n{log.read_text()}")
