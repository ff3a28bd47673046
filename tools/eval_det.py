#!/usr/bin/env python
"""Evaluate detector weights on data.val with COCO metrics (bbox, and segm for Mask R-CNN).

Examples:
  # a training run's checkpoint with the run's own config -> runs/mine/eval/
  python tools/eval_det.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth
  # other COCO-format data, into another folder, with the faster_coco_eval backend
  python tools/eval_det.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --output-dir runs/mine/eval_test data.val.annotations=my/test.json data.val.images=my/test_images \\
      test.eval_backend=faster_coco_eval
  # COCO 2017 val under datasets/coco, 8 GPUs
  torchrun --nproc_per_node 8 tools/eval_det.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml \\
      --weights runs/coco_r50/checkpoints/best.pth

Prints the 12-number COCO table and the per-class AP table; writes metrics.json (flat keys such
as bbox/AP, segm/AP50, bbox/AP-<class>, in percent), results.json (COCO-format detections) and
eval_config.yaml to --output-dir (default: the config's output_dir + /eval, so evaluating with a
run's config.yaml writes runs/mine/eval/ and leaves the run's own metrics.json alone).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from detkit.cli import default_argument_parser, run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = default_argument_parser(__doc__, weights=True, resume=False, default_subdir="eval").parse_args(argv)
    from detkit.config import load_detection_config  # after parsing: --help stays instant
    from detkit.engine.run_detection import evaluate_detection

    evaluate_detection(load_detection_config(args.config, args.overrides, tool="eval_det.py"), args.weights,
                       args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="eval_det.py", keep_freed_memory=True))  # inference: malloc kept warm
