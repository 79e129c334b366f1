"""The ``ls-autoseg`` command line. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from service import __version__
from service.config import (
    Config,
    LabelStudioConfig,
    PredictionConfig,
    ProjectConfig,
    find_config,
    load_config,
    parse_threshold_flag,
    parse_thresholds,
)
from service.constants import ROLES, TOKEN_ENV, TOKEN_TYPES, TokenType
from service.errors import AutosegError, ConfigError

log = logging.getLogger("service")

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs each request's whole URL at INFO: image passwords, presigned signatures.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # psycopg's pool warns at every failed reconnect while PostgreSQL is away (several a
    # second); the queue's own errors say it once per failed call, and /ready says why.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        code: int = args.handler(args)
    except AutosegError as exc:
        print(f"ls-autoseg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ls-autoseg: interrupted", file=sys.stderr)
        return 130
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ls-autoseg",
        description="Automatic segmentation pre-annotation for Label Studio.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="run the model on a folder of images and write mask files",
        description="Run the model on a folder of images; write masks_binary/, "
        "masks_semantic/, overlays/ and summary.csv under --out-dir.",
    )
    add_config_flag(predict)
    predict.add_argument("--images-dir", type=Path, required=True, help="folder of images")
    predict.add_argument("--out-dir", type=Path, required=True, help="where outputs are written")
    predict.add_argument("--model", type=Path, help="TorchScript file (default: model.path)")
    predict.add_argument(
        "--thresholds",
        help='per-label thresholds, e.g. "label_a=0.50,label_b=0.55" (default=... for the rest)',
    )
    predict.add_argument(
        "--prob-upsample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="upsample probabilities before thresholding (smoother edges)",
    )
    predict.add_argument("--min-pixels", type=int, help="drop masks smaller than this")
    predict.add_argument("--batch-size", type=int, help="images per forward pass")
    predict.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    predict.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it hides itself off a TTY)"
    )
    predict.set_defaults(handler=cmd_predict)

    upload = commands.add_parser(
        "upload",
        help="turn predict's mask files into Label Studio predictions (dry-run unless --upload)",
        description="Match masks_binary/<label>/<stem>.png to the project's tasks by file name "
        "and build brush predictions. Writes --tasks-out and --predictions-out; posts only "
        "with --upload. Skips annotated tasks and tasks that already have a prediction of "
        "--model-version.",
    )
    add_config_flag(upload, implicit=False)
    add_label_studio_flags(upload)
    upload.add_argument("--pred-dir", type=Path, required=True, help="predict's --out-dir")
    upload.add_argument("--tasks-out", type=Path, help="default: PRED_DIR/labelstudio_tasks.json")
    upload.add_argument(
        "--predictions-out", type=Path, help="default: PRED_DIR/labelstudio_predictions.json"
    )
    upload.add_argument("--from-name", help="BrushLabels name (default: found in the project)")
    upload.add_argument("--to-name", help="Image name (default: the one BrushLabels labels)")
    upload.add_argument(
        "--label-map",
        default="",
        help='model label -> project label value, e.g. "circle=label_a" (adds to the config\'s)',
    )
    upload.add_argument("--model-version", help="default: prediction.model_version")
    upload.add_argument("--score", type=float, help="default: prediction.score")
    upload.add_argument("--min-pixels", type=int, help="default: prediction.min_pixels")
    upload.add_argument("--upload", action="store_true", help="post the predictions")
    upload.add_argument(
        "--include-existing-predictions",
        action="store_true",
        help="also predict tasks that already have a prediction of this model version",
    )
    upload.set_defaults(handler=cmd_upload)

    annotations = commands.add_parser(
        "annotations",
        help="write an annotations payload for a task id range from mask files (offline)",
        description="Build [{task, result}] annotation bodies from predict's masks for the "
        "tasks in --start-id..--end-id of --tasks-json (upload's --tasks-out).",
    )
    annotations.add_argument("--tasks-json", type=Path, required=True)
    annotations.add_argument("--pred-dir", type=Path, required=True)
    annotations.add_argument("--out", type=Path, required=True)
    annotations.add_argument("--format", choices=("annotations-api",), default="annotations-api")
    annotations.add_argument("--start-id", type=int, required=True)
    annotations.add_argument("--end-id", type=int, required=True)
    annotations.add_argument("--from-name", default="tag", help="BrushLabels name (default tag)")
    annotations.add_argument("--to-name", default="image", help="Image name (default image)")
    annotations.add_argument("--data-key", help="task data key of the image (default: guessed)")
    annotations.add_argument(
        "--label-map", default="", help='model label -> project value, e.g. "cat=label_a"'
    )
    annotations.add_argument("--model-version", help="accepted for the tutorial's command; unused")
    annotations.add_argument("--score", type=float, help="accepted for the tutorial; unused")
    annotations.add_argument("--min-pixels", type=int, default=PredictionConfig().min_pixels)
    annotations.set_defaults(handler=cmd_annotations)

    replace = commands.add_parser(
        "replace-annotations",
        help="plan, then --execute, a reversible replacement of annotations in a task id range",
        description="Without --execute: write --plan-out (what is created, which annotation "
        "ids are deleted). With --execute: carry out that plan, refusing if a task changed, "
        "backing up what it deletes and creating before deleting.",
    )
    add_config_flag(replace, implicit=False)
    add_label_studio_flags(replace)
    replace.add_argument("--annotations-json", type=Path, required=True)
    replace.add_argument("--start-id", type=int, required=True)
    replace.add_argument("--end-id", type=int, required=True)
    replace.add_argument("--plan-out", type=Path, required=True, help="the plan file")
    replace.add_argument("--execute", action="store_true", help="carry out the plan in --plan-out")
    replace.add_argument(
        "--replace-human-annotations",
        action="store_true",
        help="also replace annotations a person made (never done otherwise)",
    )
    replace.set_defaults(handler=cmd_replace_annotations)

    serve = commands.add_parser(
        "serve",
        help="run the webhook service: predictions for every imported task",
        description="Check token, projects and model, then serve POST /webhook, GET /health, "
        "/ready and /metrics, work through the job queue and reconcile missed tasks.",
    )
    add_config_flag(serve)
    serve.add_argument(
        "--role",
        choices=ROLES,
        default=ROLES[0],
        help="all: webhook and worker (default); intake: answer Label Studio only, never load "
        "the model; worker: load the model and take jobs, no webhook route. intake and worker "
        "need a shared queue (queue.url: postgresql://...)",
    )
    serve.set_defaults(handler=cmd_serve)

    hook = commands.add_parser(
        "hook",
        help="create or update the TASKS_CREATED webhook in every configured project",
    )
    add_config_flag(hook)
    hook.add_argument(
        "--url", required=True, help="the service's webhook URL as Label Studio sees it"
    )
    hook.set_defaults(handler=cmd_hook)

    backfill = commands.add_parser(
        "backfill", help="predict every existing task that has none yet, then exit"
    )
    add_config_flag(backfill)
    backfill.add_argument("--project", type=int, help="only this project")
    backfill.set_defaults(handler=cmd_backfill)

    status = commands.add_parser("status", help="jobs by state and recent failures")
    add_config_flag(status)
    status.add_argument("--failures", type=int, default=20, help="how many failures to list")
    status.set_defaults(handler=cmd_status)

    quick = commands.add_parser(
        "quickstart",
        help="start a local Label Studio and the service, import samples, show the masks",
        description="Install (once) and start Label Studio on localhost with a demo user, "
        "create a project with the model's labels, start the service, register the webhook, "
        "import the sample images and wait for their predictions. Ctrl-C stops both.",
    )
    add_config_flag(quick)
    quick.add_argument(
        "--images-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "samples" / "images",
        help="images to import",
    )
    quick.add_argument(
        "--data-dir", type=Path, help="Label Studio data, config and queue (default: in the cache)"
    )
    quick.add_argument("--label-studio-url", help="use this Label Studio instead of starting one")
    quick.add_argument("--token", help=f"its token (default: ${TOKEN_ENV})")
    quick.add_argument("--exit", action="store_true", help="stop once the samples have masks")
    quick.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for masks")
    quick.set_defaults(handler=cmd_quickstart)
    return parser


def add_label_studio_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", help="Label Studio URL (default: label_studio.url)")
    parser.add_argument("--project-id", type=int, help="default: the config's only project")
    parser.add_argument(
        "--token",
        help=f"Personal Access Token or legacy token (default: ${TOKEN_ENV}, "
        "then label_studio.token); prefer the variable: flags show in process lists",
    )
    parser.add_argument("--token-type", choices=TOKEN_TYPES, help="default: auto")


def add_config_flag(parser: argparse.ArgumentParser, implicit: bool = True) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="config file (default: $LS_AUTOSEG_CONFIG, ./config.yaml, then the bundled one)"
        if implicit
        else "config file supplying defaults for the flags (read only when given)",
    )


def read_config(args: argparse.Namespace) -> Config:
    path = find_config(args.config)
    log.debug("config: %s", path)
    return load_config(path)


def cmd_predict(args: argparse.Namespace) -> int:
    from service.commands.predict import run_predict
    from service.model import load_segmenter
    from service.model.images import list_images

    config = read_config(args)
    model_config = config.model
    overrides = {
        "path": args.model.resolve() if args.model else None,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    model_config = dataclasses.replace(
        model_config, **{k: v for k, v in overrides.items() if v is not None}
    )
    if model_config.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    prediction = config.prediction
    if args.thresholds:
        merged: dict[str, float] = dict(prediction.thresholds.per_label)
        merged["default"] = prediction.thresholds.default
        merged.update(parse_threshold_flag(args.thresholds, model_config.output_labels))
        prediction = dataclasses.replace(
            prediction,
            thresholds=parse_thresholds(merged, model_config.output_labels, "--thresholds"),
        )
    if args.prob_upsample is not None:
        prediction = dataclasses.replace(prediction, prob_upsample=args.prob_upsample)
    if args.min_pixels is not None:
        if args.min_pixels < 0:
            raise ConfigError("--min-pixels must be >= 0")
        prediction = dataclasses.replace(prediction, min_pixels=args.min_pixels)

    if not args.images_dir.is_dir():
        raise ConfigError(f"--images-dir {args.images_dir} is not a folder")
    paths = list_images(args.images_dir)
    if not paths:
        raise ConfigError(f"no image files in {args.images_dir}")
    model = load_segmenter(model_config)
    report = run_predict(
        model, paths, args.out_dir, prediction, progress=False if args.no_progress else None
    )
    print(
        f"predicted {report.succeeded} of {report.total} image(s); outputs in {args.out_dir}",
        file=sys.stderr,
    )
    for name, reason in report.failed:
        print(f"  failed: {name}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


@dataclasses.dataclass(frozen=True)
class LabelStudioTarget:
    url: str
    token: str
    token_type: TokenType
    project: ProjectConfig
    timeout_s: float


def label_studio_target(args: argparse.Namespace, config: Config | None) -> LabelStudioTarget:
    """Flags first, then $LABEL_STUDIO_TOKEN for the token, then the config file."""
    ls = config.label_studio if config else LabelStudioConfig()
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        if config is None:
            raise ConfigError(f"no token: pass --token or set ${TOKEN_ENV}")
        token = config.require(ls.token, "label_studio.token")
    projects = {p.id: p for p in config.projects} if config else {}
    if args.project_id is not None:
        project = projects.get(args.project_id, ProjectConfig(id=args.project_id))
    elif len(projects) == 1:
        project = next(iter(projects.values()))
    else:
        raise ConfigError("which project? pass --project-id")
    return LabelStudioTarget(
        url=(args.base_url or ls.url).rstrip("/"),
        token=token,
        token_type=args.token_type or ls.token_type,
        project=project,
        timeout_s=ls.timeout_s,
    )


def cmd_upload(args: argparse.Namespace) -> int:
    from service.commands.upload import UploadOptions, run_upload
    from service.labelstudio.client import LabelStudioClient

    config = load_config(args.config) if args.config else None
    target = label_studio_target(args, config)
    prediction = config.prediction if config else PredictionConfig()
    options = UploadOptions(
        project_id=target.project.id,
        pred_dir=args.pred_dir,
        tasks_out=args.tasks_out or args.pred_dir / "labelstudio_tasks.json",
        predictions_out=args.predictions_out or args.pred_dir / "labelstudio_predictions.json",
        model_version=args.model_version or prediction.model_version,
        score=prediction.score if args.score is None else args.score,
        min_pixels=prediction.min_pixels if args.min_pixels is None else args.min_pixels,
        from_name=args.from_name or target.project.from_name,
        to_name=args.to_name or target.project.to_name,
        label_map={**target.project.label_map, **parse_pairs(args.label_map, "--label-map")},
        upload=args.upload,
        include_existing=args.include_existing_predictions,
    )

    async def run() -> int:
        async with LabelStudioClient(
            target.url, target.token, target.token_type, timeout_s=target.timeout_s
        ) as client:
            report = await run_upload(client, options, sys.stdout)
        return EXIT_OK if report.ok else EXIT_SOME_FAILED

    return asyncio.run(run())


def cmd_annotations(args: argparse.Namespace) -> int:
    from service.commands.annotations import PayloadOptions, make_payload

    if args.start_id > args.end_id:
        raise ConfigError("--start-id is greater than --end-id")
    options = PayloadOptions(
        tasks_json=args.tasks_json,
        pred_dir=args.pred_dir,
        out=args.out,
        start_id=args.start_id,
        end_id=args.end_id,
        from_name=args.from_name,
        to_name=args.to_name,
        data_key=args.data_key,
        label_map=parse_pairs(args.label_map, "--label-map"),
        min_pixels=args.min_pixels,
    )
    make_payload(options, sys.stdout)
    return EXIT_OK


def parse_pairs(text: str, flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{flag} item {item!r} is not NAME=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def cmd_replace_annotations(args: argparse.Namespace) -> int:
    from service.commands.annotations import PlanOptions, execute_plan, write_plan
    from service.labelstudio.client import LabelStudioClient

    config = load_config(args.config) if args.config else None
    target = label_studio_target(args, config)

    async def run() -> int:
        async with LabelStudioClient(
            target.url, target.token, target.token_type, timeout_s=target.timeout_s
        ) as client:
            if args.execute:
                report = await execute_plan(client, args.plan_out, sys.stdout)
                return EXIT_SOME_FAILED if report.refused else EXIT_OK
            options = PlanOptions(
                project_id=target.project.id,
                annotations_json=args.annotations_json,
                start_id=args.start_id,
                end_id=args.end_id,
                plan_out=args.plan_out,
                replace_human=args.replace_human_annotations,
            )
            await write_plan(client, options, sys.stdout)
            return EXIT_OK

    return asyncio.run(run())


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    asyncio.run(serve(read_config(args), role=args.role))
    return EXIT_OK


def cmd_hook(args: argparse.Namespace) -> int:
    from service.commands.ops import register_hooks

    asyncio.run(register_hooks(read_config(args), args.url, sys.stdout))
    return EXIT_OK


def cmd_backfill(args: argparse.Namespace) -> int:
    from service.commands.ops import backfill
    from service.queue import JobState

    changed = asyncio.run(backfill(read_config(args), args.project, sys.stdout))
    return EXIT_SOME_FAILED if changed[JobState.FAILED] else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from service.commands.ops import status

    status(read_config(args), sys.stdout, args.failures)
    return EXIT_OK


def cmd_quickstart(args: argparse.Namespace) -> int:
    from service.local.lsserver import cache_dir
    from service.local.quickstart import QuickstartOptions, quickstart

    options = QuickstartOptions(
        base_config=read_config(args),
        images_dir=args.images_dir,
        data_dir=args.data_dir or cache_dir() / "quickstart",
        label_studio_url=args.label_studio_url,
        token=args.token or os.environ.get(TOKEN_ENV),
        exit_when_done=args.exit,
        timeout_s=args.timeout,
    )
    return asyncio.run(quickstart(options, sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
