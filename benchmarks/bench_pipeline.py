"""Pipeline efficiency: the webhook service against the bare model, on CPU, in the same run.

Run from the repository root (the first run installs Label Studio into its cached venv):

    .venv/bin/python benchmarks/bench_pipeline.py [--images 200] [--size 1024x768]
        [--reads disk|http] [--model heavy|FILE] [--bare-runs 2]

What it does:

1. Starts a real Label Studio 1.23.2 (``service.local.lsserver``, temporary data folder) and
   creates a BrushLabels project with the demo model's labels (``quickstart.label_config``).
   Meanwhile it draws ``--images`` synthetic images (``service.local.synthetic``, the demo model's
   own data, seeded) at ``--size`` and encodes them as JPEG (quality 90).
2. Writes a service config from ``--config`` (default: the repository's ``config.yaml``, the
   bundled demo model) with ``machine.service_config``: its sections verbatim but this run's
   Label Studio URL, project, server and state_dir, ``model.device`` (``--device``,
   default ``cpu``: the target is a CPU target) and ``label_studio.media_root`` (``--reads
   disk``, the default: the uploads are read from Label Studio's media folder, as the
   quickstart does; ``--reads http`` downloads them from Label Studio). Both sides
   load that same file, so batch size, thresholds, ``prob_upsample``, ``min_pixels`` and
   torch threads are the same. ``reconcile.on_startup`` is false and its interval an hour:
   the project is empty at start-up, and a webhook that got lost must show as a failure
   rather than be hidden by a reconcile pass.
3. Bare model, ``--bare-runs`` runs (default 2), in this process: the same
   ``load_segmenter``'s model and ``PredictionConfig``; the JPEG bytes are decoded with
   ``service.model.images.decode_image`` in two threads, ahead of the model (as ``predict`` does),
   and ``model.predict_each`` runs in batches of ``model.batch_size`` (it includes the resize,
   the forward pass, the probability upsampling and thresholding, and ``min_pixels``). It does
   not write ``predict``'s mask and overlay files and does not RLE-encode: those are each
   side's own output, not model work. The cost of ``build_prediction`` (the RLE encoding the
   service must do) is timed apart and printed for reference. One untimed batch warms the
   model up first.
4. Service: ``python -m service.cli serve`` as a subprocess (as an operator runs it,
   ``service.local.process.ServiceProcess``), waits for ``/ready``, registers the webhook
   with ``python -m service.cli hook``, then imports all images with one
   ``LabelStudioClient.upload_files`` call (Label Studio accepts at most 100 files per
   request, so that call sends ceil(N / 100) requests, one webhook each). The clock starts
   just before that call and stops at the ``created_at`` of the last prediction, as Label
   Studio recorded it (the service's own journal, which marks a job done after its POST
   returned, is printed as a cross-check). Progress is polled from the service's job journal
   through the queue's own read API (``counts``, ``span``; every 0.5 s), which puts no load
   on Label Studio. At the end every task is read back: each must have exactly one
   prediction, of the configured model_version.
5. Bare model again, ``--bare-runs`` runs, after the service has stopped. The bare figure is
   the median of all bare runs (before and after), so a load change on a shared machine hits
   both sides alike and one disturbed run does not decide it.

It prints the machine, the images, each run, where the CPU went during the service run (per
process group, from /proc) and the service's own metrics; the predictions per second and the
service's peak memory per tenth of the predictions (for ``--images 10000``: the last tenth's
rate against the first, the peak flat); Label Studio's CPU split by kind of request (its
access log counts each kind; each kind is then replayed one request at a time on the idle
server, in a scratch project, to price it: ``ls_requests.py``) and the part the service caused
(all but the benchmark's import); the service's CPU outside its model threads (the threads
named ``pipeline.MODEL_THREAD``, read from /proc/<pid>/task); and, from the first prediction to
the last, how busy the model and Label Studio were and how idle the machine; then the bare
and service images/s and, last, the ratio service/bare against the target (0.5 with the demo
model, 0.85 with ``--model``). Other load on the machine skews the ratio (a two-thread torch
run suffers far more from a stolen core than Label Studio does), so when other processes used
over 10% of the CPUs during a run, or the bare runs differ by over 25%, a WARNING line says
the figures are unreliable. Exit code 0 when the targets (ratio, Label Studio's and the
service's CPU a task) are met and every task has exactly one prediction, 1 otherwise, 2 when
it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ls_requests import KINDS, Requests, log_size, replay_all, requests_since  # noqa: E402
from machine import cpu_model, service_config, start_hooked  # noqa: E402

from service.config import Config, PredictionConfig, ReconcileConfig, load_config  # noqa: E402
from service.constants import SECRET_ENV, TOKEN_ENV  # noqa: E402
from service.labelstudio.client import LabelStudioClient  # noqa: E402
from service.local import lsserver  # noqa: E402
from service.local.process import ServiceProcess  # noqa: E402
from service.local.quickstart import label_config  # noqa: E402
from service.local.synthetic import make_sample  # noqa: E402
from service.model import ImagePrediction, Segmenter, load_segmenter  # noqa: E402
from service.model.images import decode_image  # noqa: E402
from service.queue import JobQueue, open_queue  # noqa: E402
from service.results import BrushTarget, build_prediction, resolve_target  # noqa: E402
from service.worker.pipeline import MODEL_THREAD  # noqa: E402

TARGET = 0.5  # service/bare with the demo model (issue 13)
TARGET_HEAVY = 0.85  # with a model of >= 100 ms an image (--model)
LS_TARGET_MS = {"disk": 20.0, "http": 35.0}  # Label Studio CPU a task caused by the service
SERVICE_TARGET_MS = 8.0  # the service's CPU a task outside predict_each
# Above these, a run was disturbed by other load and its ratio says little.
NOISE_SHARE = 0.10
NOISE_SPREAD = 1.25
SEED = 20251201
JPEG_QUALITY = 90
POLL_S = 0.5
INFERENCE_SUM = "ls_autoseg_inference_seconds_sum"  # the service's predict_each seconds
SAMPLE_S = 0.25  # CPU and memory samples during the service run
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ machine


def groups_cpu_s(pgids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of the live processes in each process group, one pass over
    /proc for all of them (the sampling runs beside the service: it must cost little)."""
    by_group = {pgid: 0 for pgid in pgids.values()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        group = int(fields[2])
        if group in by_group:
            by_group[group] += int(fields[11]) + int(fields[12])
    return {name: by_group[pgid] / CLK_TCK for name, pgid in pgids.items()}


def threads_cpu_s(pid: int, name: str) -> float:
    """User + system CPU seconds of the live threads of ``pid`` whose name is ``name``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass
class CpuSnapshot:
    groups: dict[str, float]
    machine_busy: float
    machine_total: float

    @classmethod
    def take(cls, groups: dict[str, int]) -> CpuSnapshot:
        busy, total = machine_cpu_s()
        return cls(groups_cpu_s(groups), busy, total)

    def other_share(self, before: CpuSnapshot) -> float:
        """Share of the machine's CPU time used by processes outside ``groups`` since then."""
        ours = sum(self.groups[name] - before.groups[name] for name in self.groups)
        busy = self.machine_busy - before.machine_busy
        total = self.machine_total - before.machine_total
        return max(0.0, busy - ours) / total if total > 0 else 0.0


# ------------------------------------------------------------------------------ images


def make_jpegs(count: int, width: int, height: int) -> list[tuple[str, bytes]]:
    files = []
    for index in range(count):
        sample = make_sample(np.random.default_rng(SEED + index), height=height, width=width)
        buffer = io.BytesIO()
        Image.fromarray(sample.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        files.append((f"bench_{index:04d}.jpg", buffer.getvalue()))
    return files


# ------------------------------------------------------------------------------ bare model


@dataclass
class BareRun:
    seconds: float
    model_seconds: float  # inside predict_each
    images: int
    other_share: float  # of the machine's CPU, used by processes not ours meanwhile

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _decoded(
    pool: ThreadPoolExecutor, jpegs: Sequence[bytes], max_pixels: int, window: int
) -> Iterator[np.ndarray]:
    """Decode in the pool, at most ``window`` images ahead of the consumer (as ``predict``)."""
    futures: list[Future[np.ndarray]] = []
    upcoming = iter(jpegs)
    while True:
        while len(futures) < window:
            data = next(upcoming, None)
            if data is None:
                break
            futures.append(pool.submit(decode_image, data, max_pixels=max_pixels))
        if not futures:
            return
        yield futures.pop(0).result()


def bare_run(
    model: Segmenter,
    prediction: PredictionConfig,
    jpegs: Sequence[bytes],
    groups: dict[str, int],
) -> BareRun:
    """Decode + ``predict_each`` over all images, in batches of ``model.batch_size``."""
    size = model.batch_size
    model_s = 0.0
    done = 0
    before = CpuSnapshot.take(groups)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-decode") as pool:
        began = time.perf_counter()
        batch: list[np.ndarray] = []
        for image in _decoded(pool, jpegs, prediction.max_pixels, window=2 * size):
            batch.append(image)
            if len(batch) == size:
                model_s += _predict(model, prediction, batch)
                done += len(batch)
                batch = []
        if batch:
            model_s += _predict(model, prediction, batch)
            done += len(batch)
        elapsed = time.perf_counter() - began
    return BareRun(elapsed, model_s, done, CpuSnapshot.take(groups).other_share(before))


def _predict(model: Segmenter, prediction: PredictionConfig, batch: list[np.ndarray]) -> float:
    began = time.perf_counter()
    results = model.predict_each(batch, prediction)
    spent = time.perf_counter() - began
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"bare model failed on an image: {failed[0]}")
    return spent


def encode_ms_per_image(
    model: Segmenter,
    prediction: PredictionConfig,
    jpegs: Sequence[bytes],
    target: BrushTarget,
) -> float:
    """Median ms of ``build_prediction`` (RLE of the kept masks) per image, on a few images."""
    images = [decode_image(data, max_pixels=prediction.max_pixels) for data in jpegs]
    results = model.predict_each(images, prediction)
    times = []
    for result in results:
        assert isinstance(result, ImagePrediction)
        began = time.perf_counter()
        build_prediction(
            1,
            {m.label: m.mask for m in result.kept},
            result.width,
            result.height,
            target,
            score=prediction.score,
            model_version=prediction.model_version,
        )
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


# ------------------------------------------------------------------------------ service


def service_metrics(url: str) -> dict[str, float]:
    """The service's Prometheus samples, ``name{labels}`` -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


@dataclass
class Journal:
    """What the service's job journal says: counts by state and the times of done jobs."""

    counts: dict[str, int] = field(default_factory=dict)
    first_queued: float | None = None
    last_queued: float | None = None
    last_done: float | None = None

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("done", "skipped", "failed"))

    @classmethod
    def read(cls, queue: JobQueue) -> Journal:
        counts = {str(state): count for state, count in queue.counts().items() if count}
        span = queue.span()
        return cls(counts, span.first_created, span.last_created, span.last_done)


