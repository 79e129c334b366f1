"""Webhook intake under load: latency of acknowledging 5000-task TASKS_CREATED bodies.

Run from the repository root (no Label Studio needed; about a minute with the defaults):

    .venv/bin/python benchmarks/bench_intake.py [--senders 8] [--bodies 320] [--tasks 5000]
    .venv/bin/python benchmarks/bench_intake.py --postgres   # the same on a PostgreSQL queue

What runs: the service's real web app (``service.app.create_app`` with its
``WebhookIntake``) and its real job queue
(``SQLiteJobQueue`` from ``service.queue.open_queue``: WAL, ``synchronous=FULL``) in a
temporary ``state_dir``, built from a config file (``config.yaml`` of this repository with
the project, server and state_dir replaced, written by ``service.config.write_config``), served
by uvicorn in a subprocess on 127.0.0.1 with the same uvicorn settings as ``ls-autoseg serve``
(``service.server.make_server``) and the CLI's INFO logging (to a file). The only stand-in is
the service side of the app: its ``wake()`` expands the queue's inbox into jobs in a thread
(what the worker's ``claim`` does first) and nothing claims them, so the jobs table only
grows (the worst case for the queue's indexes) and every body's 5000-row insert happens in
the server process during the run, as it would in the service.

``--postgres`` runs the same against the shared queue (``queue.url`` in the config file, so
``PostgresJobQueue``): a throwaway cluster from ``service.local.pgserver`` with ``fsync=on``,
as ``serve --role intake`` would use it (its ``accept`` writes inbox rows too, which the
workers' claims expand elsewhere: here nothing expands them during the run, and the app
wakes no worker: the queue's NOTIFY does). ``--queue-url URL`` uses a
PostgreSQL database of your own instead (one that holds no jobs yet).

What is measured: bodies shaped like Label Studio 1.23's (every Task field, plus the
serialized project; Label Studio sends at most ``WEBHOOK_BATCH_SIZE`` = 5000 tasks per body),
each with ``--tasks`` task ids distinct across all bodies, so each really becomes that many
rows. The bodies are built before timing starts. First ``--solo`` bodies are sent one at a
time (the latency of one body on an idle server), then ``--bodies`` bodies by ``--senders``
concurrent senders (threads, each sending its next body as soon as the last is answered, one
connection per request as Label Studio makes them), with the ``X-Webhook-Secret`` header.
Latency is measured client side, from before the request is sent to the end of the response.
Printed: the machine (CPU model from /proc/cpuinfo, cores this process may use, load average,
the file system of the state folder), p50, p95, p99 and max latency, bodies/s and task
rows/s, the p50 of the first and of the last tenth of the bodies (does enqueue slow down as
the table grows?), then the durability check: the server is killed with SIGKILL (no graceful
shutdown, so only what was committed survives), the queue is opened afresh (on SQLite, what
was still in the inbox is expanded, as the restarted service's first claim does), and it must hold
exactly one queued job per task id sent (read through the queue's API: ``span``, ``counts``);
every answer must have said ``queued: --tasks``.
The last line is the ratio p99 / 250 ms target (below 1.00 meets the target; lower is better).
Exit code 0 when the target is met and the durability check passes, 1 otherwise.

The client runs on the same machine as the server and takes CPU from it: on a small machine
(this project's has 2 shared cores) the figures are pessimistic and move with other load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import cpu_seconds, machine_line, service_config  # noqa: E402

from service.constants import SECRET_ENV, TOKEN_ENV, WEBHOOK_PATH  # noqa: E402
from service.local.process import ServiceProcess  # noqa: E402

TARGET_P99_MS = 250.0
SECRET = "bench-intake-secret-7b1e"
PROJECT = 1
# Label Studio's own limits, for the reader: at most 5000 tasks per TASKS_CREATED body
# (WEBHOOK_BATCH_SIZE) and a 1 s timeout (WEBHOOK_TIMEOUT), never retried.
LS_TIMEOUT_S = 1.0
SHOWN = ("server_version", "fsync")  # PostgreSQL's settings the machine line names


# --------------------------------------------------------------------------- server side


class _ExpandingHooks:
    """The service side of the app, reduced to what the worker does to the queue when woken
    with nobody claiming: on SQLite it expands the inbox into jobs (``queue.expand``, the first
    step of every ``claim``) in a thread, as the service's worker would. Jobs only pile up.
    On PostgreSQL (``--role intake``: no worker in the process) waking does nothing."""

    def __init__(self, queue: Any) -> None:
        from service.queue import SQLiteJobQueue

        self._queue = queue
        self._woken = threading.Event()
        if isinstance(queue, SQLiteJobQueue):
            threading.Thread(target=self._expand_loop, daemon=True).start()

    def _expand_loop(self) -> None:
        while True:
            self._woken.wait()
            self._woken.clear()
            self._queue.expand()

    def wake(self) -> None:
        self._woken.set()

    def request_reconcile(self, project: int | None) -> None:
        pass

    async def readiness(self) -> Any:
        from service.app import Readiness

        return Readiness(True, {"model": "not loaded (benchmark)"})


def serve(config_path: Path) -> None:
    """The subprocess: the production app and queue under uvicorn, as ``serve`` runs them."""
    import logging

    import uvicorn

    from service.app import create_app
    from service.config import load_config
    from service.intake import WebhookIntake, WebhookSettings
    from service.metrics import Metrics
    from service.queue import open_queue

    logging.basicConfig(  # as service.cli does
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = load_config(config_path)
    queue = open_queue(config)
    metrics = Metrics(queue)
    hooks = _ExpandingHooks(queue)
    webhook = WebhookIntake(WebhookSettings.from_config(config), queue, hooks, metrics)
    app = create_app([webhook], hooks, metrics)
    server = uvicorn.Server(
        uvicorn.Config(  # the settings of service.server.make_server
            app,
            host=config.server.host,
            port=config.server.port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
    )
    server.run()


# --------------------------------------------------------------------------- client side


def make_body(project: dict[str, Any], first_id: int, count: int) -> bytes:
    """A TASKS_CREATED body as Label Studio 1.23 serializes it (all Task fields)."""
    stamp = "2026-11-24T10:15:30.123456Z"
    tasks = [
        {
            "id": task_id,
            "data": {"image": f"/data/upload/{PROJECT}/{task_id:08x}-img_{task_id}.jpg"},
            "meta": {},
            "created_at": stamp,
            "updated_at": stamp,
            "is_labeled": False,
            "allow_skip": True,
            "overlap": 1,
            "inner_id": task_id,
            "total_annotations": 0,
            "cancelled_annotations": 0,
            "total_predictions": 0,
            "precomputed_agreement": None,
            "comment_count": 0,
            "unresolved_comment_count": 0,
            "last_comment_updated_at": None,
            "project": PROJECT,
            "updated_by": None,
            "file_upload": task_id,
            "comment_authors": [],
        }
        for task_id in range(first_id, first_id + count)
    ]
    return json.dumps({"action": "TASKS_CREATED", "tasks": tasks, "project": project}).encode()


def project_payload() -> dict[str, Any]:
    from service.local.quickstart import label_config
    from service.local.synthetic import LABELS

    return {
        "id": PROJECT,
        "title": "bench intake",
        "description": "",
        "label_config": label_config(LABELS),
        "expert_instruction": "",
        "show_instruction": False,
        "show_skip_button": True,
        "enable_empty_annotation": True,
        "show_annotation_history": False,
        "color": "#FFFFFF",
        "maximum_annotations": 1,
        "is_published": False,
        "model_version": "",
        "is_draft": False,
        "created_at": "2026-11-24T10:00:00.000000Z",
        "min_annotations_to_start_training": 0,
        "show_collab_predictions": True,
        "sampling": "Sequential sampling",
        "show_ground_truth_first": False,
        "show_overlap_first": False,
        "overlap_cohort_percentage": 100,
        "task_data_login": None,
        "task_data_password": None,
        "control_weights": {},
        "evaluate_predictions_automatically": False,
        "skip_queue": "REQUEUE_FOR_OTHERS",
        "reveal_preannotations_interactively": False,
        "pinned_at": None,
        "organization": 1,
        "created_by": 1,
    }


class Sender(threading.Thread):
    """Sends bodies taken from a shared list until it is empty; records each answer."""

    def __init__(
        self, url: str, bodies: list[tuple[int, bytes]], lock: threading.Lock, out: list[Any]
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.bodies, self.lock, self.out = url, bodies, lock, out

    def run(self) -> None:
        headers = {"X-Webhook-Secret": SECRET, "Content-Type": "application/json"}
        # No keep-alive: Label Studio posts each webhook on a new connection (requests.post).
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=60.0, limits=limits) as client:
            while True:
                with self.lock:
                    if not self.bodies:
                        return
                    index, body = self.bodies.pop(0)
                began = time.perf_counter()
                try:
                    response = client.post(self.url, content=body, headers=headers)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - began
                with self.lock:
                    self.out.append((index, elapsed, status, text))


def send_all(url: str, bodies: list[tuple[int, bytes]], senders: int) -> tuple[list[Any], float]:
    """Send with ``senders`` threads; returns the answers in send order and the wall time."""
    lock = threading.Lock()
    out: list[Any] = []
    todo = list(bodies)
    threads = [Sender(url, todo, lock, out) for _ in range(senders)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(out), time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --------------------------------------------------------------------------- machine facts


def filesystem_of(path: Path) -> str:
    """Type of the file system holding ``path`` (longest mount point of /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return f"{kind} (mounted on {best})" if best else kind


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- main


def summarize(name: str, answers: list[Any], wall_s: float, tasks: int) -> list[float]:
    ms = [elapsed * 1000.0 for _, elapsed, _, _ in answers]
    print(
        f"{name}: {len(ms)} bodies of {tasks} tasks: p50 {percentile(ms, 50):.1f} ms, "
        f"p95 {percentile(ms, 95):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
        f"max {max(ms):.1f} ms, mean {statistics.fmean(ms):.1f} ms; "
        f"{len(ms) / wall_s:.1f} bodies/s = {len(ms) * tasks / wall_s:,.0f} task rows/s "
        f"({wall_s:.1f} s); over Label Studio's {LS_TIMEOUT_S:g} s timeout: "
        f"{sum(1 for m in ms if m >= LS_TIMEOUT_S * 1000)}",
        flush=True,
    )
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=8, help="concurrent senders (default 8)")
    parser.add_argument(
        "--bodies", type=int, default=320, help="bodies sent concurrently (default 320)"
    )
    parser.add_argument("--tasks", type=int, default=5000, help="task ids per body (default 5000)")
    parser.add_argument(
        "--solo", type=int, default=10, help="bodies sent one at a time first (default 10)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--postgres", action="store_true", help="a PostgreSQL queue on a throwaway cluster"
    )
    parser.add_argument("--queue-url", help="a PostgreSQL queue of your own (empty)")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server subprocess
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if min(args.senders, args.bodies, args.tasks) < 1 or args.solo < 0:
        parser.error("--senders, --bodies and --tasks must be >= 1, --solo >= 0")
    if args.postgres and args.queue_url:
        parser.error("--postgres starts a cluster of its own: give it or --queue-url")
    with contextlib.ExitStack() as stack:
        pg_url = args.queue_url
        if args.postgres:
            from service.local import pgserver

            base = Path(tempfile.mkdtemp(prefix="bench-intake-pg-"))
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            pg = stack.enter_context(pgserver.cluster(base, fsync=True))
            pg_url = pg.database("bench_intake")
        return measure(args, pg_url)


