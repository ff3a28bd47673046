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
import os
import random
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

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


class ToolError(Exception):
    """A user-facing failure; the message is one line saying what to do."""


#: exception types whose message is already a one-line instruction for the user
USER_ERRORS = ("ConfigError", "ImageReadError", "DatasetError", "CheckpointError")


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


def build_dataset(cfg: Any, split: str, seed: int) -> Any:
    """The split's :class:`~detkit.data.coco.CocoDetection` with the train or test transform of ``cfg.input``.

    Data paths are resolved as ``tools/train_det.py`` does (the synthetic shapes set is generated
    when ``data.synthetic`` is set) and the annotations validated the same way.
    """
    from detkit.data import CocoDetection, build_detection_transform
    from detkit.engine.detection import load_split, resolve_data_paths

    is_train = split == "train"
    data = load_split(resolve_data_paths(cfg), split, is_train=is_train)
    transform = build_detection_transform(cfg.input, is_train=is_train, seed=seed)
    return CocoDetection(data, transform, with_masks=cfg.model.meta_architecture == "mask_rcnn")


def choose_indices(n: int, num: int, shuffle: bool, seed: int) -> list[int]:
    """``num`` dataset indices: the first ones, or a seeded random sample."""
    if num < 1:
        raise ToolError(f"--num {num}: must be at least 1")
    if shuffle:
        return sorted(random.Random(seed).sample(range(n), min(num, n)))
    return list(range(min(num, n)))


def render(dataset: Any, indices: Sequence[int]) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Draw the ground truth of each chosen sample; returns ([(file name, RGB image)], skipped files)."""
    from detkit.data.collate import DetectionSample
    from detkit.visualization import draw_targets

    drawn, skipped = [], []
    for i in indices:
        sample = dataset.load(i)
        if not isinstance(sample, DetectionSample):
            skipped.append(f"{sample.file_name}: {sample.reason}")
            continue
        # (3, H, W) -> (H, W, 3)
        image = sample.image.permute(1, 2, 0).cpu().numpy()
        drawn.append((Path(sample.file_name).name, draw_targets(image, sample.targets, dataset.class_names)))
    return drawn, skipped


def write_outputs(drawn: list[tuple[str, np.ndarray]], out_dir: Path, contact_sheet: bool, cols: int, cell: int) -> list[Path]:
    """Write PNGs (one per image, or ``contact_sheet.png``); returns the written paths."""
    import cv2

    from detkit.visualization import make_contact_sheet

    out_dir.mkdir(parents=True, exist_ok=True)
    if contact_sheet:
        sheet = make_contact_sheet([im for _, im in drawn], cols=cols, cell_size=cell, titles=[n for n, _ in drawn])
        items = [(out_dir / "contact_sheet.png", sheet)]
    else:
        items, seen = [], set()
        for name, im in drawn:
            stem = Path(name).stem
            k, unique = 1, stem
            while unique in seen:  # same file name in two sub-folders
                k += 1
                unique = f"{stem}_{k}"
            seen.add(unique)
            items.append((out_dir / f"{unique}.png", im))
    for path, im in items:
        if not cv2.imwrite(str(path), cv2.cvtColor(im, cv2.COLOR_RGB2BGR)):
            raise ToolError(f"could not write {path}; check that --output is a writable folder")
    return [p for p, _ in items]


def run(args: argparse.Namespace) -> int:
    """Render and write the images described by ``args``; returns the exit code."""
    from detkit.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(cfg, "task", "detection") != "detection":
        raise ToolError(f"--config {args.config}: task is {cfg.task!r}; browse_dataset.py needs a detection config")
    if args.cols < 1 or args.cell_size < 32:
        raise ToolError(f"--cols {args.cols} / --cell-size {args.cell_size}: use cols >= 1 and cell size >= 32")
    dataset = build_dataset(cfg, args.split, args.seed)
    indices = choose_indices(len(dataset), args.num, args.shuffle, args.seed)
    drawn, skipped = render(dataset, indices)
    for s in skipped:
        print(f"warning: skipped {s}", file=sys.stderr)
    if not drawn:
        raise ToolError(f"none of the {len(indices)} chosen images could be read; check data.{args.split}.images")
    written = write_outputs(drawn, Path(args.output), args.contact_sheet, args.cols, args.cell_size)
    pipeline = "training augmentation" if args.split == "train" else "test"
    print(f"{args.split} split: {len(dataset)} images, {len(dataset.class_names)} classes; "
          f"rendered {len(drawn)} after the {pipeline} pipeline ({dataset.transform})")
    print(f"wrote {written[0] if len(written) == 1 else f'{len(written)} images to ' + str(Path(args.output))}")
    return 0


def error_line(e: BaseException) -> str:
    """One line for a failure: the message of expected errors, type + message + hint otherwise."""
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, (ToolError, ValueError, OSError)) or type(e).__name__ in USER_ERRORS:
        return msg
    return f"{type(e).__name__}: {msg} (set DETKIT_DEBUG=1 for a traceback)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: one line on stderr and a non-zero exit code on failure."""
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("browse_dataset.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable line
        if os.environ.get("DETKIT_DEBUG"):
            raise
        print(f"browse_dataset.py: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
