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

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from detkit.checkpoint import CheckpointError, load_weights
from detkit.config import ConfigError, DetectionConfig, load_config
from detkit.engine import inference_on_dataset
from detkit.engine.detection import (
    build_evaluator,
    build_test_loader,
    load_split,
    resolve_data_paths,
    resolve_num_classes,
    write_metrics_json,
)
from detkit.engine.distributed import init_distributed, is_main_process
from detkit.engine.launch import default_argument_parser, run_cli, setup_output_dir
from detkit.evaluation import format_coco_table, format_per_class_table
from detkit.models.build import build_detector

logger = logging.getLogger("detkit.eval")


def load_eval_config(path: str, overrides: Sequence[str]) -> DetectionConfig:
    """The detection config; init weights are cleared (the evaluated weights come from --weights)."""
    cfg = load_config(path, list(overrides))
    if not isinstance(cfg, DetectionConfig):
        raise ConfigError(f"{path}: this is a classification config; eval_det.py evaluates detectors")
    cfg = cfg.model_copy(deep=True)
    cfg.model.weights = None
    cfg.model.backbone.weights = None
    return cfg


def load_detector(cfg: DetectionConfig, num_classes: int, weights: str, device):
    """The detector with ``weights`` loaded; anything missing or mis-shaped is a clear error."""
    model = build_detector(cfg, num_classes)
    report = load_weights(model, weights)
    logger.info("Weights: %s", report.summary())
    if report.missing or report.mismatched:
        raise CheckpointError(
            f"{weights} does not fit this config with {num_classes} classes: {report.problems()}; "
            "the weights are for another architecture or class count: evaluate them with the config they "
            "were trained with (its model settings and data.class_names / model.num_classes)"
        )
    return model.to(device).eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = default_argument_parser(__doc__, weights=True, resume=False, default_subdir="eval").parse_args(argv)
    cfg = load_eval_config(args.config, args.overrides)
    device = init_distributed()
    out = setup_output_dir(cfg, args.output_dir, config_name="eval_config.yaml", default_subdir="eval")
    cfg = resolve_data_paths(cfg)
    val = load_split(cfg, "val", is_train=False)
    model = load_detector(cfg, resolve_num_classes(cfg, val), args.weights, device)

    evaluator = build_evaluator(cfg, val)
    metrics = inference_on_dataset(model, build_test_loader(cfg, val), evaluator, cfg.test.precision, device,
                                   optimize=True)  # the model detkit.Predictor runs
    if is_main_process():
        evaluator.write_results(out / "results.json")
        write_metrics_json(out / "metrics.json", metrics)
        print(format_coco_table(metrics))
        print(format_per_class_table(metrics))
        print(f"\nWrote {Path(out) / 'metrics.json'} and {Path(out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