@dataclass
class ServiceRun:
    started: float  # epoch seconds, just before the import call
    import_s: float
    first_prediction: float  # epoch seconds, Label Studio's created_at
    last_prediction: float
    journal: Journal
    tasks: int
    exactly_one: int
    problems: list[str]
    cpu: dict[str, float]
    other_share: float
    machine_busy_s: float
    machine_total_s: float
    metrics: dict[str, float]
    requests: Requests
    samples: list[tuple[float, CpuSnapshot]]  # (epoch, CPU) every poll
    results: list[list[dict[str, Any]]]  # some stored prediction results, to replay
    inference: list[tuple[float, float]]  # (epoch, the service's predict_each seconds so far)
    times: list[float]  # every prediction's created_at, sorted
    rss: list[tuple[float, int]]  # (epoch, the service's resident kB)
    peak_kb: int  # the service's VmHWM at the end
    model_cpu: float  # CPU seconds of the service's model threads (pipeline.MODEL_THREAD)

    def tenths(self) -> list[tuple[float, int]]:
        """Per tenth of the predictions (in time order): predictions/s, the peak RSS in kB."""
        out = []
        count = len(self.times)
        start = self.times[0] if self.times else 0.0
        for tenth in range(10):
            lo, hi = tenth * count // 10, (tenth + 1) * count // 10 - 1
            if hi <= lo:
                continue
            # From the end of the tenth before (bulk posts store a group at one moment).
            end = self.times[hi]
            rate = (hi - lo + (1 if tenth == 0 else 0)) / max(1e-9, end - start)
            peak = max((kb for at, kb in self.rss if start <= at <= end), default=0)
            out.append((rate, peak))
            start = end
        return out

    def model_busy(self) -> float:
        """Share of the first-to-last-prediction time the service spent in predict_each."""

        def at(moment: float) -> float:
            return min(self.inference, key=lambda s: abs(s[0] - moment))[1]

        span = self.last_prediction - self.first_prediction
        return (at(self.last_prediction) - at(self.first_prediction)) / span if span > 0 else 0.0

    def window(self) -> tuple[CpuSnapshot, CpuSnapshot, float]:
        """CPU snapshots nearest the first and the last prediction, and the seconds between."""
        first = min(self.samples, key=lambda s: abs(s[0] - self.first_prediction))
        last = min(self.samples, key=lambda s: abs(s[0] - self.last_prediction))
        return first[1], last[1], max(1e-9, last[0] - first[0])

    @property
    def seconds(self) -> float:
        return self.last_prediction - self.started

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


