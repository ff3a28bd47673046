#!/usr/bin/env python
"""Convert a Pascal VOC, YOLO or LabelMe dataset to the COCO JSON that train_det.py reads.

Bad entries (a label outside the class list, a box outside its image, a label file without its
image, a malformed XML/JSON file, ...) are skipped with one warning line naming the file and the
line or element, and counted in the summary; ``--strict`` stops at the first one (exit 2). The
work is done by :mod:`detkit.data.convert`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from detkit.cli import run_cli

EPILOG = """examples:
  # Pascal VOC: DIR/Annotations/*.xml + DIR/JPEGImages/ -> one file, file names relative to JPEGImages
  python tools/convert_dataset.py --format voc --input VOCdevkit/VOC2012 --output my/voc.json
  # the same with a fixed class order, split 80/20 by image -> my/voc_train.json and my/voc_val.json
  python tools/convert_dataset.py --format voc --input VOCdevkit/VOC2012 --output my/voc.json \\
      --classes my/classes.txt --val-fraction 0.2 --seed 0
  # YOLO (Ultralytics): DIR/images/{train,val} + DIR/labels/{train,val}, names from DIR/data.yaml;
  # --images picks one split and is the folder the file names are relative to
  python tools/convert_dataset.py --format yolo --input datasets/mine --images datasets/mine/images/train \\
      --output my/train.json
  # LabelMe: a folder of *.json beside their images; stop at the first bad entry
  python tools/convert_dataset.py --format labelme --input my/labelme --output my/labelme.json --strict

then train with the printed images folder:
  python tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --output-dir runs/mine \\
      data.train.annotations=my/voc_train.json data.train.images=VOCdevkit/VOC2012/JPEGImages \\
      data.val.annotations=my/voc_val.json data.val.images=VOCdevkit/VOC2012/JPEGImages

output: categories 1..K in class order (--classes FILE, YOLO's names, else the sorted names found);
bbox [x, y, w, h] in pixels (VOC: xmin - 1, ymin - 1, xmax, ymax, as Detectron2 reads VOC);
segmentation polygons where the source has them (YOLO segment lines, LabelMe polygons); area of
the polygon, else of the box; iscrowd 1 for VOC <difficult> objects (ignored in training) unless
--drop-difficult. Images without objects are kept as negatives.
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/convert_dataset.py``."""
    p = argparse.ArgumentParser(
        prog="tools/convert_dataset.py",
        description="Convert a Pascal VOC, YOLO or LabelMe dataset to COCO JSON for train_det.py.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=["voc", "yolo", "labelme"], help="the source format")
    p.add_argument("--input", required=True, metavar="DIR", help="the dataset folder")
    p.add_argument("--output", required=True, metavar="OUT.json",
                   help="COCO file to write (with --val-fraction: OUT_train.json and OUT_val.json)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder the file names are relative to (data.*.images); default: DIR/JPEGImages (voc), "
                        "DIR/images (yolo; a subfolder converts that split only), DIR (labelme)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names, one per line, fixing the order of category ids 1..K "
                        "(default: YOLO's data.yaml/classes.txt, else the sorted names found)")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="also split by image: this fraction (0 < F < 1) goes to OUT_val.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--drop-difficult", action="store_true",
                   help="voc: leave <difficult> objects out instead of writing them as iscrowd regions")
    p.add_argument("--strict", action="store_true", help="stop at the first bad entry (exit 2) instead of skipping it")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Convert as the command line says (errors: see :func:`detkit.cli.run_cli`)."""
    args = parse_args(argv)
    from detkit.data.convert import ConvertOptions, convert_dataset  # after parsing: --help stays instant

    report = convert_dataset(ConvertOptions(
        format=args.format, input=args.input, output=args.output, images=args.images, classes=args.classes,
        val_fraction=args.val_fraction, seed=args.seed, strict=args.strict, drop_difficult=args.drop_difficult,
    ), warn=lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    print("\n".join(report.summary_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="convert_dataset.py"))
