#!/usr/bin/env python
"""Quantize a detector's backbone + FPN, RPN head and box head FCs to int8 (post-training static, PT2E).

Calibrates on ``--calib-images`` images of ``data.train`` (through the test-time transform), writes
``--output``/int8_observers.pt (the calibration statistics: tensors and strings, read back with
``torch.load(weights_only=True)``) and ``manifest.json``, then compiles the size buckets once to
print the compile times (``--no-compile`` skips it). Use the result with the same weights:

    Predictor(config, weights=..., precision="int8", quantized="runs/mine/int8")
    # or test.precision=int8 test.int8_quantized=runs/mine/int8 in the config

Needs torchao (``pip install 'detkit[int8]'``) and a CPU with AVX512-VNNI, AVX-VNNI or AMX-INT8.

Examples:
  python tools/quantize.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --calib-images 32 --output runs/mine/int8
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from detkit.cli import run_cli


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="detection config (YAML)")
    p.add_argument("--weights", default=None, help="weights to quantize (default: model.weights of the config)")
    p.add_argument("--calib-images", type=int, default=None,
                   help="data.train images to calibrate on (default: test.int8_calibration_images, 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of calibration images")
    p.add_argument("--output", required=True, help="folder to write int8_observers.pt and manifest.json to")
    p.add_argument("--no-compile", action="store_true", help="skip compiling the size buckets (compile time)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from detkit import Predictor
    from detkit.config import load_detection_config
    from detkit.errors import UsageError
    from detkit.inference.int8 import Int8BoxHead, Int8RPNHead, calibration_images, int8_supported, resolve_int8, save_quantized

    if not int8_supported("cpu"):
        raise UsageError(f"int8 is not available here ({resolve_int8('cpu')} would be used); see the warning")
    cfg = load_detection_config(args.config, args.overrides, tool="quantize.py")
    n = cfg.test.int8_calibration_images if args.calib_images is None else args.calib_images
    if n < 1:
        raise UsageError(f"--calib-images {n}: give at least 1")
    t0 = time.perf_counter()
    images = calibration_images(cfg, n, args.seed)
    print(f"read {len(images)} calibration images of {cfg.data.train.annotations} in {time.perf_counter() - t0:.1f} s")
    t0, c0 = time.perf_counter(), time.process_time()
    pred = Predictor(cfg, weights=args.weights, precision="int8", calibration=images)
    state = pred.int8_state
    print(f"calibrated on {len(images)} images in {state.meta['calibration_s']:.1f} s "
          f"(Predictor ready in {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU; "
          f"{torch.get_num_threads()} threads)")
    graphs = {"backbone": pred.model.backbone}
    if isinstance(pred.model.rpn.head, Int8RPNHead):  # not for a custom RPN head
        graphs["RPN head"] = pred.model.rpn.head
    box_head = pred.model.roi_heads.box_head
    buckets = pred.model.backbone.buckets.sizes
    if not args.no_compile:
        for bucket in buckets:
            for name, part in graphs.items():
                part.graph(bucket)
                print(f"compiled the int8 {name} for {bucket[0]}x{bucket[1]} inputs in "
                      f"{part.compile_seconds[bucket]:.1f} s")
        if isinstance(box_head, Int8BoxHead):  # one graph for any RoI count
            box_head.graph()
            print(f"compiled the int8 box head in {box_head.compile_seconds:.1f} s")
    file = save_quantized(state, args.output, {
        "config": str(args.config), "weights": str(args.weights or cfg.model.weights), "seed": args.seed,
        "buckets": [list(b) for b in buckets],
        "compile_s": {**{f"{name} {h}x{w}": s for name, part in graphs.items()
                         for (h, w), s in part.compile_seconds.items()},
                      **({"box head": box_head.compile_seconds} if isinstance(box_head, Int8BoxHead) else {})},
    })
    print(f"wrote {file} and {file.parent / 'manifest.json'} (fingerprint {state.fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="quantize.py", keep_freed_memory=True))  # inference: malloc kept warm
