"""Cascade Mask R-CNN vs Mask R-CNN: the same R18-FPN, data, schedule and seed; box AP and speed of each.

Both models are trained from scratch by ``train_detection`` (what ``tools/train_det.py`` runs) on the embedded
shapes data (``configs/demo/shapes_mask_rcnn_R_18_FPN.yaml``: generated once under ``--data``), differing
only in ``model.roi_heads.name`` (and the cascade's class-agnostic box regression). The table gives bbox AP,
AP50 and AP75 on the validation split, the median training step time, and the CPU inference time per
validation image of ``Predictor`` (fp32, fast CPU path) on each trained model. Cascade R-CNN's gain should
show at high IoU (AP75); on a short schedule the extra heads may still be under-trained.

    python benchmarks/bench_cascade.py [--iters 1200] [--batch 4] [--data datasets/shapes] [key=value ...]
    python benchmarks/bench_cascade.py --r50 MASK.pkl CASCADE.pkl [--infer-images 4]   # R50-FPN inference only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

from detkit import Predictor
from detkit.cli import run_cli
from detkit.config import load_detection_config
from detkit.data.synthetic import make_shapes_coco
from detkit.engine.run_detection import train_detection
from detkit.machine import cpu_model_name

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
HEADS = {
    "Mask R-CNN": [],
    "Cascade Mask R-CNN": ["model.roi_heads.name=cascade", "model.roi_heads.box_head.cls_agnostic_bbox_reg=true"],
}


def inference_ms(run: Path, images: list[Path], repeats: int) -> float:
    """Median ms per image of the fp32 Predictor (fast CPU path) on ``images``, after one warm-up pass."""
    pred = Predictor(run / "config.yaml", weights=run / "checkpoints" / "last.pth", precision="fp32")
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in images]
    for im in rgb:
        pred(im)
    times = []
    for _ in range(repeats):
        for im in rgb:
            t0 = time.perf_counter()
            pred(im)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def r50_inference(mask_pkl: Path, cascade_pkl: Path, images: int, repeats: int) -> None:
    """Predictor (fp32, fast CPU path) s/img of Mask R-CNN and Cascade Mask R-CNN R50-FPN at Detectron2's
    800 px test size on coco128, from zoo-format files (e.g. the calibrated random weights that
    ``parity_detectron2.py --workdir DIR`` leaves, which give tens of detections per image)."""
    coco = sorted((ROOT.parent / "shared" / "data" / "coco128" / "images").glob("*.jpg"))[:images]
    if not coco:
        raise SystemExit("bench_cascade.py: error: --r50 needs coco128 images at ../shared/data/coco128/images")
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in coco]
    res = {}
    for name, pkl in (("mask_rcnn_R_50_FPN_1x", mask_pkl), ("cascade_mask_rcnn_R_50_FPN_1x", cascade_pkl)):
        pred = Predictor(ROOT / "configs" / "detectron2" / f"{name}.yaml", weights=pkl, precision="fp32")
        heads = pred.model.roi_heads
        roi_time: list[float] = []  # RoI-head seconds per call (start pushed negative, end added)
        hooks = [heads.register_forward_pre_hook(lambda m, a, t=roi_time: t.append(-time.perf_counter())),
                 heads.register_forward_hook(lambda m, a, o, t=roi_time: t.append(t.pop() + time.perf_counter()))]
        dets = [len(pred(im)) for im in rgb]  # warm-up
        roi_time.clear()
        times = []
        for _ in range(repeats):
            for im in rgb:
                t0 = time.perf_counter()
                pred(im)
                times.append(time.perf_counter() - t0)
        for h in hooks:
            h.remove()
        res[name] = (statistics.mean(times), statistics.mean(roi_time), statistics.mean(dets))
        print(f"{name}: {res[name][0]:.3f} s/img, RoI heads {res[name][1]:.3f} s/img, "
              f"{res[name][2]:.0f} detections/img", flush=True)
    (m, mr, _), (c, cr, _) = res.values()
    print(f"Cascade / Mask R-CNN R50-FPN: x{c / m:.2f} per image (RoI heads x{cr / mr:.2f}, +{c - m:.3f} s)")


def train_one(name: str, args: argparse.Namespace, paths: dict) -> dict:
    run = Path(args.output_dir) / name.lower().replace(" ", "_").replace("-", "")
    overrides = [
        "data.synthetic=null",
        f"data.train.annotations={paths['train_annotations']}", f"data.train.images={paths['train_images']}",
        f"data.val.annotations={paths['val_annotations']}", f"data.val.images={paths['val_images']}",
        f"train.max_iters={args.iters}", f"train.batch_size={args.batch}", f"train.seed={args.seed}",
        f"train.warmup_iters={min(100, args.iters // 3)}",  # the demo recipe diverges with a shorter warmup
        f"train.steps=[{int(args.iters * 0.75)},{int(args.iters * 0.92)}]",
        f"train.checkpoint_period={args.iters}", "train.log_period=10", "train.num_vis_images=0",
        *HEADS[name], *args.overrides,
    ]
    t0 = time.perf_counter()
    metrics = train_detection(load_detection_config(DEMO, overrides), run)
    wall = time.perf_counter() - t0
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    step_times = [r["time"] for r in records if "time" in r]
    step_times = [r["time"] for r in records if "time" in r and r.get("iter", 0) > 20] or step_times  # warmed up
    val_images = sorted(Path(paths["val_images"]).glob("*.jpg"))[: args.infer_images]
    return {
        "model": name, "AP": metrics.get("bbox/AP", float("nan")), "AP50": metrics.get("bbox/AP50", float("nan")),
        "AP75": metrics.get("bbox/AP75", float("nan")), "mask AP": metrics.get("segm/AP", float("nan")),
        "step s": statistics.median(step_times) if step_times else float("nan"), "train wall s": wall,
        "infer ms": inference_ms(run, val_images, args.repeats),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=1200, help="training iterations of each model (default 1200)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--seed", type=int, default=42, help="the same seed for both models")
    p.add_argument("--num-train", type=int, default=400, help="generated training images (default 400)")
    p.add_argument("--data", default=str(ROOT / "datasets" / "shapes"), help="where the shapes data is generated")
    p.add_argument("--infer-images", type=int, default=10, help="validation images timed for inference")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over them")
    p.add_argument("--output-dir", default=str(ROOT / "output" / "bench_cascade"))
    p.add_argument("--r50", nargs=2, type=Path, metavar=("MASK_PKL", "CASCADE_PKL"), default=None,
                   help="only time R50-FPN inference (Detectron2 configs) with these zoo-format files; no training")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to both models")
    args = p.parse_args()
    if args.r50:
        r50_inference(*args.r50, images=args.infer_images, repeats=args.repeats)
        return 0
    if args.iters < 20:
        raise SystemExit("bench_cascade.py: error: --iters must be >= 20")

    paths = make_shapes_coco(Path(args.data), num_train=args.num_train, num_val=50, image_size=256, seed=0)
    print(f"shapes data: {args.num_train} train / 50 val images at {args.data}; R18-FPN from scratch, "
          f"{args.iters} iterations at batch {args.batch}, seed {args.seed}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpu_model_name()}", flush=True)
    rows = []
    for name in HEADS:
        rc = run_cli(lambda _, name=name: rows.append(train_one(name, args, paths)) or 0)
        if rc != 0:
            print(f"{name}: training failed (exit {rc})")
            return 1
    cols = ["model", "AP", "AP50", "AP75", "mask AP", "step s", "train wall s", "infer ms"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] if c == "model" else f"{r[c]:.3g}" if c == "step s" else f"{r[c]:.1f}"
                                 for c in cols) + " |")
    base, casc = rows
    print(f"\nCascade - Mask R-CNN: AP {casc['AP'] - base['AP']:+.1f}, AP50 {casc['AP50'] - base['AP50']:+.1f}, "
          f"AP75 {casc['AP75'] - base['AP75']:+.1f}; step time x{casc['step s'] / base['step s']:.2f}, "
          f"inference time x{casc['infer ms'] / base['infer ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
