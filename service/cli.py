"""The ``ls-autoseg`` command line. Logging is configured here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from service import __version__
from service.config import Config, find_config, load_config, parse_threshold_flag, parse_thresholds
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
    return parser


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="config file (default: $LS_AUTOSEG_CONFIG, ./config.yaml, then the bundled one)",
    )


def read_config(args: argparse.Namespace) -> Config:
    path = find_config(args.config)
    log.debug("config: %s", path)
    return load_config(path)


def cmd_predict(args: argparse.Namespace) -> int:
    from service.images import list_images
    from service.model import SegmentationModel
    from service.predict import run_predict

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
    model = SegmentationModel.load(model_config)
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


if __name__ == "__main__":
    sys.exit(main())