def queue_facts(config: Any) -> str:
    """The queue's part of the machine line: SQLite's version and file system, or the
    PostgreSQL server's version and fsync setting (checked to hold no jobs yet)."""
    from service.queue import open_queue
    from service.queue.backends import queue_url

    url = queue_url(config)
    if url is None:
        return f"SQLite {sqlite3.sqlite_version}; state_dir on {filesystem_of(config.state_dir)}"
    import psycopg

    from service.queue.postgres_io import public_url

    with open_queue(config) as queue:
        if queue.span().jobs:
            raise SystemExit(f"the queue at {public_url(url)} holds jobs: give an empty one")
    with psycopg.connect(url) as conn:
        version, fsync = (conn.execute(f"SHOW {name}").fetchall()[0][0] for name in SHOWN)
    return f"PostgreSQL {version} (fsync {fsync}) as the queue (queue.url)"


def measure(args: argparse.Namespace, pg_url: str | None) -> int:
    """The run itself, on the PostgreSQL queue at ``pg_url``, or on SQLite when None."""
    from service.config import QueueConfig
    from service.local.lsserver import free_port

    folder = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    port = free_port()
    # the Label Studio URL is never called: no worker runs
    config_path, config = service_config(
        folder,
        "http://127.0.0.1:9",
        PROJECT,
        port,
        queue=QueueConfig(url=pg_url) if pg_url is not None else None,
    )
    config.state_dir.mkdir()
    try:
        facts = queue_facts(config)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    print(machine_line(f"python {platform.python_version()}", facts), flush=True)

    total = args.solo + args.bodies
    project = project_payload()
    began = time.perf_counter()
    bodies = [(i, make_body(project, 1 + i * args.tasks, args.tasks)) for i in range(total)]
    size = len(bodies[0][1])
    print(
        f"built {total} bodies of {args.tasks} tasks ({size / 1e6:.2f} MB each) in "
        f"{time.perf_counter() - began:.1f} s",
        flush=True,
    )

    log = folder / "server.log"
    env = {**os.environ, SECRET_ENV: SECRET, TOKEN_ENV: "unused"}
    server = ServiceProcess(
        config_path, port, log, env, command=[sys.executable, __file__, "--serve", str(config_path)]
    )
    url = server.url
    try:
        server.start(timeout_s=60, ready_path="/health")
        assert server.process is not None
        pid = server.process.pid
        answers: list[Any] = []
        if args.solo:
            solo, wall = send_all(f"{url}{WEBHOOK_PATH}", bodies[: args.solo], 1)
            summarize("one at a time (idle server)", solo, wall, args.tasks)
            answers += solo
        cpu = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
        loaded, wall = send_all(f"{url}{WEBHOOK_PATH}", bodies[args.solo :], args.senders)
        server_s = cpu_seconds(pid) - cpu[0]
        client_s = time.process_time() - cpu[1]
        other_s = machine_busy_seconds() - cpu[2] - server_s - client_s
        answers += loaded
        ms = summarize(f"{args.senders} concurrent senders", loaded, wall, args.tasks)
        print(
            f"CPU in that phase ({wall:.1f} s x {len(os.sched_getaffinity(0))} cores): server "
            f"{server_s:.1f} s ({1000 * server_s / len(loaded):.1f} ms a body), client "
            f"{client_s:.1f} s ({1000 * client_s / len(loaded):.1f} ms a body), other processes"
            f" {max(other_s, 0.0):.1f} s" + (" (PostgreSQL's among them)" if pg_url else ""),
            flush=True,
        )
        tenth = max(1, len(ms) // 10)
        print(
            f"growth: p50 of the first {tenth} concurrent bodies "
            f"{statistics.median(ms[:tenth]):.1f} ms, of the last {tenth} "
            f"{statistics.median(ms[-tenth:]):.1f} ms (queue from "
            f"{args.solo * args.tasks:,} to {total * args.tasks:,} rows)",
            flush=True,
        )
    finally:
        server.stop(signal.SIGKILL)  # no graceful shutdown: only commits survive
        del bodies

    bad = [(i, status, text[:200]) for i, _, status, text in answers if status != 200]
    wrong = [
        (i, text[:200])
        for i, _, status, text in answers
        if status == 200 and json.loads(text) != {"queued": args.tasks}
    ]
    # What the restarted service does first: open the queue afresh, and its first claims
    # expand the inbox (each backend's own fast path for webhooks, not part of JobQueue).
    from service.queue import JobState, SQLiteJobQueue, open_queue

    with open_queue(config) as reopened:
        on_sqlite = isinstance(reopened, SQLiteJobQueue)
        in_inbox = reopened.span().accepted
        reopened.expand()  # type: ignore[attr-defined]
        span, queued = reopened.span(), reopened.counts()[JobState.QUEUED]
    expected = total * args.tasks
    # A job's key is (project, task, model_version): one project and version here, so
    # ``expected`` jobs with ids from 1 to ``expected`` are each task id exactly once.
    durable = (
        not bad
        and not wrong
        and span.jobs == queued == expected
        and (span.first_task, span.last_task) == (1, expected)
    )
    print(
        "durability (server SIGKILLed"
        + (
            f" with {in_inbox:,} ids not yet expanded, "
            + ("SQLite file" if on_sqlite else "PostgreSQL queue")
            + " reopened and its inbox expanded"
        )
        + f"): {span.jobs:,} jobs (one per task id), "
        f"{queued:,} queued, ids {span.first_task}..{span.last_task}; expected {expected:,}: "
        f"{'OK' if durable else 'MISMATCH'}; non-200 answers {len(bad)}, answers not "
        f"'queued: {args.tasks}' {len(wrong)}",
        flush=True,
    )
    for item in (bad + wrong)[:5]:
        print(f"  {item}")
    if args.keep:
        print(f"kept {folder} (server log: {log})")
    else:
        shutil.rmtree(folder, ignore_errors=True)

    p99 = percentile(ms, 99)
    ratio = p99 / TARGET_P99_MS
    verdict = "PASS" if ratio < 1.0 else "FAIL"
    print(
        f"ratio p99 / target = {p99:.1f} ms / {TARGET_P99_MS:g} ms = {ratio:.2f} "
        f"(target p99 < {TARGET_P99_MS:g} ms, so below 1.00 passes; lower is better): {verdict}"
    )
    return 0 if verdict == "PASS" and durable else 1


if __name__ == "__main__":
    raise SystemExit(main())
