#!/usr/bin/env python
"""Export a trained Faster / Mask R-CNN to TorchScript and/or ONNX, and optionally verify the exports.

Writes into ``--output``: ``model.ts`` (TorchScript), ``model.onnx``, ``config.yaml`` (the resolved
config) and ``export.json`` (inputs/outputs, class names, preprocessing, verification results).
The exported model takes ONE float32 [3, H, W] RGB 0..255 image of any size (resize it first like
the Predictor: short side ``input.min_size_test``, long side at most ``input.max_size_test``) and
returns ``boxes [N,4]``, ``scores [N]``, ``labels [N]`` and, for Mask R-CNN, ``masks [N,1,M,M]``
probabilities to paste into the image (see :mod:`detkit.export`).

``--verify`` runs PyTorch, the TorchScript module and onnxruntime on images of other sizes than the
export sample plus a blank image (which a trained model should find nothing in) and compares the
detections; the exit code is 1 when any check fails (2 for bad input, as every tool).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from detkit.cli import run_cli
from detkit.config import load_detection_config, save_config
from detkit.data.classes import resolve_classes
from detkit.export import (
    DEFAULT_OPSET,
    FORMATS,
    ExportableDetector,
    build_export_model,
    check_export_options,
    export_manifest,
    export_to,
    split_overrides,
    synthetic_scene,
    trace_size,
    verification_images,
    verify_exports,
    write_manifest,
)

EPILOG = """examples:
  # TorchScript and ONNX of a trained Mask R-CNN, checked against PyTorch on generated images
  python tools/export.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --format both --output exported/ --verify
  # ONNX only (opset 17), verified on your own images, exported at a smaller test size
  python tools/export.py --config runs/mine/config.yaml --weights best.pth --format onnx \\
      --output exported/ --verify --verify-images a.jpg b.png input.min_size_test=640
  # torchvision's COCO weights through detkit's torchvision config
  python tools/export.py --config configs/torchvision/faster_rcnn_R_50_FPN.yaml \\
      --weights fasterrcnn_resnet50_fpn_coco-258fb6c6.pth --format torchscript --output exported/

then, e.g. in Python:
  import onnxruntime as ort
  sess = ort.InferenceSession("exported/model.onnx", providers=["CPUExecutionProvider"])
  boxes, scores, labels = sess.run(None, {"image": image_chw_float32})[:3]
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/export.py``."""
    p = argparse.ArgumentParser(
        prog="tools/export.py",
        description="Export Faster/Mask R-CNN to TorchScript and ONNX (dynamic image size) and verify the exports.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config of the model (e.g. runs/mine/config.yaml)")
    p.add_argument("--weights", required=True, help="checkpoint to export (any load_weights format), or a name: "
                   "torchvision://..., detectron2://..., https://...")
    p.add_argument("--format", choices=sorted(FORMATS), default="both", help="what to write (default: both)")
    p.add_argument("--output", required=True, help="folder for model.ts / model.onnx / export.json")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 16 (default: {DEFAULT_OPSET})")
    p.add_argument("--device", default="cpu", help="device to trace on: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--sample-size", type=int, nargs=2, metavar=("H", "W"), default=None,
        help="size of the generated image the model is traced with (default: about min_size_test x 4/3 of it)",
    )
    p.add_argument("--verify", action="store_true", help="compare the exports with PyTorch after exporting")
    p.add_argument(
        "--verify-images", nargs="+", default=None, metavar="PATH",
        help="images for --verify (resized like the Predictor); default: two generated scenes; a blank image is always added",
    )
    p.add_argument("--box-atol", type=float, default=1e-2, help="--verify: max box difference in pixels (default 1e-2)")
    p.add_argument("--score-atol", type=float, default=1e-4, help="--verify: max score difference (default 1e-4)")
    p.add_argument("--mask-iou", type=float, default=0.99, help="--verify: min pasted-mask IoU (default 0.99)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.min_size_test=640")
    args = p.parse_args(argv)
    if args.verify_images:  # `--verify-images a.jpg k=v` : argparse gives k=v to the images; move it back
        args.verify_images, overrides = split_overrides(args.verify_images)
        args.overrides = overrides + list(args.overrides)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Export (and verify) as the command line says; 1 when a verification check fails."""
    args = parse_args(argv)
    formats = FORMATS[args.format]
    if args.verify_images and not args.verify:
        print("note: --verify-images given without --verify; verifying anyway", file=sys.stderr)
        args.verify = True
    check_export_options(args.weights, formats, opset=args.opset, device=args.device, sample_size=args.sample_size,
                         verify=args.verify, verify_images=args.verify_images or ())
    cfg = load_detection_config(args.config, args.overrides, tool="export.py")
    classes = resolve_classes(cfg)
    model = build_export_model(cfg, classes.num_classes, args.weights, args.device)
    wrapper = ExportableDetector(model)
    sample_hw = trace_size(cfg, args.sample_size)
    sample = synthetic_scene(sample_hw[0], sample_hw[1], seed=0)

    out_dir = Path(args.output)
    written: dict[str, Path] = {}
    for fmt in formats:
        written[fmt] = export_to(wrapper, fmt, out_dir, sample, opset=args.opset)
        print(f"wrote {written[fmt]} ({written[fmt].stat().st_size / 2**20:.1f} MiB)")
    save_config(cfg, out_dir / "config.yaml")
    manifest = export_manifest(cfg, classes, wrapper, {fmt: p.name for fmt, p in written.items()},
                               opset=args.opset, traced_with_size=sample_hw, weights=args.weights)

    report = None
    if args.verify:
        images = verification_images(cfg, model, args.verify_images)
        report = verify_exports(
            wrapper, [im.image for im in images], torchscript=written.get("torchscript"), onnx=written.get("onnx"),
            box_atol=args.box_atol, score_atol=args.score_atol, mask_iou_min=args.mask_iou,
        )
        for i, im in enumerate(images):
            print(f"image {i}: {im.name}")
        print(report.summary())
        manifest["verification"] = {"images": [im.name for im in images], **report.to_dict()}
        empty = report.images_without_detections()
        if empty:
            print(f"zero-detection case covered by image(s) {', '.join(map(str, empty))}")
        else:
            print("note: every verification image had detections; the zero-detection case was not exercised")
        if report.ok:
            print("verification passed")
    print(f"wrote {write_manifest(out_dir, manifest)}")
    if report is not None and not report.ok:
        print(f"export.py: error: {report.failure_line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export.py"))
