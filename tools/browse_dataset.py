#!/usr/bin/env python
"""Render a dataset's ground truth exactly as the model will see it, to check data before training.

The train split goes through the training augmentation pipeline (multi-scale resize,
flips, jitter, as configured under ``input``); the val split through the test pipeline.
Boxes, class names, instance masks (Mask R-CNN configs) and crowd regions (thin grey
boxes) are drawn on the transformed images, written one file per image or as a
single contact sheet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from detkit.cli import run_cli

EPILOG = """examples:
  # 16 training images after augmentation -> browse/*.png
  python tools/browse_dataset.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml \\
      data.train.annotations=my/train.json data.train.images=my/images --output browse/
  # one contact sheet of 32 random validation images (test pipeline)
  python tools/browse_dataset.py --config runs/mine/config.yaml --split val --num 32 --shuffle \\
      --contact-sheet --output browse/
  # the embedded shapes dataset (generated on first use)
  python tools/browse_dataset.py --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml --contact-sheet
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/browse_dataset.py``."""
    p = argparse.ArgumentParser(
        prog="tools/browse_dataset.py",
        description="Draw a dataset's ground truth after the data pipeline (train: augmentation; val: test resize).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config naming the data and the input pipeline")
    p.add_argument("--split", choices=["train", "val"], default="train", help="which split (default: train)")
    p.add_argument("--num", type=int, default=16, help="number of images to render (default: 16)")
    p.add_argument("--output", default="browse", help="output folder (default: browse)")
    p.add_argument("--contact-sheet", action="store_true", help="write one contact_sheet.png instead of one file per image")
    p.add_argument("--cols", type=int, default=4, help="contact sheet columns (default: 4)")
    p.add_argument("--cell-size", type=int, default=320, help="contact sheet cell size in pixels (default: 320)")
    p.add_argument("--shuffle", action="store_true", help="pick random images instead of the first ones")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice and of the augmentation (default: 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.hflip_prob=1.0")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Render and write the images described by ``args``; returns the exit code."""
    from detkit.analysis.browse import build_dataset, choose_indices, render, write_outputs
    from detkit.config import load_detection_config
    from detkit.errors import UsageError

    cfg = load_detection_config(args.config, args.overrides, tool="browse_dataset.py")
    if args.cols < 1 or args.cell_size < 32:
        raise UsageError(f"--cols {args.cols} / --cell-size {args.cell_size}: use cols >= 1 and cell size >= 32")
    dataset = build_dataset(cfg, args.split, args.seed)
    indices = choose_indices(len(dataset), args.num, args.shuffle, args.seed)
    drawn, skipped = render(dataset, indices)
    for s in skipped:
        print(f"warning: skipped {s}", file=sys.stderr)
    if not drawn:
        raise UsageError(f"none of the {len(indices)} chosen images could be read; check data.{args.split}.images")
    written = write_outputs(drawn, Path(args.output), args.contact_sheet, args.cols, args.cell_size)
    pipeline = "training augmentation" if args.split == "train" else "test"
    print(f"{args.split} split: {len(dataset)} images, {len(dataset.class_names)} classes; "
          f"rendered {len(drawn)} after the {pipeline} pipeline ({dataset.transform})")
    print(f"wrote {written[0] if len(written) == 1 else f'{len(written)} images to ' + str(Path(args.output))}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="browse_dataset.py"))