async def prediction_times(url: str, token: str, project: int) -> list[float]:
    """Epoch ``created_at`` of every prediction of the project, read once, at the end."""
    times: list[float] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60
    ) as http:
        page = 1
        while True:
            answer = await http.get(
                "/api/predictions/", params={"project": project, "page": page, "page_size": 500}
            )
            answer.raise_for_status()
            body: Any = answer.json()
            items = body if isinstance(body, list) else body.get("results", [])
            times.extend(datetime.fromisoformat(p["created_at"]).timestamp() for p in items)
            if isinstance(body, list) or not body.get("next"):
                return times
            page += 1


async def run_service(
    client: LabelStudioClient,
    ls: lsserver.LocalLabelStudio,
    service: ServiceProcess,
    project: int,
    files: list[tuple[str, bytes]],
    model_version: str,
    queue: JobQueue,
    timeout_s: float,
) -> ServiceRun:
    assert service.process is not None
    groups = {
        "service": service.process.pid,
        "Label Studio": ls.process.pid,
        "this process": os.getpgid(0),
    }
    offset = log_size(ls.log_path)
    model_before = threads_cpu_s(service.process.pid, MODEL_THREAD)
    before = CpuSnapshot.take(groups)
    started = time.time()
    samples = [(started, before)]
    inference = [(started, 0.0)]
    rss: list[tuple[float, int]] = []
    sampling = asyncio.create_task(_sample(groups, samples, rss))
    try:
        await client.upload_files(project, files)
        import_s = time.time() - started
        deadline = time.monotonic() + timeout_s
        journal = Journal.read(queue)
        while journal.finished < len(files) and time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited during the run:\n{service.tail()}")
            await asyncio.sleep(POLL_S)
            journal = Journal.read(queue)
            metrics_now = await asyncio.to_thread(service_metrics, service.url)
            inference.append((time.time(), metrics_now.get(INFERENCE_SUM, 0.0)))
    finally:
        sampling.cancel()
    after = CpuSnapshot.take(groups)
    samples.append((time.time(), after))
    peak_kb = _status_kb(service.process.pid, "VmHWM")
    model_cpu = threads_cpu_s(service.process.pid, MODEL_THREAD) - model_before
    requests = requests_since(ls.log_path, offset)
    metrics = service_metrics(service.url)

    problems: list[str] = []
    if journal.finished < len(files):
        problems.append(
            f"timeout after {timeout_s:.0f} s: the journal has {journal.counts} for "
            f"{len(files)} images (a lost webhook leaves tasks out of the journal)"
        )
    if journal.counts.get("failed") or journal.counts.get("skipped"):
        problems.append(f"jobs not done: {journal.counts}")
    tasks = [t async for t in client.iter_tasks(project, fields_all=True)]
    exactly_one = 0
    for task in tasks:
        predictions = task.predictions or ()
        if len(predictions) == 1 and predictions[0].model_version == model_version:
            exactly_one += 1
        elif len(problems) < 10:
            problems.append(f"task {task.id}: {len(predictions)} prediction(s)")
    if len(tasks) != len(files):
        problems.append(f"{len(tasks)} tasks for {len(files)} images")
    results = [
        [dict(r) for r in task.predictions[0].result]
        for task in tasks[:20]
        if task.predictions and task.predictions[0].result
    ]
    times = await prediction_times(ls.url, ls.legacy_token, project)
    if not times:
        raise RuntimeError(f"no prediction arrived; service log:\n{service.tail()}")
    cpu = {name: after.groups[name] - before.groups[name] for name in groups}
    return ServiceRun(
        started=started,
        import_s=import_s,
        first_prediction=min(times),
        last_prediction=max(times),
        journal=journal,
        tasks=len(tasks),
        exactly_one=exactly_one,
        problems=problems,
        cpu=cpu,
        other_share=after.other_share(before),
        machine_busy_s=after.machine_busy - before.machine_busy,
        machine_total_s=after.machine_total - before.machine_total,
        metrics=metrics,
        requests=requests,
        samples=samples,
        results=results,
        inference=inference,
        times=sorted(times),
        rss=rss,
        peak_kb=peak_kb,
        model_cpu=model_cpu,
    )


