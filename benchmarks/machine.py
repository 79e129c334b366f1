"""What the benchmarks share: facts about the machine they ran on, a process's CPU time and
the service's config (``service.local.process`` runs the service). Imported by the scripts
in this folder (run from the repository root, ``benchmarks/`` is on ``sys.path`` as the
script's own folder)."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

from service import config as settings
from service.constants import SECRET_ENV, WEBHOOK_PATH
from service.local.process import ServiceProcess

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line(*details: str) -> str:
    """``machine: <CPU>, <n> core(s) usable (...), load average ...`` then ``details``, each
    after a semicolon (what the benchmark adds: memory, Python, SQLite, file system)."""
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    head = (
        f"machine: {cpu_model()}, {cores} core(s) usable (os.cpu_count {os.cpu_count()}), "
        f"load average {load}"
    )
    return "; ".join([head, *details])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (nan once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_config(
    folder: Path,
    url: str,
    project: int,
    port: int,
    *,
    base: Path = REPO / "config.yaml",
    device: str | None = None,
    reconcile: settings.ReconcileConfig | None = None,
    queue: settings.QueueConfig | None = None,
    media_root: Path | None = None,
    model_path: Path | None = None,
) -> tuple[Path, settings.Config]:
    """``base`` (the repository's config.yaml unless given) with this run's Label Studio URL,
    project, server and state_dir, and ``model.device``, ``reconcile``, ``queue`` and
    ``label_studio.media_root`` (Label Studio's uploads read from disk) and ``model.path``
    where given, written
    to ``folder`` by the service's own writer. Returns its path and the settings read back
    (``${...}`` values unset: ``serve`` reads them from its environment)."""
    given = settings.load_config(base, environ={})
    secret = settings.MissingEnv(SECRET_ENV)
    path = settings.write_config(
        folder / "config.yaml",
        replace(
            given.model,
            device=device or given.model.device,
            path=model_path or given.model.path,
        ),
        prediction=given.prediction,
        label_studio=replace(
            given.label_studio,
            url=url,
            media_root=media_root or given.label_studio.media_root,
        ),
        projects=[settings.ProjectConfig(project)],
        server=settings.ServerConfig(host="127.0.0.1", port=port, webhook_secret=secret),
        state_dir=folder / "state",
        reconcile=reconcile or given.reconcile,
        worker=given.worker,
        queue=queue,
    )
    return path, settings.load_config(path, environ={})


def start_hooked(service: ServiceProcess) -> bool:
    """Start ``serve`` and register its webhook with ``hook``, as an operator does; False (the
    reason printed) when the hook fails."""
    service.start()
    hooked = service.cli("hook", "--url", f"{service.url}{WEBHOOK_PATH}")
    if hooked.returncode != 0:
        print(f"hook failed:\n{hooked.stdout}{hooked.stderr}", file=sys.stderr)
        return False
    return True
