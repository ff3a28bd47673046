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
detections; the exit code is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

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

#: exception types whose message is already a one-line instruction for the user
USER_ERRORS = ("ConfigError", "ImageReadError", "DatasetError", "CheckpointError", "ExportError")

FORMATS = {"torchscript": ("torchscript",), "onnx": ("onnx",), "both": ("torchscript", "onnx")}
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


class ToolError(Exception):
    """A user-facing failure; the message is one line saying what to do."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/export.py``."""
    p = argparse.ArgumentParser(
        prog="tools/export.py",
        description="Export Faster/Mask R-CNN to TorchScript and ONNX (dynamic image size) and verify the exports.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config of the model (e.g. runs/mine/config.yaml)")
    p.add_argument("--weights", required=True, help="checkpoint or state dict to export (any load_weights format)")
    p.add_argument("--format", choices=sorted(FORMATS), default="both", help="what to write (default: both)")
    p.add_argument("--output", required=True, help="folder for model.ts / model.onnx / export.json")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 16 (default: 17)")
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
        overrides = [v for v in args.verify_images if "=" in v and not Path(v).is_file()]
        args.verify_images = [v for v in args.verify_images if v not in overrides]
        args.overrides = overrides + list(args.overrides)
    return args


def _use_synthetic_class_names(cfg: Any) -> None:
    """Configs on the generated shapes set that name no classes get the shapes' class names."""
    if cfg.data.synthetic is None or cfg.data.class_names or cfg.model.num_classes is not None:
        return
    if any(a and Path(a).is_file() for a in (cfg.data.train.annotations, cfg.data.val.annotations)):
        return
    from detkit.data.synthetic import SHAPE_CLASSES

    cfg.data.class_names = [name for _, name in sorted(SHAPE_CLASSES)]


def class_names_of(cfg: Any) -> list[str]:
    """Class names from ``data.class_names`` or the categories of the train/val annotations (sorted by id)."""
    if cfg.data.class_names:
        names = list(cfg.data.class_names)
    else:
        names = []
        for ann in (cfg.data.train.annotations, cfg.data.val.annotations):
            if ann and Path(ann).is_file():
                try:
                    cats = json.loads(Path(ann).read_text(encoding="utf-8")).get("categories") or []
                    names = [str(c["name"]) for c in sorted(cats, key=lambda c: int(c["id"]))]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ToolError(f"{ann}: cannot read its categories ({e}); fix the file or set data.class_names")
                if names:
                    break
    n = cfg.model.num_classes
    if n is None and not names:
        raise ToolError("the number of classes is unknown; set model.num_classes=K or data.class_names in the config")
    if n is not None and names and len(names) != n:
        raise ToolError(f"model.num_classes={n} but the config names {len(names)} classes; make them agree")
    return names or [f"class_{i}" for i in range(n)]


def build_model(cfg: Any, weights: str, device: str) -> Any:
    """The plain detector (eval mode, BatchNorms folded) with ``weights``; missing tensors are an error.

    Not the Predictor's speed-optimized model: its fused oneDNN kernels are neither traceable nor
    portable; the exported graph gets its own optimizations (TorchScript / onnxruntime).
    """
    from detkit.checkpoint import load_weights
    from detkit.layers import fold_frozen_bn
    from detkit.models.build import build_detector

    cfg.model.weights = None
    cfg.model.backbone.weights = None  # the detector weights cover the backbone
    model = build_detector(cfg, len(class_names_of(cfg)))
    report = load_weights(model, weights)
    if report.missing or report.mismatched or not report.loaded:
        first = report.summary().splitlines()[0]
        raise ToolError(
            f"--weights {weights} does not fit the model of --config ({first}; "
            f"{len(report.missing)} missing, {len(report.mismatched)} mismatched); pass the config it was trained with"
        )
    return fold_frozen_bn(model.eval()).to(device)


def check_args(args: argparse.Namespace) -> None:
    """Fail early, before loading anything heavy, on arguments that cannot work."""
    if not Path(args.weights).is_file():
        raise ToolError(f"--weights {args.weights}: no such file; pass a checkpoint such as runs/x/checkpoints/best.pth")
    if args.opset < 16:
        raise ToolError(f"--opset {args.opset}: RoIAlign needs opset >= 16; use --opset 17")
    for path in args.verify_images or []:
        if not Path(path).is_file():
            raise ToolError(f"--verify-images {path}: no such file")
    if args.verify_images and not args.verify:
        print("note: --verify-images given without --verify; verifying anyway", file=sys.stderr)
        args.verify = True
    if args.sample_size is not None and min(args.sample_size) < 32:
        raise ToolError(f"--sample-size {args.sample_size[0]} {args.sample_size[1]}: use at least 32 x 32 pixels")
    if "onnx" in FORMATS[args.format]:
        import importlib.util

        needed = ["onnx"] + (["onnxruntime"] if args.verify else [])
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise ToolError(f"{' and '.join(missing)} not installed (needed for ONNX); run `pip install detkit[export]`")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ToolError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")


