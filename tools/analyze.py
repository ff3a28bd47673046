#!/usr/bin/env python
"""Analyze a model (parameters, FLOPs), a dataset (statistics and plots) or a training log (curves).

Sub-commands:
    model    parameter count and FLOPs per image, with a per-module breakdown
    dataset  images, instances per class, box-size / aspect-ratio histograms, image sizes
    log      loss and AP curves from a run's metrics.jsonl (and metrics.json)

The analyses live in :mod:`detkit.analysis` (``model``, ``dataset``, ``log``); this script parses
the command line and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from detkit.cli import run_cli

EPILOG = """examples:
  # parameters and FLOPs of a config at its test size (or --size), table saved to a file
  python tools/analyze.py model --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --num-classes 80 --output model.txt
  python tools/analyze.py model --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml --size 512
  # statistics and plots of your training annotations
  python tools/analyze.py dataset --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --split train \\
      --output analysis/ data.train.annotations=my/train.json data.train.images=my/images
  # loss and AP curves of a run
  python tools/analyze.py log --metrics runs/mine/metrics.jsonl --output runs/mine/plots
"""

NUM_CLASSES_HELP = (
    "classes to build the model with (overrides the config); default: the classes the config names "
    "(data.class_names, the annotation files' categories, data.synthetic or model.num_classes), "
    "an error when it names none"
)


def cmd_model(args: argparse.Namespace) -> int:
    """``analyze.py model``: print (and save) parameters and FLOPs."""
    from detkit.config import load_detection_config
    from detkit.analysis.model import analyze_model
    from detkit.fileio import write_text_atomic

    cfg = load_detection_config(args.config, args.overrides, tool="analyze.py")
    result = analyze_model(cfg, num_classes=args.num_classes, size=args.size, width=args.width, device=args.device)
    print(result.report)
    if args.output:
        write_text_atomic(args.output, result.report + "\n")
        print(f"saved to {args.output}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    """``analyze.py dataset``: statistics table (printed and saved) and a PNG of plots."""
    from detkit.analysis.common import require_matplotlib
    from detkit.config import load_detection_config
    from detkit.analysis.dataset import analyze_dataset

    require_matplotlib()  # before loading the config: the install hint comes first
    cfg = load_detection_config(args.config, args.overrides, tool="analyze.py")
    result = analyze_dataset(cfg, args.split, Path(args.output), args.bins)
    print(result.report)
    print(f"\nwrote {result.text_path} and {result.plot_path}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    """``analyze.py log``: loss curves (and AP curves when evaluations were logged) to PNG."""
    from detkit.analysis.log import analyze_log

    result = analyze_log(Path(args.metrics), Path(args.output) if args.output else None, log_y=args.log_y)
    if result.ignored_final is not None:
        print(f"warning: {result.ignored_final} is not valid JSON; ignoring it", file=sys.stderr)
    print(result.table)
    if result.skipped_lines:
        print(f"warning: skipped {result.skipped_lines} unparsable line(s) in {args.metrics}", file=sys.stderr)
    if not result.curves.aps:
        print("no bbox/AP or segm/AP values found (metrics.jsonl / metrics.json): AP plot not written")
    for p in result.written:
        print(f"wrote {p}")
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/analyze.py``."""
    p = argparse.ArgumentParser(
        prog="tools/analyze.py",
        description="Analyze a model (parameters, FLOPs), a dataset (statistics) or a training log (curves).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{model,dataset,log}")

    def add(name: str, help_: str, func: Any, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("--config", required=True, help="YAML config")
            sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        return sp

    pm = add("model", "parameters and FLOPs per image", cmd_model)
    pm.add_argument("--size", type=int, default=None, help="image height (default: input.min_size_test)")
    pm.add_argument("--width", type=int, default=None, help="image width (default: same as --size)")
    pm.add_argument("--num-classes", type=int, default=None, help=NUM_CLASSES_HELP)
    pm.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    pm.add_argument("--output", default=None, help="also save the report to this text file")
    pd = add("dataset", "dataset statistics and plots", cmd_dataset)
    pd.add_argument("--split", choices=["train", "val"], default="train", help="which split (default: train)")
    pd.add_argument("--output", required=True, help="folder for dataset_stats.png and dataset_stats.txt")
    pd.add_argument("--bins", type=int, default=30, help="histogram bins (default: 30)")
    pl = add("log", "loss and AP curves of a run", cmd_log, config=False)
    pl.add_argument("--metrics", required=True, help="a run's metrics.jsonl")
    pl.add_argument("--output", default=None, help="folder for the PNGs (default: the metrics file's folder)")
    pl.add_argument("--log-y", action="store_true", help="log-scale loss axes")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the chosen sub-command; bad input raises (see :func:`detkit.cli.run_cli`)."""
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="analyze.py"))
