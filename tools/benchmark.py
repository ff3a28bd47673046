#!/usr/bin/env python
"""Measure a config's inference images/s, training iterations/s and data-loader images/s here.

* inference: :class:`detkit.Predictor` on images of the val split (or random images at the
  test size when no data is configured or its files are missing), one image per call, as an
  application would;
* training: forward + backward + SGD step of a freshly built model on batches taken from the
  data set's training pipeline (or synthetic batches at the train size), data time excluded;
* data loader: the training loader of the config (workers, augmentation, collation) alone.

Warm-up iterations are excluded from every number; CUDA work is synchronized before timing.
When nothing names the classes, the model gets a COCO-sized head (80 classes). The measuring
is :func:`detkit.benchmark.run_benchmark`; this file is its command line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from detkit.cli import run_cli

EPILOG = """examples:
  # the demo config on this machine's CPU
  python tools/benchmark.py --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml
  # a trained model on the GPU in bfloat16, 50 timed iterations
  python tools/benchmark.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --device cuda --precision bf16 --iters 50
  # inference only, at another test size (random images when the COCO files are not there)
  python tools/benchmark.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --skip-train --skip-data \\
      input.min_size_test=640 model.num_classes=80
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/benchmark.py``."""
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py",
        description="Inference images/s, training it/s and data-loader images/s of a config on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--weights", default=None, help="weights for the inference benchmark (default: random init)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations of each benchmark (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="inference and training precision")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: train.batch_size)")
    p.add_argument("--skip-train", action="store_true", help="skip the training benchmark")
    p.add_argument("--skip-data", action="store_true", help="skip the data-loader benchmark")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.min_size_test=640")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks the arguments ask for and print the report."""
    args = parse_args(argv)
    from detkit.benchmark import BenchmarkOptions, run_benchmark  # after parsing: --help stays instant
    from detkit.config import load_detection_config

    cfg = load_detection_config(args.config, args.overrides, tool="benchmark.py")
    opts = BenchmarkOptions(weights=args.weights, iters=args.iters, warmup=args.warmup, device=args.device,
                            precision=args.precision, batch_size=args.batch_size, skip_train=args.skip_train,
                            skip_data=args.skip_data)
    print(run_benchmark(cfg, opts, config_name=args.config).format())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="benchmark.py", keep_freed_memory=True))  # inference: malloc kept warm
