"""Overfit check: train a detector from scratch on 8 coco128 images until it finds them again.

A detector that cannot memorize eight images has a bug somewhere between the data and the loss
(label mapping, box format, crowd handling, a loss that does not reach the weights). This runs the
real tool, ``tools/train_det.py``, on the first 8 annotated images of ``../shared/data/coco128``
(real COCO train2017 annotations, non-contiguous category ids, all 80 categories kept), with those
same images as the validation split, and evaluates every ``--eval-period`` iterations. It passes
when bbox AP50 reaches ``--target`` (50 by default) and prints the iteration and the wall time it
took, and the AP history.

Nothing is pretrained (no download): a ResNet-18 FPN with trainable BN, one fixed input size,
no flip, so the eight images are seen exactly as they are evaluated.

    python benchmarks/bench_overfit_coco128.py [--iters 600] [--eval-period 100] [--size 448]
        [--arch faster_rcnn|mask_rcnn] [--output-dir output/bench_overfit] [key=value ...]

Exit status 0 when the target was reached, 1 when it was not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from detkit.cli import run_cli
from detkit.config import load_detection_config
from detkit.engine.run_detection import train_detection
from detkit.machine import cpu_model_name

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"


def first_annotated_images(src: Path, dst: Path, n: int) -> tuple[int, int, int]:
    """Write a COCO file with the first ``n`` images that have a non-crowd annotation (all
    categories kept); returns (images, instances, categories present)."""
    d = json.loads(src.read_text(encoding="utf-8"))
    annotated = {a["image_id"] for a in d["annotations"] if not a.get("iscrowd", 0)}
    d["images"] = [im for im in d["images"] if im["id"] in annotated][:n]
    keep = {im["id"] for im in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    dst.write_text(json.dumps(d), encoding="utf-8")
    instances = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
    return len(d["images"]), len(instances), len({a["category_id"] for a in instances})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="how many coco128 images (default 8)")
    p.add_argument("--iters", type=int, default=500, help="training iterations (default 500)")
    p.add_argument("--eval-period", type=int, default=100, help="evaluate every N iterations (default 100)")
    p.add_argument("--size", type=int, default=384, help="shortest edge, train and test (default 384)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--arch", choices=("faster_rcnn", "mask_rcnn"), default="faster_rcnn")
    p.add_argument("--target", type=float, default=50.0, help="bbox AP50 to reach (default 50)")
    p.add_argument("--output-dir", default=str(ROOT / "output" / "bench_overfit"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more train_det config overrides")
    args = p.parse_args()

    if not (COCO128 / "annotations.json").is_file():
        print(f"coco128 not found at {COCO128} (annotations.json + images/); nothing to measure")
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    subset = out / f"coco128_first{args.images}.json"
    n_img, n_inst, n_cat = first_annotated_images(COCO128 / "annotations.json", subset, args.images)
    images = str(COCO128 / "images")
    config = ROOT / "configs" / "coco" / f"{args.arch}_R_18_FPN_1x.yaml"
    warmup = min(50, args.iters // 10)
    overrides = [
        f"data.train.annotations={subset}", f"data.train.images={images}",
        f"data.val.annotations={subset}", f"data.val.images={images}",
        # from scratch: trainable BN everywhere (FrozenBN is for pretrained weights)
        "model.backbone.norm=BN", "model.backbone.freeze_at=0",
        f"input.min_size_train={args.size}", f"input.max_size_train={args.size * 5 // 3}",
        f"input.min_size_test={args.size}", f"input.max_size_test={args.size * 5 // 3}",
        "input.hflip_prob=0.0", "dataloader.num_workers=0",
        f"train.max_iters={args.iters}", f"train.batch_size={args.batch}", "train.base_lr=0.01",
        f"train.warmup_iters={warmup}", f"train.steps=[{int(args.iters * 0.8)}]",
        f"train.eval_period={args.eval_period}", f"train.checkpoint_period={args.iters}",
        "train.log_period=20", "train.num_vis_images=0", "train.amp=auto",
        # fewer proposals than COCO's defaults: a handful of objects per image, and CPU time
        "model.rpn.pre_nms_topk_train=1000", "model.rpn.post_nms_topk_train=500",
        "model.rpn.pre_nms_topk_test=500", "model.rpn.post_nms_topk_test=300",
        "model.roi_heads.batch_size_per_image=128",
        *args.overrides,
    ]
    print(f"{n_img} images, {n_inst} instances of {n_cat} categories, {args.arch} R18-FPN from scratch, "
          f"{args.size} px, {args.iters} iterations at batch {args.batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpu_model_name()}")
    t0 = time.perf_counter()
    cfg = load_detection_config(config, overrides)
    rc = run_cli(lambda _: train_detection(cfg, out / "run") and 0)  # what tools/train_det.py runs
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"train_det failed (exit {rc}); see {out / 'run' / 'log.txt'}")
        return 1

    records = [json.loads(s) for s in (out / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in records if "bbox/AP50" in r]
    print(f"\n{'iter':>6} {'elapsed s':>10} {'bbox AP':>8} {'AP50':>6}")
    for r in evals:
        print(f"{r['iter']:>6} {r['elapsed_seconds']:>10.0f} {r['bbox/AP']:>8.1f} {r['bbox/AP50']:>6.1f}")
    reached = next((r for r in evals if (r["bbox/AP50"] or 0.0) >= args.target), None)
    if reached is None:
        best = max((r["bbox/AP50"] or 0.0 for r in evals), default=0.0)
        print(f"\nNOT REACHED: best bbox AP50 {best:.1f} < {args.target} after {args.iters} iterations ({wall:.0f} s)")
        return 1
    print(f"\nREACHED bbox AP50 {reached['bbox/AP50']:.1f} >= {args.target} at iteration {reached['iter']}, "
          f"{reached['elapsed_seconds']:.0f} s into training (whole run {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
