"""What a run asked of Label Studio, by kind of request, and what each kind costs its CPU.

Label Studio's runserver logs one line per request (``"GET /api/tasks/?... HTTP/1.1" 200 N``).
``requests_since`` reads the lines a run added and sorts them by kind; ``Replay`` measures each
kind's CPU in Label Studio afterwards, one request at a time on a quiet server, in the state the
service met them (a fresh scratch project: unpredicted tasks for reads, the run's own masks for
posts, the run's own file URLs for downloads), so that the run's CPU can be split by kind:
count x cost per request, and the rest (what the replay does not explain) printed beside it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

LINE = re.compile(r'"(GET|POST|PATCH|DELETE|PUT) (\S+) HTTP/1\.\d" (\d{3})')

KINDS = (
    "import (the benchmark's upload)",
    "task list, lean",
    "task list, full",
    "task, one",
    "prediction, one",
    "predictions, bulk",
    "image file",
    "other",
)


def kind_of(method: str, target: str) -> str:
    url = urlsplit(target)
    path, query = url.path, parse_qs(url.query)
    if method == "POST" and re.fullmatch(r"/api/projects/\d+/import", path):
        return KINDS[0]
    if method == "GET" and path == "/api/tasks/":
        return KINDS[1] if "include" in query else KINDS[2]
    if method == "GET" and re.fullmatch(r"/api/tasks/\d+/", path):
        return KINDS[3]
    if method == "POST" and path == "/api/predictions/":
        return KINDS[4]
    if method == "POST" and re.fullmatch(r"/api/projects/\d+/import/predictions", path):
        return KINDS[5]
    if method == "GET" and path.startswith("/data/"):
        return KINDS[6]
    return KINDS[7]


def ids_in(target: str) -> int:
    """Task ids named by a list read's ``selectedItems`` (0 when none)."""
    query = parse_qs(urlsplit(target).query).get("query")
    if not query:
        return 0
    try:
        selected = json.loads(query[0]).get("selectedItems") or {}
    except ValueError:
        return 0
    return len(selected.get("included") or [])


@dataclass
class Requests:
    """The requests of a run: count per kind, and the logged targets (to replay)."""

    counts: Counter[str] = field(default_factory=Counter)
    targets: dict[str, list[str]] = field(default_factory=dict)
    ids: Counter[str] = field(default_factory=Counter)  # task ids named, per list-read kind

    def add(self, method: str, target: str) -> None:
        kind = kind_of(method, target)
        self.counts[kind] += 1
        self.targets.setdefault(kind, []).append(target)
        self.ids[kind] += ids_in(target)


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def requests_since(path: Path, offset: int) -> Requests:
    """The requests logged after ``offset``. Label Studio 1.23.2 writes each access line twice
    (two handlers on one logger, another thread's line may come between): a line equal to
    one of the few before it, to the millisecond, is the same request."""
    out = Requests()
    recent: deque[str] = deque(maxlen=16)
    with path.open("rb") as log:
        log.seek(offset)
        for raw in log:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            match = LINE.search(line)
            if match and line not in recent:
                out.add(match.group(1), match.group(2))
            recent.append(line)
    return out


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Replay:
    """Label Studio's CPU per request of each kind, measured one request at a time."""

    http: httpx.Client
    pid: int  # Label Studio's process (runserver serves from it)
    cost_ms: dict[str, float] = field(default_factory=dict)

    def measure(self, kind: str, send: Callable[[], Any], times: int) -> None:
        if times <= 0:
            return
        send()  # warm: the first of a kind pays for imports and caches
        before = process_cpu_s(self.pid)
        for _ in range(times):
            send()
        time.sleep(0.05)  # let a response's last writes land on the clock
        self.cost_ms[kind] = 1000 * (process_cpu_s(self.pid) - before) / times

    def split(self, run: Requests) -> dict[str, float]:
        """CPU seconds of the run per kind: its count x the replayed cost per request."""
        return {
            kind: run.counts[kind] * self.cost_ms[kind] / 1000
            for kind in KINDS
            if run.counts[kind] and kind in self.cost_ms
        }


def checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise RuntimeError(
            f"replay: {response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:200]}"
        )
    return response


def replay_all(
    http: httpx.Client,
    pid: int,
    run: Requests,
    *,
    project_config: str,
    results: list[list[dict[str, Any]]],
    model_version: str,
    upload: Callable[[int], None],
    tasks: int,
    times: int = 8,
) -> Replay:
    """Replay each kind the run made, ``times`` requests each, in a scratch project.

    ``results``: prediction results the run stored (posted again to the scratch tasks);
    ``upload(project)``: one import as the benchmark made it (files), into ``project``."""
    replay = Replay(http, pid)
    scratch = checked(
        http.post("/api/projects/", json={"title": "bench replay", "label_config": project_config})
    ).json()["id"]
    lean_group = max(1, round(run.ids[KINDS[1]] / max(1, run.counts[KINDS[1]])))
    full_group = max(1, round(run.ids[KINDS[2]] / max(1, run.counts[KINDS[2]])))
    bulk_group = max(1, round(tasks / max(1, run.counts[KINDS[5]])))
    needed = (times + 1) * (lean_group + full_group + bulk_group + 1) + len(results)
    tasks = checked(
        http.post(
            f"/api/projects/{scratch}/import?return_task_ids=true",
            json=[{"data": {"image": f"/data/upload/replay/{i}.jpg"}} for i in range(needed)],
        )
    ).json()["task_ids"]
    fresh = iter(tasks)

    def take(count: int) -> list[int]:
        return [next(fresh) for _ in range(count)]

    def lean() -> None:
        from service.labelstudio.queries import LEAN_FIELDS, untouched_query

        ids = take(lean_group)
        query = json.dumps(untouched_query(model_version, ids=ids))
        params = {"project": scratch, "page_size": len(ids), "include": LEAN_FIELDS, "query": query}
        checked(http.get("/api/tasks/", params=params))

    def full() -> None:
        ids = take(full_group)
        query = json.dumps({"selectedItems": {"all": False, "included": ids}})
        params = {"project": scratch, "page_size": len(ids), "fields": "all", "query": query}
        checked(http.get("/api/tasks/", params=params))

    stored = results or [[]]  # a model that found nothing posts empty results
    masks = iter(stored * (needed // len(stored) + 1))

    def body(task: int) -> dict[str, Any]:
        return {"task": task, "result": next(masks), "score": 0.5, "model_version": model_version}

    def bulk() -> None:
        items = [body(task) for task in take(bulk_group)]
        checked(http.post(f"/api/projects/{scratch}/import/predictions", json=items))

    def one() -> None:
        checked(http.post("/api/predictions/", json={**body(take(1)[0]), "project": scratch}))

    files = iter(run.targets.get(KINDS[6], []) * (times + 1))

    def file() -> None:
        checked(http.get(next(files)))

    def task_one() -> None:
        checked(http.get(f"/api/tasks/{take(1)[0]}/"))

    kinds: Iterable[tuple[str, Callable[[], Any], int]] = (
        (KINDS[1], lean, times),
        (KINDS[2], full, times),
        (KINDS[3], task_one, times),
        (KINDS[4], one, times),
        (KINDS[5], bulk, times),
        (KINDS[6], file, times),
    )
    for kind, send, count in kinds:
        if run.counts[kind]:
            replay.measure(kind, send, count)
    if run.counts[KINDS[0]]:
        target = checked(
            http.post(
                "/api/projects/", json={"title": "bench import", "label_config": project_config}
            )
        ).json()["id"]
        replay.measure(KINDS[0], lambda: upload(target), 1)
    return replay
