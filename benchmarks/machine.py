"""What the benchmarks share: facts about the machine they ran on, a process's CPU time and
the service's config (``service.local.process`` runs the service). Imported by the scripts
in this folder (run from the repository root, ``benchmarks/`` is on ``sys.path`` as the
script's own folder)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import yaml

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


def service_config(folder: Path, url: str, project: int, port: int) -> tuple[Path, dict[str, Any]]:
    """The repository's config.yaml with this run's Label Studio URL, project, server and
    state_dir, written to ``folder``; returns its path and content."""
    doc = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    doc["model"]["path"] = str(REPO / doc["model"]["path"])
    doc["label_studio"]["url"] = url
    doc["projects"] = [{"id": project}]
    doc["server"] = {
        "host": "127.0.0.1",
        "port": port,
        "webhook_secret": "${LS_AUTOSEG_WEBHOOK_SECRET}",
    }
    doc["state_dir"] = str(folder / "state")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path, doc
