"""Peak memory of ``ls-autoseg serve`` working through a backlog of full-size images.

Run from the repository root (it starts a real Label Studio from the cached environment the
tests use, ~1 min; then the service works through the backlog at 2-4 tasks/s on 2 shared
cores, so 5000 tasks take 20-45 min: try a small backlog first):

    .venv/bin/python benchmarks/bench_memory.py --tasks 200
    .venv/bin/python benchmarks/bench_memory.py [--tasks 5000] [--bound-mb 1500]

Setup: a temporary Label Studio 1.23.2 (``service.local.lsserver.start``) with a BrushLabels
project whose labels are the demo model's (``service.local.quickstart.label_config``).
``--images`` distinct synthetic ``--width`` x ``--height`` JPEGs (``service.local.synthetic``)
are uploaded once; the rest of the ``--tasks`` backlog is imported as JSON tasks (in chunks)
whose ``data.image`` re-uses those ``/data/upload/...`` URLs, so the service downloads and
decodes a full-size image for every task. All of it is imported before the service starts, so
it is a true backlog, found by the start-up reconcile (no webhook is registered). Then
``python -m service.cli serve --config F`` runs as a subprocess with the repository's
``config.yaml`` settings (the bundled demo model ``models/demo_unet.pt``, batch_size,
prob_upsample, reconcile and worker settings as configured; only the Label Studio URL, project,
port and state_dir are this run's).

Measured: the service process's VmRSS (and the kernel's high-water mark VmHWM) from
/proc/PID/status every ``--sample-s`` seconds, and progress from the service's job queue, read
through its API (``counts``: jobs done + skipped + failed over the backlog). Printed: the
machine (CPU model from /proc/cpuinfo, cores this process may use, load average, memory), the
setup times, RSS when the service is ready (model loaded, before the first job finishes), RSS
at 10/25/50/75/100 % of the backlog with the peak so far, the peak RSS and VmHWM, the rate
(tasks/s from the first to the last finished job), the CPU seconds a task of the service and of
Label Studio, the peak RSS in each tenth of the backlog, the jobs by state (every job must end
done), and the last line:

    ratio growth = peak RSS while 50-100 % done / peak RSS while 0-10 % done
                   (about 1.00 = not growing with the backlog; above 1.15 counts as growth)
          peak / bound = VmHWM / --bound-mb (below 1.00 passes)

Exit code 0 when every job is done, VmHWM is under the bound and the growth ratio is at most
1.15; 1 otherwise. ``--timeout-s`` stops waiting (the figures so far are printed, exit 1).
Label Studio serves the images and takes the predictions on the same machine, so on a small
machine the rate moves with its load (and with anything else running).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_seconds, machine_line, service_config

from service.config import load_config
from service.constants import SECRET_ENV, TOKEN_ENV
from service.errors import RetryableError
from service.labelstudio.client import LabelStudioClient
from service.local import lsserver
from service.local.process import ServiceProcess
from service.local.quickstart import label_config
from service.local.synthetic import make_sample
from service.queue import JobQueue, open_queue

REPO = Path(__file__).resolve().parent.parent

SECRET = "bench-memory-secret-51d0"
MILESTONES = (10, 25, 50, 75, 100)
GROWTH_LIMIT = 1.15
FINISHED = ("done", "skipped", "failed")


# --------------------------------------------------------------------------- machine facts


def meminfo_gb(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def proc_status_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of ``pid`` in MB, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    if len(values) != 2:
        return None
    return values["VmRSS"], values["VmHWM"]


# --------------------------------------------------------------------------- setup


def jpeg(seed: int, width: int, height: int) -> bytes:
    sample = make_sample(np.random.default_rng(seed), height=height, width=width)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def fill_project(
    url: str, token: str, labels: list[str], args: argparse.Namespace
) -> tuple[int, int]:
    """Create the project and its backlog; return (project id, tasks in it)."""
    async with LabelStudioClient(url, token, timeout_s=300) as ls:
        project = (await ls.create_project("bench memory", label_config(tuple(labels)))).id
        began = time.perf_counter()
        files = [
            (f"bench_{i}.jpg", jpeg(1000 + i, args.width, args.height)) for i in range(args.images)
        ]
        sizes = ", ".join(f"{len(data) / 1e6:.2f}" for _, data in files)
        ids = await ls.upload_files(project, files)
        urls = [str((await ls.get_task(task_id)).data["image"]) for task_id in ids]
        print(
            f"uploaded {len(files)} synthetic {args.width}x{args.height} JPEGs ({sizes} MB) in "
            f"{time.perf_counter() - began:.1f} s: {', '.join(urls)}",
            flush=True,
        )
        began = time.perf_counter()
        rest = args.tasks - len(ids)
        imported = 0
        for start in range(0, rest, args.chunk):
            chunk = [
                {"data": {"image": urls[(start + k) % len(urls)]}}
                for k in range(min(args.chunk, rest - start))
            ]
            imported += len(await ls.import_tasks(project, chunk))
        total = len(ids) + imported
        print(
            f"imported {imported} JSON tasks re-using those URLs in "
            f"{time.perf_counter() - began:.1f} s: backlog of {total} tasks in project {project}",
            flush=True,
        )
        return project, total


# --------------------------------------------------------------------------- watching


@dataclass
class Watch:
    total: int
    samples: list[tuple[float, float, float, int]] = field(default_factory=list)
    """(seconds since start, VmRSS MB, VmHWM MB, jobs finished)"""
    counts: dict[str, int] = field(default_factory=dict)
    first_done_s: float | None = None
    last_done_s: float | None = None

    def finished(self) -> int:
        return sum(self.counts.get(state, 0) for state in FINISHED)

    def peak_between(self, low: float, high: float) -> float:
        """Peak VmRSS over the samples taken while low..high percent of the backlog was done."""
        values = [
            rss for _, rss, _, done in self.samples if low <= 100.0 * done / self.total <= high
        ]
        return max(values) if values else float("nan")


def queue_counts(queue: JobQueue) -> dict[str, int] | None:
    """Jobs by state, the states that have any; None while the queue is busy (next sample)."""
    try:
        return {str(state): count for state, count in queue.counts().items() if count}
    except RetryableError:
        return None


def watch(
    process: subprocess.Popen[bytes], queue: JobQueue, total: int, args: argparse.Namespace
) -> Watch:
    state = Watch(total)
    began = time.monotonic()
    next_milestone = 0
    reached: dict[int, tuple[float, float, float]] = {}
    while True:
        now = time.monotonic() - began
        mem = proc_status_mb(process.pid)
        if mem is None or process.poll() is not None:
            print(f"the service exited early ({process.returncode})", flush=True)
            break
        counts = queue_counts(queue)
        state.counts = state.counts if counts is None else counts
        done = state.finished()
        if done and state.first_done_s is None:
            state.first_done_s = now
        if state.samples and done > state.samples[-1][3]:
            state.last_done_s = now
        state.samples.append((now, mem[0], mem[1], done))
        while next_milestone < len(MILESTONES) and 100 * done >= MILESTONES[next_milestone] * total:
            pct = MILESTONES[next_milestone]
            peak = max(rss for _, rss, _, _ in state.samples)
            reached[pct] = (now, mem[0], peak)
            print(
                f"{pct:3d} % ({done}/{total} jobs finished, {now:6.1f} s): VmRSS {mem[0]:7.1f} MB,"
                f" peak so far {peak:7.1f} MB, VmHWM {mem[1]:7.1f} MB",
                flush=True,
            )
            next_milestone += 1
        if done >= total:
            break
        if now > args.timeout_s:
            print(f"timeout after {now:.0f} s with {done}/{total} jobs finished", flush=True)
            break
        time.sleep(args.sample_s)
    return state


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="backlog size (default 5000)")
    parser.add_argument("--images", type=int, default=4, help="distinct images uploaded")
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=500, help="JSON tasks per import request")
    parser.add_argument("--bound-mb", type=float, default=1500.0, help="RSS bound (default 1500)")
    parser.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling period")
    parser.add_argument(
        "--timeout-s", type=float, default=3600.0, help="stop waiting after this (default 3600)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.tasks < args.images or args.images < 1:
        parser.error("--tasks must be >= --images >= 1")

    print(
        machine_line(
            f"memory {meminfo_gb('MemTotal'):.1f} GB ({meminfo_gb('MemAvailable'):.1f} GB "
            "available)",
            f"python {platform.python_version()}",
        ),
        flush=True,
    )
    folder = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    began = time.perf_counter()
    ls = lsserver.start(folder / "label-studio")
    print(
        f"Label Studio {lsserver.LABEL_STUDIO_VERSION} started in "
        f"{time.perf_counter() - began:.1f} s at {ls.url}",
        flush=True,
    )
    service: ServiceProcess | None = None
    try:
        labels = list(load_config(REPO / "config.yaml", environ={}).model.labels)
        project, total = asyncio.run(fill_project(ls.url, ls.legacy_token, labels, args))
        port = lsserver.free_port()
        config_path, config = service_config(folder, ls.url, project, port)
        model, reconcile = config.model, config.reconcile
        print(
            f"service config {config_path}: model {model.path} (input_size {model.input_size},"
            f" batch_size {model.batch_size}, threads {model.threads}), prob_upsample "
            f"{config.prediction.prob_upsample}, reconcile on_startup {reconcile.on_startup} "
            f"interval_s {reconcile.interval_s:g}",
            flush=True,
        )
        env = {
            **os.environ,
            TOKEN_ENV: ls.legacy_token,
            SECRET_ENV: SECRET,
        }
        service = ServiceProcess(config_path, port, folder / "service.log", env)
        began = time.perf_counter()
        service.start(timeout_s=120)
        assert service.process is not None
        pid = service.process.pid
        ready_mem = proc_status_mb(pid) or (float("nan"), float("nan"))
        cpu_before = cpu_seconds(pid), cpu_seconds(ls.process.pid)
        print(
            f"service ready in {time.perf_counter() - began:.1f} s: VmRSS {ready_mem[0]:.1f} MB,"
            f" VmHWM {ready_mem[1]:.1f} MB",
            flush=True,
        )
        # The service's own queue, read beside it (as ``ls-autoseg status`` does).
        with open_queue(config) as queue:
            state = watch(service.process, queue, total, args)
            failures = queue.recent_failures(5)
        final = proc_status_mb(pid)
        cpu_used = (
            cpu_seconds(pid) - cpu_before[0],
            cpu_seconds(ls.process.pid) - cpu_before[1],
        )
        code = service.stop(timeout_s=90)
        print(f"service stopped with SIGTERM: exit code {code}", flush=True)
    finally:
        if service is not None:
            service.kill()
        ls.stop()

    hwm = final[1] if final else max(h for _, _, h, _ in state.samples)
    peak = max(rss for _, rss, _, _ in state.samples)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(state.counts.items()))
    print(f"jobs: {counts} (backlog {total})")
    for job in failures:
        print(f"  failed: task {job.task}: {job.reason}")
    done = state.finished()
    if state.first_done_s is not None and state.last_done_s and done > 1:
        span = state.last_done_s - state.first_done_s
        rate = (done - 1) / span if span > 0 else float("nan")
        print(
            f"rate: {rate:.2f} tasks/s ({1 / rate:.3f} s a task) from the first to the last "
            f"finished job ({span:.0f} s); the whole backlog took {state.last_done_s:.0f} s "
            "after the service was ready"
        )
        print(
            f"CPU while working: service {cpu_used[0]:.0f} s ({cpu_used[0] / done:.3f} s a task),"
            f" Label Studio {cpu_used[1]:.0f} s ({cpu_used[1] / done:.3f} s a task)"
        )
    tenths = ", ".join(f"{state.peak_between(10 * k, 10 * k + 10):.0f}" for k in range(10))
    print(f"peak VmRSS (MB) in each tenth of the backlog, 0-10 % first: {tenths}")
    first = state.peak_between(0, 10)
    last = state.peak_between(50, 100)
    print(
        f"peak VmRSS {peak:.1f} MB (sampled every {args.sample_s:g} s), VmHWM {hwm:.1f} MB; "
        f"peak while 0-10 % done {first:.1f} MB, while 50-100 % done {last:.1f} MB; "
        f"bound {args.bound_mb:g} MB"
    )
    if args.keep:
        print(f"kept {folder} (service log: {folder / 'service.log'})")
    else:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    growth = last / first
    bounded = hwm / args.bound_mb
    complete = state.counts.get("done", 0) == total
    ok = complete and bounded < 1.0 and growth <= GROWTH_LIMIT
    print(
        f"ratio growth = peak RSS 50-100 % / 0-10 % = {growth:.2f} (about 1.00 = not growing; "
        f"<= {GROWTH_LIMIT} passes); peak / bound = {hwm:.0f} / {args.bound_mb:g} MB = "
        f"{bounded:.2f} (below 1.00 passes): {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
