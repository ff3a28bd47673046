#!/usr/bin/env python
"""Train a Faster / Mask R-CNN detector on COCO-format data.

Examples:
  # the demo: Mask R-CNN R18-FPN on the generated shapes set (minutes on a CPU) -> output/demo
  python tools/train_det.py --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml
  # your COCO-format data, a short schedule (train.steps, the LR drops, inside train.max_iters)
  python tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --output-dir runs/mine \\
      data.train.annotations=my/train.json data.train.images=my/images \\
      data.val.annotations=my/val.json data.val.images=my/images \\
      train.max_iters=5000 train.steps=[3500,4500] train.batch_size=4 train.base_lr=0.005
  # continue an interrupted run (its config.yaml points at its folder)
  python tools/train_det.py --config runs/mine/config.yaml --resume
  # COCO 2017 under datasets/coco, 8 GPUs
  torchrun --nproc_per_node 8 tools/train_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml \\
      --output-dir runs/coco_r50
  # then evaluate a checkpoint (writes runs/mine/eval/)
  python tools/eval_det.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth

Outputs in the output folder: config.yaml (the resolved config with the data's classes, category
ids and output_dir recorded: it alone rebuilds the model), log.txt, metrics.jsonl (one line per
logged iteration), metrics.json (final COCO metrics, percent), checkpoints/last.pth, best.pth and
the last numbered ones, TensorBoard events (``tensorboard --logdir OUTPUT_DIR``).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from detkit.cli import default_argument_parser, run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = default_argument_parser(__doc__).parse_args(argv)
    from detkit.config import load_detection_config  # after parsing: --help stays instant
    from detkit.engine.run_detection import train_detection

    train_detection(load_detection_config(args.config, args.overrides, tool="train_det.py"), args.output_dir,
                    args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="train_det.py"))
