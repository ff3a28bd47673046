#!/usr/bin/env python
"""Run a trained detector on an image, a folder of images or a video and draw the results.

Drawn images keep their file names (a video keeps its name and is re-encoded with
the ``mp4v`` codec); ``--save-json`` also writes the detections as a COCO results file
(``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``, ``segmentation`` RLE), which
pycocotools' ``COCO.loadRes`` / COCOeval read as is (``--coco-json`` gives the ground truth's
image ids). Everything runs through :class:`detkit.Predictor`; the work is done by
:mod:`detkit.inference.runner`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from detkit.cli import run_cli

EPILOG = """examples:
  # one image -> drawn/photo.jpg
  python tools/infer.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --input photo.jpg --output drawn/
  # a folder, keep detections scoring >= 0.3, also write a COCO results file
  python tools/infer.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --input my/images --output drawn/ --score-thresh 0.3 --save-json drawn/results.json
  # results for COCOeval: image ids of the ground-truth file, every detection kept
  python tools/infer.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --input my/val_images --coco-json my/val.json --score-thresh 0 --save-json results.json
  # a video on the GPU in bfloat16, with a config override
  python tools/infer.py --config runs/mine/config.yaml --weights best.pth --input clip.mp4 \\
      --output drawn/ --device cuda --precision bf16 input.min_size_test=640
  # a large folder on 8 GPUs (or CPU processes with --device cpu): each process predicts a share
  torchrun --nproc_per_node 8 tools/infer.py --config runs/mine/config.yaml --weights best.pth \\
      --input big/images --device cuda --score-thresh 0 --save-json big/results.json
  # the same command after it was stopped (any number of processes): skip the images already done
  torchrun --nproc_per_node 8 tools/infer.py ... --save-json big/results.json --resume

--save-json records: image_id (the --coco-json file's id of the image's file name; without it, the
image's position in the sorted input, or the frame number of a video), category_id (the data's id
recorded in the config's data.category_ids by train_det.py, or the categories of the config's
annotation files; else, with --coco-json, that file's category ids in sorted order when their
number equals the model's classes; else label + 1),
bbox [x, y, w, h] in pixels, score, segmentation (compressed RLE, Mask R-CNN), plus file_name,
label and category_name, which COCO tools ignore.

With --save-json, each finished image is also appended to a part file in <save-json>.parts/ at
once; --resume continues a stopped run from there (same settings required). Under torchrun the
images are split over the processes (NCCL with --device cuda: each uses its LOCAL_RANK GPU; Gloo
with --device cpu), each draws its own share into --output, and rank 0 merges the parts into
--save-json in input order (the same records as one process writes) and deletes the folder. Put
--save-json on a filesystem every process sees. A video runs in one process only.

throughput mode: --batch-size N (or test.batch_size=N) sends up to N images of a folder to the model
at once, read ahead on a thread; everything is still written image by image in input order (progress
lines, drawn files, part files, --resume; resuming needs the same N). A model call only holds
images of one size after resizing (the Predictor groups them), so no image is padded for another
and the detections are exactly those of N=1. A video runs one frame per call. On CPU batching gains
little (larger images fill the cores alone); see benchmarks/bench_throughput.py.
"""


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return int(text)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/infer.py``."""
    p = argparse.ArgumentParser(
        prog="tools/infer.py",
        description="Draw a detector's predictions on an image, a folder of images or a video.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config of the model (e.g. runs/mine/config.yaml)")
    p.add_argument("--weights", default=None, help="checkpoint file, or a name: torchvision://..., detectron2://..., "
                   "https://... (default: the config's model.weights)")
    p.add_argument("--input", required=True, help="an image file, a folder of images, or a video file")
    p.add_argument("--output", default=None, help="folder for the drawn images / video (default: none written)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--save-json", default=None, metavar="FILE",
                   help="write the detections here as a COCO results file (category_id: the config's "
                        "data.category_ids, else label + 1; see below)")
    p.add_argument("--coco-json", default=None, metavar="PATH",
                   help="COCO annotations file whose image ids (matched by file name) --save-json uses, so "
                        "the results go straight into COCOeval with it; images it does not list get no records")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="inference precision (fp16: CUDA GPUs; int8: backbone + FPN quantized, calibrated on data.train; "
                        "see tools/quantize.py)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run from the part files of its --save-json (<save-json>.parts/), "
                        "skipping the images already done")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="images per model call for an image folder (default: the config's test.batch_size, "
                        "usually 1); a video runs one frame per call. See 'throughput mode' below")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.min_size_test=640")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run inference as the command line says (errors: see :func:`detkit.cli.run_cli`)."""
    args = parse_args(argv)
    from detkit.inference.runner import InferOptions, run_inference  # after parsing: --help stays instant

    run_inference(InferOptions(
        config=args.config, input=args.input, weights=args.weights, output=args.output,
        score_thresh=args.score_thresh, save_json=args.save_json, coco_json=args.coco_json,
        device=args.device, precision=args.precision, overrides=tuple(args.overrides), resume=args.resume,
        batch_size=args.batch_size,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="infer.py", keep_freed_memory=True))  # inference: malloc kept warm