def synthetic_scene(height: int, width: int, seed: int) -> Any:
    """A float [3, H, W] RGB 0..255 image: gray background, a few colored rectangles and a disc."""
    import torch

    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, height, width), 110.0)
    for _ in range(4):
        h = int(torch.randint(max(height // 6, 1), max(height // 2, 2), (1,), generator=g))
        w = int(torch.randint(max(width // 6, 1), max(width // 2, 2), (1,), generator=g))
        y0 = int(torch.randint(0, max(height - h, 1), (1,), generator=g))
        x0 = int(torch.randint(0, max(width - w, 1), (1,), generator=g))
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = (yy - height * 0.6) ** 2 + (xx - width * 0.3) ** 2 < (min(height, width) * 0.15) ** 2
    img[:, disc] = torch.tensor([40.0, 200.0, 90.0])[:, None]
    return img


def blank_image(model: Any, height: int, width: int) -> Any:
    """An image of the model's mean color: it normalizes to zeros, so a trained model should see nothing."""
    mean = model.pixel_mean.detach().float().cpu().view(3, 1, 1)
    if getattr(model, "input_format", "RGB") == "BGR":
        mean = mean.flip(0)  # pixel_mean is in the backbone's channel order; images are RGB
    return mean.expand(3, height, width).clone()


def verification_images(args: argparse.Namespace, cfg: Any, model: Any) -> tuple[list[Any], list[str]]:
    """Float [3, H, W] images for --verify (resized like the Predictor) and their names."""
    import numpy as np
    import torch

    from detkit.predictor import resize_shortest_edge

    s, smax = cfg.input.min_size_test, cfg.input.max_size_test
    images, names = [], []
    if args.verify_images:
        from detkit.data.images import read_image

        for path in args.verify_images:
            rgb = resize_shortest_edge(read_image(path), s, smax)
            images.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float())
            names.append(str(path))
    else:
        for i, (h, w) in enumerate([(s, min(s * 5 // 4, smax)), (min(s * 3 // 2, smax), s)]):
            images.append(synthetic_scene(h, w, seed=100 + i))
            names.append(f"generated scene {h}x{w}")
    h, w = s - s // 16, min(s + s // 8, smax)
    images.append(blank_image(model, h, w))
    names.append(f"blank {h}x{w} (mean color)")
    return images, names


def run(args: argparse.Namespace) -> int:
    """Export (and verify) as described by ``args``; returns the exit code."""
    check_args(args)
    from detkit.config import load_config, save_config

    cfg = load_config(args.config, args.overrides)
    if getattr(cfg, "task", "detection") != "detection":
        raise ToolError(f"--config {args.config}: task is {cfg.task!r}; export.py needs a detection config")
    _use_synthetic_class_names(cfg)

    from detkit.export import ExportableDetector, export_onnx, export_torchscript, verify_exports

    class_names = class_names_of(cfg)
    model = build_model(cfg, args.weights, args.device)
    wrapper = ExportableDetector(model)
    s = cfg.input.min_size_test
    sample_hw = tuple(args.sample_size) if args.sample_size else (s + s // 8, s * 4 // 3 + s // 16)
    sample = synthetic_scene(sample_hw[0], sample_hw[1], seed=0)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for fmt in FORMATS[args.format]:
        path = out_dir / FILE_NAMES[fmt]
        if fmt == "torchscript":
            export_torchscript(wrapper, path, sample)
        else:
            export_onnx(wrapper, path, sample, opset=args.opset)
        written[fmt] = path.name
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    save_config(cfg, out_dir / "config.yaml")

    manifest: dict[str, Any] = {
        "files": written,
        "architecture": cfg.model.meta_architecture,
        "class_names": class_names,
        "input": {
            "name": "image", "shape": ["3", "height", "width"], "dtype": "float32", "channels": "RGB",
            "range": [0, 255],
            "resize": {"min_size_test": cfg.input.min_size_test, "max_size_test": cfg.input.max_size_test},
        },
        "outputs": {
            "boxes": "float32 [N, 4] xyxy pixels of the input image",
            "scores": "float32 [N], decreasing",
            "labels": "int64 [N], index into class_names",
            **({"masks": "float32 [N, 1, M, M] probabilities; paste into the boxes, threshold mask_threshold"}
               if wrapper.has_mask else {}),
        },
        "mask_threshold": float(model.mask_threshold),
        "opset": args.opset if "onnx" in written else None,
        "traced_with_size": list(sample_hw),
        "weights": str(args.weights),
    }

    status = 0
    if args.verify:
        images, names = verification_images(args, cfg, model)
        report = verify_exports(
            wrapper, images,
            torchscript=out_dir / written["torchscript"] if "torchscript" in written else None,
            onnx=out_dir / written["onnx"] if "onnx" in written else None,
            box_atol=args.box_atol, score_atol=args.score_atol, mask_iou_min=args.mask_iou,
        )
        for i, name in enumerate(names):
            print(f"image {i}: {name}")
        print(report.summary())
        manifest["verification"] = {"images": names, **report.to_dict()}
        empty = [i for i, c in enumerate(report.checks[:: len(written)]) if c.num_ref == 0]
        if empty:
            print(f"zero-detection case covered by image(s) {', '.join(map(str, empty))}")
        else:
            print("note: every verification image had detections; the zero-detection case was not exercised")
        if report.ok:
            print("verification passed")
        else:
            status = 1
    tmp = out_dir / "export.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir / "export.json")
    print(f"wrote {out_dir / 'export.json'}")
    if status:
        failures = report.failures()
        more = f" (+{len(failures) - 1} more, see the table)" if len(failures) > 1 else ""
        raise ToolError(f"verification failed: {failures[0]}{more}")
    return 0


def error_line(e: BaseException) -> str:
    """One line for a failure: the message of expected errors, type + message + hint otherwise."""
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in ("onnx", "onnxruntime", "onnxscript"):
        return f"{e.name} is not installed; run `pip install detkit[export]`"
    if isinstance(e, (ToolError, ValueError, OSError)) or type(e).__name__ in USER_ERRORS:
        return msg
    return f"{type(e).__name__}: {msg} (set DETKIT_DEBUG=1 for a traceback)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: one line on stderr and a non-zero exit code on failure."""
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("export.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable line
        if os.environ.get("DETKIT_DEBUG"):
            raise
        print(f"export.py: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