async def _sample(
    groups: dict[str, int], into: list[tuple[float, CpuSnapshot]], rss: list[tuple[float, int]]
) -> None:
    """CPU snapshots and the service's resident memory every ``SAMPLE_S`` (in a thread: /proc
    reads block), until cancelled."""
    while True:
        await asyncio.sleep(SAMPLE_S)
        snapshot = await asyncio.to_thread(CpuSnapshot.take, groups)
        into.append((time.time(), snapshot))
        rss.append((time.time(), _status_kb(groups["service"], "VmRSS")))


def _status_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` figure in kB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------ main


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, not {text!r}") from None
    if width < 32 or height < 32:
        raise argparse.ArgumentTypeError("size must be at least 32x32")
    return width, height


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images imported at once")
    parser.add_argument("--size", type=parse_size, default=(1024, 768), help="WIDTHxHEIGHT")
    parser.add_argument("--config", type=Path, default=REPO / "config.yaml")
    parser.add_argument(
        "--device", default="cpu", help="model.device for both sides ('config': keep the file's)"
    )
    parser.add_argument(
        "--bare-runs", type=int, default=2, help="bare model runs before and again after"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model both sides run instead of --config's: a TorchScript file with the same "
        "contract, or 'heavy': the demo UNet five times as wide (~11x its cost: ~130 ms an "
        "image on 2 cores), random weights",
    )
    parser.add_argument(
        "--reads",
        choices=("disk", "http"),
        default="disk",
        help="how the service gets the uploaded images: from Label Studio's media folder "
        "(label_studio.media_root, as the quickstart does; default) or downloaded from it",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the service")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    return parser.parse_args(argv)


def model_file(name: str, work: Path) -> Path:
    """``--model``: a file as given, or 'heavy', written to ``work``: the demo model's UNet
    (scripts/train_demo_model.py) with five times its widths, random weights, exported the
    same way (frozen TorchScript, per-label logits): what a production-size model costs."""
    if name != "heavy":
        return Path(name).resolve()
    sys.path.insert(0, str(REPO / "scripts"))
    import train_demo_model as demo  # the script's own classes, not a copy

    torch.manual_seed(0)
    wide = tuple(width * 5 for width in demo.WIDTHS)
    model = demo.LabelLogits(demo.UNet(widths=wide)).eval()
    path = work / "heavy_unet.pt"
    torch.jit.save(torch.jit.freeze(torch.jit.script(model)), str(path))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.images < 1 or args.bare_runs < 1:
        print("--images and --bare-runs must be >= 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        return _main(args, work)
    finally:
        if args.keep:
            print(f"data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _main(args: argparse.Namespace, work: Path) -> int:
    width, height = args.size
    print(f"starting Label Studio and drawing {args.images} images ...", flush=True)
    started: dict[str, Any] = {}

    def start_ls() -> None:
        try:
            started["ls"] = lsserver.start(work / "label-studio")
        except BaseException as exc:
            started["error"] = exc

    starter = threading.Thread(target=start_ls, name="label-studio")
    starter.start()
    files = make_jpegs(args.images, width, height)
    starter.join()
    if "error" in started:
        print(f"cannot start Label Studio: {started['error']}", file=sys.stderr)
        return 2
    ls: lsserver.LocalLabelStudio = started["ls"]
    try:
        return _measure(args, work, ls, files)
    finally:
        ls.stop()


def _measure(
    args: argparse.Namespace,
    work: Path,
    ls: lsserver.LocalLabelStudio,
    files: list[tuple[str, bytes]],
) -> int:
    width, height = args.size
    jpegs = [data for _, data in files]
    base = load_config(args.config, environ={})

    async def make_project() -> tuple[int, BrushTarget]:
        async with LabelStudioClient(ls.url, ls.legacy_token) as client:
            title = f"bench-pipeline {secrets.token_hex(3)}"
            project = await client.create_project(title, label_config(base.model.output_labels))
            return project.id, resolve_target(project, base.model.output_labels)

    project, target = asyncio.run(make_project())
    port = lsserver.free_port()
    device = None if args.device == "config" else args.device
    no_reconcile = ReconcileConfig(on_startup=False, interval_s=3600)
    config_path, _ = service_config(
        work,
        ls.url,
        project,
        port,
        base=args.config,
        device=device,
        reconcile=no_reconcile,
        media_root=ls.data_dir / "media" if args.reads == "disk" else None,
        model_path=None if args.model is None else model_file(args.model, work),
    )
    secret = secrets.token_hex(16)
    env = {**os.environ, TOKEN_ENV: ls.legacy_token, SECRET_ENV: secret}
    config: Config = load_config(config_path, environ=env)
    model = load_segmenter(config.model)
    prediction = config.prediction
    batch = config.model.batch_size

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs online, "
        f"{len(os.sched_getaffinity(0))} usable; python {platform.python_version()}, "
        f"torch {torch.__version__}; torch threads {torch.get_num_threads()} "
        f"(model.threads {config.model.threads}: the service process applies the same rule)"
    )
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    mean_kb = statistics.mean(len(d) for d in jpegs) / 1024
    print(
        f"images: {len(files)} synthetic JPEGs {width}x{height} (quality {JPEG_QUALITY}, "
        f"mean {mean_kb:.0f} KB); model {config.model.path.name} on {model.device}, "
        f"input_size {config.model.input_size}, batch_size {batch}, "
        f"prob_upsample {prediction.prob_upsample}"
    )
    if len(files) < 200:
        print(f"note: N = {len(files)}; the issue's figure needs --images 200 or more")

    # Warm-up, untimed: one batch.
    model.predict_each(
        [decode_image(d, max_pixels=prediction.max_pixels) for d in jpegs[:batch]], prediction
    )
    encode_ms = encode_ms_per_image(model, prediction, jpegs[:batch], target)
    model_cpu_ms = model_cpu_ms_per_image(model, prediction, jpegs[: 2 * batch], batch)
    # Our process groups: this one and Label Studio's (idle during the bare runs).
    ours = {"this process": os.getpgid(0), "Label Studio": ls.process.pid}
    bare: list[BareRun] = []
    for _ in range(args.bare_runs):
        bare.append(bare_run(model, prediction, jpegs, ours))
        _print_bare(len(bare), bare[-1])

    service = ServiceProcess(config_path, port, work / "service.log", env)
    try:
        if not start_hooked(service):
            return 2

        async def run(queue: JobQueue) -> ServiceRun:
            async with LabelStudioClient(ls.url, ls.legacy_token, timeout_s=300) as client:
                return await run_service(
                    client,
                    ls,
                    service,
                    project,
                    files,
                    prediction.model_version,
                    queue,
                    args.timeout,
                )

        # The service's own queue, read beside it (as ``ls-autoseg status`` does).
        with open_queue(config) as queue:
            result = asyncio.run(run(queue))
    finally:
        code = service.stop()
    if code not in (0, None):
        print(f"warning: the service exited with {code}:\n{service.tail()}")
    _print_service(result, batch)
    print("replaying each kind of request against the idle Label Studio ...", flush=True)
    split_ok = _print_split(ls, result, files, base, args.reads, model_cpu_ms)

    for _ in range(args.bare_runs):
        bare.append(bare_run(model, prediction, jpegs, ours))
        _print_bare(len(bare), bare[-1])

    print(
        f"build_prediction (RLE + JSON, service side only): {encode_ms:.1f} ms/image "
        f"(median of {min(batch, len(jpegs))} images)"
    )
    bare_rate = statistics.median(r.rate for r in bare)
    ratio = result.rate / bare_rate
    target_ratio = TARGET if args.model is None else TARGET_HEAVY
    ok = not result.problems and ratio >= target_ratio and split_ok
    for problem in result.problems:
        print(f"PROBLEM: {problem}")
    rates = [r.rate for r in bare]
    busiest = max([result.other_share, *(r.other_share for r in bare)])
    noise = []
    if busiest > NOISE_SHARE:
        noise.append(f"other processes used up to {busiest:.0%} of the CPUs during a run")
    if max(rates) > NOISE_SPREAD * min(rates):
        noise.append(f"the bare runs ranged from {min(rates):.1f} to {max(rates):.1f} images/s")
    if noise:
        print(
            f"WARNING: the machine was not quiet ({'; '.join(noise)}): both figures, and so "
            "the ratio, are unreliable; run it again on a quiet machine"
        )
    print(
        f"bare model: {bare_rate:.2f} images/s (median of {len(bare)} runs: "
        f"{args.bare_runs} before the service, {args.bare_runs} after)"
    )
    print(f"service: {result.rate:.2f} images/s ({result.tasks} images in {result.seconds:.2f} s)")
    print(f"target: service/bare >= {target_ratio}")
    if result.problems:
        verdict = "FAIL (see PROBLEM)"
    elif ratio < target_ratio:
        verdict = "FAIL"
    else:
        verdict = "PASS" if split_ok else "PASS (a CPU target above is not met: exit 1)"
    print(f"ratio service/bare: {ratio:.3f} ({verdict})")
    return 0 if ok else 1


def model_cpu_ms_per_image(
    model: Segmenter, prediction: PredictionConfig, jpegs: Sequence[bytes], batch: int
) -> float:
    """This process's CPU in ``predict_each`` per image, images decoded beforehand (so no
    other thread of ours runs meanwhile): what the service spends inside the model."""
    images = [decode_image(d, max_pixels=prediction.max_pixels) for d in jpegs]
    began = time.process_time()
    for start in range(0, len(images), batch):
        model.predict_each(images[start : start + batch], prediction)
    return 1000 * (time.process_time() - began) / max(1, len(images))


def _print_split(
    ls: lsserver.LocalLabelStudio,
    run: ServiceRun,
    files: list[tuple[str, bytes]],
    base: Config,
    reads: str,
    model_cpu_ms: float,
) -> bool:
    """Label Studio's CPU by kind of request, the service's outside the model, and the
    utilisations; True when the CPU targets are met."""

    def upload(project: int) -> None:
        async def go() -> None:
            async with LabelStudioClient(ls.url, ls.legacy_token, timeout_s=300) as client:
                await client.upload_files(project, files[:100])

        asyncio.run(go())

    with httpx.Client(
        base_url=ls.url, headers={"Authorization": f"Token {ls.legacy_token}"}, timeout=300
    ) as http:
        replay = replay_all(
            http,
            ls.process.pid,
            run.requests,
            project_config=label_config(base.model.output_labels),
            results=run.results,
            model_version=base.prediction.model_version,
            upload=upload,
            tasks=run.tasks,
        )
    split = replay.split(run.requests)
    ls_cpu = run.cpu["Label Studio"]
    tasks = max(1, run.tasks)
    print(
        f"Label Studio: {ls_cpu:.2f} CPU-s from the import call to the end; by kind of request "
        "(count x its CPU a request, replayed one at a time afterwards):"
    )
    for kind in KINDS:
        count = run.requests.counts[kind]
        if not count:
            continue
        cost = replay.cost_ms.get(kind)
        if cost is None:
            print(f"  {kind}: {count} requests (not replayed)")
            continue
        print(
            f"  {kind}: {count} x {cost:.1f} ms = {split[kind]:.2f} s "
            f"({1000 * split[kind] / tasks:.1f} ms a task)"
        )
    explained = sum(split.values())
    print(f"  explained {explained:.2f} s of {ls_cpu:.2f} s; the rest {ls_cpu - explained:.2f} s")
    imports = split.get(KINDS[0], 0.0)
    caused = (ls_cpu - imports) / tasks * 1000
    ls_target = LS_TARGET_MS[reads]
    print(
        f"Label Studio CPU a task caused by the service (all but the import): {caused:.1f} ms "
        f"(target <= {ls_target:.0f} ms with --reads {reads})"
    )
    service_cpu = run.cpu["service"]
    outside = (service_cpu - run.model_cpu) / tasks * 1000
    print(
        f"service CPU a task outside predict_each: {outside:.1f} ms ({service_cpu:.2f} CPU-s in "
        f"all, {run.model_cpu:.2f} of them in its model threads: "
        f"{1000 * run.model_cpu / tasks:.1f} ms an image, against {model_cpu_ms:.1f} ms in "
        f"this process on its own; target <= {SERVICE_TARGET_MS:.0f} ms)"
    )
    first, last, span = run.window()
    cpus = max(1, len(os.sched_getaffinity(0)))
    ls_busy = (last.groups["Label Studio"] - first.groups["Label Studio"]) / span
    idle = 1 - (last.machine_busy - first.machine_busy) / max(
        1e-9, last.machine_total - first.machine_total
    )
    print(
        f"from the first prediction to the last ({span:.2f} s): the model (predict_each) busy "
        f"{run.model_busy():.0%} of the time, Label Studio {ls_busy:.0%} of one core, the "
        f"machine idle {idle:.0%} of its {cpus} CPUs"
    )
    return caused <= ls_target and outside <= SERVICE_TARGET_MS


def _print_bare(index: int, run: BareRun) -> None:
    print(
        f"bare model run {index}: {run.images} images in {run.seconds:.2f} s = "
        f"{run.rate:.2f} images/s (predict_each {run.model_seconds:.2f} s, "
        f"{1000 * run.model_seconds / run.images:.1f} ms/image; other processes "
        f"{run.other_share:.0%} of the CPUs)",
        flush=True,
    )


def _print_service(run: ServiceRun, batch_size: int) -> None:
    t0 = run.started
    journal = run.journal
    print(
        f"service: import call {run.import_s:.2f} s "
        f"({-(-run.tasks // 100)} request(s) of <= 100 files); "
        f"webhooks queued the jobs at +{(journal.first_queued or t0) - t0:.2f} .. "
        f"+{(journal.last_queued or t0) - t0:.2f} s; first prediction "
        f"+{run.first_prediction - t0:.2f} s, last +{run.last_prediction - t0:.2f} s "
        f"(Label Studio's created_at; the journal's last done: "
        f"+{(journal.last_done or t0) - t0:.2f} s)"
    )
    print(
        f"service: {run.tasks} tasks, {run.exactly_one} with exactly one prediction; "
        f"journal {journal.counts}"
    )
    wall = run.machine_total_s / max(1, len(os.sched_getaffinity(0)))
    ours = sum(run.cpu.values())
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in run.cpu.items())
    print(
        f"service: CPU seconds from the import to the end of polling ({wall:.1f} s wall, "
        f"{run.machine_total_s:.1f} CPU-s on this machine): {parts}, other processes "
        f"{max(0.0, run.machine_busy_s - ours):.1f} ({run.other_share:.0%}), idle "
        f"{run.machine_total_s - run.machine_busy_s:.1f}"
    )
    tenths = run.tenths()
    if len(tenths) == 10:
        print(
            "service: per tenth of the predictions, predictions/s: "
            + " ".join(f"{rate:.1f}" for rate, _ in tenths)
            + f" (last/first {tenths[-1][0] / tenths[0][0]:.2f}); its peak resident MB: "
            + " ".join(f"{kb / 1024:.0f}" for _, kb in tenths)
            + f"; VmHWM {run.peak_kb / 1024:.0f} MB"
        )
    m = run.metrics
    batches = m.get("ls_autoseg_inference_seconds_count", 0.0)
    infer_s = m.get(INFERENCE_SUM, 0.0)
    images = m.get("ls_autoseg_inference_batch_size_sum", 0.0)
    jobs = m.get("ls_autoseg_job_seconds_count", 0.0)
    job_mean = m.get("ls_autoseg_job_seconds_sum", 0.0) / max(1.0, jobs)
    if batches:
        print(
            f"service metrics: {batches:.0f} model batches, {images / batches:.2f} images "
            f"per batch (batch_size {batch_size}); predict_each {infer_s:.2f} s in all, "
            f"{1000 * infer_s / max(images, 1):.1f} ms/image, busy "
            f"{infer_s / run.seconds:.0%} of the measured time; job claim-to-done mean "
            f"{job_mean:.2f} s; "
            f"retries {m.get('ls_autoseg_job_retries_total', 0.0):.0f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
