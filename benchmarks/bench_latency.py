"""Single-task latency: one image imported, webhook to stored prediction, ``--imports`` times.

Run from the repository root:

    .venv/bin/python benchmarks/bench_latency.py [--imports 50] [--size 1024x768]

A real Label Studio 1.23.2 (``service.local.lsserver``, temporary data folder) and ``ls-autoseg
serve`` with the repository's ``config.yaml`` (the demo model on CPU, ``label_studio.media_root``
as the quickstart sets it), the webhook registered with ``hook``. Then, one at a time, one
synthetic JPEG is imported (``upload_files``, one request) and the script waits until its
prediction is stored. For each import it records, from the moment before the import call:

- *import*: the import call returned (Label Studio stored the file and sent the webhook);
- *queued*: the job's ``created_at`` in the service's journal (the webhook answered);
- *stored*: the job marked done in the journal, right after Label Studio answered the post
  that stored its prediction: the latency;
- the part of it that is ``worker.settle_s`` (the post waits that long after the queueing,
  while the read, the image and the model run at once: see ``service/worker/pipeline.py``).

It prints p50 and p95 of each, and what the worker spent between queued and stored beyond
the settle delay. Exit code 0 when every import got exactly one prediction, 1 otherwise, 2 when
it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_pipeline import make_jpegs, parse_size  # noqa: E402
from machine import machine_line, service_config, start_hooked  # noqa: E402

from service.config import ReconcileConfig, load_config  # noqa: E402
from service.constants import SECRET_ENV, TOKEN_ENV  # noqa: E402
from service.labelstudio.client import LabelStudioClient  # noqa: E402
from service.local import lsserver  # noqa: E402
from service.local.process import ServiceProcess  # noqa: E402
from service.local.quickstart import label_config  # noqa: E402
from service.queue import JobState, open_queue  # noqa: E402

POLL_S = 0.01


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--imports", type=int, default=50)
    parser.add_argument("--size", type=parse_size, default=(1024, 768), help="WIDTHxHEIGHT")
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        ls = lsserver.start(work / "label-studio")
    except Exception as exc:
        print(f"cannot start Label Studio: {exc}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        return 2
    try:
        return asyncio.run(measure(args, work, ls))
    finally:
        ls.stop()
        shutil.rmtree(work, ignore_errors=True)


async def measure(args: argparse.Namespace, work: Path, ls: lsserver.LocalLabelStudio) -> int:
    base = load_config(args.config, environ={})
    width, height = args.size
    files = make_jpegs(args.imports, width, height)
    async with LabelStudioClient(ls.url, ls.legacy_token, timeout_s=120) as client:
        project = (
            await client.create_project(
                f"bench-latency {secrets.token_hex(3)}", label_config(base.model.output_labels)
            )
        ).id
        port = lsserver.free_port()
        config_path, config = service_config(
            work,
            ls.url,
            project,
            port,
            base=args.config,
            device="cpu",
            reconcile=ReconcileConfig(on_startup=False, interval_s=3600),
            media_root=ls.data_dir / "media",
        )
        env = {**os.environ, TOKEN_ENV: ls.legacy_token, SECRET_ENV: secrets.token_hex(16)}
        config = load_config(config_path, environ=env)
        service = ServiceProcess(config_path, port, work / "service.log", env)
        print(machine_line(f"{args.imports} imports of one {width}x{height} JPEG"))
        rows: list[tuple[float, float, float]] = []
        problems: list[str] = []
        try:
            if not start_hooked(service):
                return 2
            with open_queue(config) as queue:
                for name, data in files:
                    began = time.time()
                    await client.upload_files(project, [(name, data)])
                    imported = time.time() - began
                    tasks = [t async for t in client.iter_tasks(project)]
                    task = max(t.id for t in tasks)
                    deadline = time.monotonic() + 60
                    job = queue.get(project, task, config.prediction.model_version)
                    while (job is None or job.state is not JobState.DONE) and (
                        time.monotonic() < deadline
                    ):
                        await asyncio.sleep(POLL_S)
                        job = queue.get(project, task, config.prediction.model_version)
                    full = await client.get_task(task)
                    predictions = full.predictions or ()
                    if job is None or job.state is not JobState.DONE or len(predictions) != 1:
                        problems.append(f"task {task}: job {job}, {len(predictions)} prediction(s)")
                        continue
                    rows.append((imported, job.created_at - began, job.updated_at - began))
        finally:
            code = service.stop()
        if code not in (0, None):
            print(f"warning: the service exited with {code}:\n{service.tail()}")
    settle = config.worker.settle_s
    if rows:
        for label, index in (("import call returned", 0), ("job queued", 1), ("stored", 2)):
            values = [1000 * row[index] for row in rows]
            print(
                f"{label}: p50 {quantile(values, 0.5):.0f} ms, p95 {quantile(values, 0.95):.0f} "
                f"ms (max {max(values):.0f})"
            )
        worker = [1000 * (row[2] - row[1] - settle) for row in rows]
        print(
            f"of which worker.settle_s {1000 * settle:.0f} ms (the post waits for it; the read, "
            f"the image and the model do not); queued to stored beyond it: p50 "
            f"{quantile(worker, 0.5):.0f} ms, p95 {quantile(worker, 0.95):.0f} ms"
        )
        stored = [1000 * row[2] for row in rows]
        print(
            f"latency, import call to stored prediction, over {len(rows)} imports: p50 "
            f"{statistics.median(stored):.0f} ms, p95 {quantile(stored, 0.95):.0f} ms"
        )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 0 if rows and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
