#!/usr/bin/env python
"""Pretrain a ResNet classifier on an ImageFolder (to initialize detector backbones).

Examples:
  # the demo: ResNet-18 on the generated shapes ImageFolder (a few minutes on a CPU)
  python tools/pretrain_cls.py --config configs/classification/shapes_resnet18.yaml
  # ResNet-50 on ImageNet-style folders (<root>/<class>/<image>)
  python tools/pretrain_cls.py --config configs/classification/resnet50_imagefolder.yaml \\
      --output-dir runs/r50 data.train=/data/imagenet/train data.val=/data/imagenet/val
  # continue an interrupted run (its config.yaml points at its folder)
  python tools/pretrain_cls.py --config runs/r50/config.yaml --resume
  # 8 GPUs (train.batch_size is the total over the processes)
  torchrun --nproc_per_node 8 tools/pretrain_cls.py --config configs/classification/resnet50_imagefolder.yaml \\
      --output-dir runs/r50 data.train=/data/imagenet/train data.val=/data/imagenet/val
  # then initialize a detector's backbone with it
  python tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml \\
      model.backbone.weights=runs/r50/checkpoints/last.pth

Outputs in the output folder: config.yaml, log.txt, metrics.jsonl, metrics.json (top1/top5 in
percent), checkpoints/last.pth (written after every epoch; use it as ``model.backbone.weights``
of a detection config), TensorBoard events.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from detkit.cli import default_argument_parser, run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = default_argument_parser(__doc__).parse_args(argv)
    from detkit.config import load_classification_config  # after parsing: --help stays instant
    from detkit.engine.run_classification import pretrain_classifier

    pretrain_classifier(load_classification_config(args.config, args.overrides), args.output_dir, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="pretrain_cls.py"))
