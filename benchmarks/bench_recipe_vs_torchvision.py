"""Train detkit and torchvision with the same recipe on a fixed coco128 split; compare AP over seeds.

Both detectors are Mask R-CNN with a ResNet-18 FPN trained from scratch (BatchNorm, every layer
trainable), with the same schedule: SGD (momentum 0.9, weight decay 1e-4, none on norms), a linear
warm-up from 0.001x, the LR divided by 10 at 75% and 90% of the run, shortest side ``--min-size``
(longest ``--max-size``) in training and test, horizontal flip 0.5.

* detkit runs the real tool, ``tools/train_det.py``, with ``configs/coco/mask_rcnn_R_18_FPN_1x.yaml``
  and only overrides: once in fp32 (``train.amp=none``) and once with ``train.amp=auto`` (bf16 where
  the CPU has it natively), so bf16 training is measured on its own.
* torchvision runs ``MaskRCNN(resnet_fpn_backbone("resnet18", norm_layer=BatchNorm2d,
  trainable_layers=5))`` with its defaults, in fp32, in a loop written here (cv2 decoding, the
  model's own resize, flip, random batches grouped by orientation).

Two datasets (``--dataset``):

* ``coco128-person``: coco128's ``person`` class (``--category``): the images that contain a non-crowd
  instance, split by image id (every third image is a test image); real, hand-drawn polygons.
* ``shapes``: with the demo's light heads on both sides (``configs/demo/shapes_mask_rcnn_R_18_FPN.yaml``;
  torchvision's ``MaskRCNN`` given the same FPN width, anchors, proposal / RoI counts and head
  widths), the embedded shapes set (:func:`detkit.data.synthetic.make_shapes_coco`, four classes,
  exact polygon / RLE masks), ``--shapes-train`` / ``--shapes-test`` images of 256 px; cheap runs, and
  masks exact enough that strict IoU (segm AP75) measures the mask path, not the annotators.

Both are scored with pycocotools on the test images. Each (mode, seed) runs in its own process; the
table gives the mean and standard deviation over seeds of bbox and segm AP / AP50 / AP75, and the
median step time. ``--summary`` prints the table of every run cached under ``--output-dir`` (all
arms at once) without running anything. A run that
stops on a non-finite loss (``train_det`` refuses the bad step; the torchvision loop does the same)
scores 0 AP, and the table counts it under "diverged" with the iteration it stopped at.

    python benchmarks/bench_recipe_vs_torchvision.py                       # defaults: 3 seeds, 3 modes
    python benchmarks/bench_recipe_vs_torchvision.py --dataset shapes      # the shapes set
    python benchmarks/bench_recipe_vs_torchvision.py --dataset shapes --modes detkit_fp32 --tag unaligned \
        --detkit-overrides model.roi_heads.mask_head.target_aligned=false model.mask_paste=torchvision
    python benchmarks/bench_recipe_vs_torchvision.py --dataset shapes --summary   # every arm run so far
    python benchmarks/bench_recipe_vs_torchvision.py --iters 300 --seeds 0 --modes detkit_fp32 \\
        --detkit-overrides model.rpn.post_nms_topk_train=2000 --tag post2000   # one ablation arm

``--detkit-overrides`` adds config overrides to the detkit modes (an ablation arm); ``--tag`` names
the arm in the output folder and the table. Results are cached per run in ``--output-dir`` as
``result.json`` (``--force`` reruns).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
MODES = ("torchvision", "detkit_fp32", "detkit_auto")
METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")


# ----------------------------------------------------------------------------- data
def make_split(src: Path, out: Path, category: str, test_every: int) -> tuple[Path, Path, dict]:
    """Write ``train.json`` and ``test.json`` with one category (contiguous split by image id)."""
    d = json.loads((src / "annotations.json").read_text(encoding="utf-8"))
    cats = [c for c in d["categories"] if c["name"] == category]
    if not cats:
        raise SystemExit(f"category {category!r} is not in {src / 'annotations.json'}")
    cat = cats[0]
    anns = [a for a in d["annotations"] if a["category_id"] == cat["id"]]
    with_instance = sorted({a["image_id"] for a in anns if not a.get("iscrowd", 0)})
    test_ids = set(with_instance[test_every - 1 :: test_every])
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    paths = []
    for split, ids in (("train", [i for i in with_instance if i not in test_ids]), ("test", sorted(test_ids))):
        keep = set(ids)
        part = {
            "images": [im for im in d["images"] if im["id"] in keep],
            "annotations": [a for a in anns if a["image_id"] in keep],
            "categories": [cat],
        }
        path = out / f"{split}.json"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: concurrent invocations share it
        tmp.write_text(json.dumps(part), encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
        stats[split] = (len(part["images"]), sum(1 for a in part["annotations"] if not a.get("iscrowd", 0)))
    return paths[0], paths[1], stats


def make_shapes(out: Path, num_train: int, num_test: int) -> tuple[Path, Path, Path, Path, dict]:
    """The shapes set's train / val split (generated once): annotation files, image folders, counts."""
    from detkit.data.synthetic import make_shapes_coco

    paths = make_shapes_coco(out / "shapes", num_train=num_train, num_val=num_test, image_size=256, seed=0)
    stats = {}
    for split, key in (("train", "train"), ("test", "val")):
        d = json.loads(Path(paths[f"{key}_annotations"]).read_text(encoding="utf-8"))
        stats[split] = (len(d["images"]), sum(1 for a in d["annotations"] if not a.get("iscrowd", 0)))
    return (Path(paths["train_annotations"]), Path(paths["train_images"]), Path(paths["val_annotations"]),
            Path(paths["val_images"]), stats)


def schedule(iters: int, warmup: int) -> tuple[list[int], int]:
    return [int(round(iters * 0.75)), int(round(iters * 0.9))], warmup


# ----------------------------------------------------------------------------- detkit
def run_detkit(args: argparse.Namespace, amp: str, seed: int, out: Path) -> dict:
    steps, warmup = schedule(args.iters, args.warmup)
    overrides = [
        f"data.train.annotations={args.train_json}", f"data.train.images={args.train_images}",
        f"data.val.annotations={args.test_json}", f"data.val.images={args.test_images}",
        "model.backbone.norm=BN", "model.backbone.freeze_at=0",
        f"input.min_size_train={args.min_size}", f"input.max_size_train={args.max_size}",
        f"input.min_size_test={args.min_size}", f"input.max_size_test={args.max_size}",
        "input.hflip_prob=0.5",
        f"train.max_iters={args.iters}", f"train.batch_size={args.batch}", f"train.base_lr={args.lr}",
        f"train.steps=[{steps[0]},{steps[1]}]", f"train.warmup_iters={warmup}", "train.warmup_factor=0.001",
        f"train.seed={seed}", f"train.amp={amp}", "train.checkpoint_period=1000000", "train.eval_period=0",
        "train.log_period=10", "train.num_vis_images=0", f"dataloader.num_workers={args.workers}",
        *args.detkit_overrides,
    ]
    root = args.detkit_root
    config = ("demo/shapes_mask_rcnn_R_18_FPN.yaml" if args.dataset == "shapes" else "coco/mask_rcnn_R_18_FPN_1x.yaml")
    cmd = [sys.executable, str(root / "tools" / "train_det.py"), "--config", str(root / "configs" / config),
           "--output-dir", str(out), *overrides]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and _detkit_diverged_at(out) is not None:
        return _detkit_diverged(out, wall)
    if proc.returncode != 0:
        raise SystemExit(f"detkit run failed ({out}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {
        "bbox_AP": metrics["bbox/AP"], "bbox_AP50": metrics["bbox/AP50"], "bbox_AP75": metrics["bbox/AP75"],
        "segm_AP": metrics["segm/AP"], "segm_AP50": metrics["segm/AP50"], "segm_AP75": metrics["segm/AP75"],
        "step_s": _median_step(out), "wall_s": wall,
    }


def _detkit_diverged_at(out: Path) -> Optional[int]:
    """The iteration a detkit run stopped at on a non-finite loss (its log.txt's error line), else None."""
    log = out / "log.txt"
    found = re.search(r"iteration (\d+): non-finite loss", log.read_text(encoding="utf-8")) if log.is_file() else None
    return int(found.group(1)) if found else None


def _detkit_diverged(out: Path, wall: float) -> dict:
    """The result of a run that train_det stopped before a non-finite step: it scores 0 AP."""
    return {**dict.fromkeys(METRICS, 0.0), "step_s": _median_step(out), "wall_s": wall,
            "diverged_at": _detkit_diverged_at(out)}


def _median_step(out: Path) -> float:
    """Median logged step time of a detkit run, leaving out the first (warm-up) log period."""
    log = out / "metrics.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    times = [json.loads(line)["time"] for line in lines if '"time"' in line]
    return statistics.median(times[1:] or times) if times else float("nan")


# ----------------------------------------------------------------------------- torchvision
def _tv_sample(coco, img_id: int, images: Path, flip: bool, labels: dict[int, int]):
    import cv2
    import torch
    info = coco.imgs[img_id]
    bgr = cv2.imread(str(images / info["file_name"]), cv2.IMREAD_COLOR)
    img = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1).float() / 255.0
    anns = [a for a in coco.imgToAnns[img_id] if not a.get("iscrowd", 0)]  # torchvision's reference drops crowd
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32).reshape(-1, 4)
    masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])) if anns else torch.zeros(
        (0, info["height"], info["width"]), dtype=torch.uint8)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, masks = boxes[keep], masks[keep]
    if flip:
        w = img.shape[-1]
        img, masks = img.flip(-1), masks.flip(-1)
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    cls = torch.tensor([labels[a["category_id"]] for a in anns], dtype=torch.int64)[keep]
    target = {"boxes": boxes, "labels": cls, "masks": masks}
    return img, target


def _light_heads(num_classes: int) -> dict:
    """torchvision's MaskRCNN arguments for the heads of ``configs/demo/shapes_mask_rcnn_R_18_FPN.yaml``
    (64-channel FPN and mask head, 256-d box FCs, anchors 16-256, fewer proposals and RoIs)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    return dict(
        rpn_anchor_generator=AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300, box_batch_size_per_image=64,
        box_head=TwoMLPHead(64 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
        mask_head=MaskRCNNHeads(64, (64, 64, 64, 64), 1), mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
    )


def run_torchvision(args: argparse.Namespace, seed: int, out: Path) -> dict:
    import torch
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from torch import nn
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    light = args.dataset == "shapes"  # the demo's light heads, built the same way on both sides
    if light:  # resnet_fpn_backbone with a 64-channel FPN
        from torchvision.models import resnet18
        from torchvision.models.detection.backbone_utils import BackboneWithFPN
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        backbone = BackboneWithFPN(resnet18(weights=None, norm_layer=nn.BatchNorm2d),
                                   {f"layer{k}": str(k - 1) for k in range(1, 5)}, [64, 128, 256, 512], 64,
                                   extra_blocks=LastLevelMaxPool())
    else:
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                       trainable_layers=5)
    coco = COCO(str(args.train_json))
    cat_ids = sorted(coco.cats)
    labels = {c: i + 1 for i, c in enumerate(cat_ids)}  # contiguous 1..K, 0 is the background
    heads = _light_heads(len(cat_ids) + 1) if light else {"num_classes": len(cat_ids) + 1}
    model = MaskRCNN(backbone, min_size=args.min_size, max_size=args.max_size, **heads)
    norm_params = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    norm_ids = {id(p) for p in norm_params}
    other = [p for p in model.parameters() if id(p) not in norm_ids and p.requires_grad]
    opt = torch.optim.SGD([{"params": other, "weight_decay": 1e-4}, {"params": norm_params, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9)
    steps, warmup = schedule(args.iters, args.warmup)

    ids = [i for i in sorted(coco.imgs) if any(not a.get("iscrowd", 0) for a in coco.imgToAnns[i])]
    pending: dict[bool, list[int]] = {True: [], False: []}
    order: list[int] = []
    times = []
    model.train()
    for it in range(args.iters):
        factor = 0.1 ** sum(it >= s for s in steps)
        if it < warmup:
            alpha = it / warmup
            factor *= 0.001 * (1 - alpha) + alpha
        for g in opt.param_groups:
            g["lr"] = args.lr * factor
        batch = None
        while batch is None:  # shuffled epochs, batches of one orientation (aspect-ratio grouping)
            if not order:
                order = list(rng.permutation(ids))
            i = int(order.pop())
            g = coco.imgs[i]["width"] >= coco.imgs[i]["height"]
            pending[g].append(i)
            if len(pending[g]) == args.batch:
                batch, pending[g] = pending[g], []
        samples = [_tv_sample(coco, i, args.train_images, bool(rng.random() < 0.5), labels) for i in batch]
        t0 = time.perf_counter()
        losses = model([s[0] for s in samples], [s[1] for s in samples])
        loss = sum(losses.values())
        if not math.isfinite(float(loss)):  # stop before the bad step, as train_det does; the run scores 0
            print(f"torchvision: non-finite loss at iteration {it + 1}: {losses}", file=sys.stderr)
            return {**dict.fromkeys(METRICS, 0.0),
                    "step_s": statistics.median(times[1:] or times), "wall_s": sum(times), "diverged_at": it + 1}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)

    model.eval()
    test_coco = COCO(str(args.test_json))
    results = []
    with torch.no_grad():
        for img_id in sorted(test_coco.imgs):
            img, _ = _tv_sample(test_coco, img_id, args.test_images, False, labels)
            det = model([img])[0]
            for box, score, label, m in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                            det["masks"][:, 0] > 0.5):
                rle = mask_util.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                results.append({"image_id": img_id, "category_id": cat_ids[label - 1], "score": score,
                                "segmentation": rle,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    (out / "results.json").write_text(json.dumps(results), encoding="utf-8")
    stats = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            stats[iou_type] = [0.0] * 12
            continue
        ev = COCOeval(test_coco, test_coco.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats[iou_type] = [max(float(v), 0.0) * 100 for v in ev.stats]
    return {
        "bbox_AP": stats["bbox"][0], "bbox_AP50": stats["bbox"][1], "bbox_AP75": stats["bbox"][2],
        "segm_AP": stats["segm"][0], "segm_AP50": stats["segm"][1], "segm_AP75": stats["segm"][2],
        "step_s": statistics.median(times[1:]), "wall_s": sum(times),
    }


# ----------------------------------------------------------------------------- driver
def run_one(args: argparse.Namespace, mode: str, seed: int) -> dict:
    """One (mode, seed) run in its own process with ``--threads`` threads; cached in ``result.json``."""
    tag = f"{mode}{'_' + args.tag if args.tag and mode != 'torchvision' else ''}"
    out = args.output_dir / "runs" / f"{tag}_s{seed}"
    cached = out / "result.json"
    if cached.is_file() and not args.force:
        return json.loads(cached.read_text(encoding="utf-8"))
    if mode != "torchvision" and not args.force and _detkit_diverged_at(out) is not None:
        # an earlier run of this arm already stopped on a non-finite loss: its log is the record
        res = _detkit_diverged(out, float("nan"))
        res.update(mode=mode, tag=args.tag, seed=seed, threads=args.threads)
        cached.write_text(json.dumps(res, indent=1), encoding="utf-8")
        return res
    out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the run's process
    if mode == "torchvision":
        cmd = [sys.executable, __file__, "--worker", str(seed), "--output-dir", str(args.output_dir),
               "--dataset", args.dataset, "--data", str(args.data), "--category", args.category,
               "--test-every", str(args.test_every), "--shapes-train", str(args.shapes_train),
               "--shapes-test", str(args.shapes_test), "--iters", str(args.iters), "--batch", str(args.batch),
               "--lr", str(args.lr),
               "--warmup", str(args.warmup), "--min-size", str(args.min_size), "--max-size", str(args.max_size),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"torchvision run failed ({out}):\n{proc.stderr[-3000:]}")
        res = json.loads((out / "tv_result.json").read_text(encoding="utf-8"))
    else:
        res = run_detkit(args, "none" if mode == "detkit_fp32" else "auto", seed, out)
    res.update(mode=mode, tag=args.tag if mode != "torchvision" else "", seed=seed, threads=args.threads)
    cached.write_text(json.dumps(res, indent=1), encoding="utf-8")
    return res


def summarize(rows: list[dict]) -> str:
    def ms(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        return f"{statistics.mean(vals):5.2f} ± {sd:4.2f}"

    lines = ["| mode | seeds | diverged | bbox AP | bbox AP50 | bbox AP75 | segm AP | segm AP50 | segm AP75 | step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["mode"], r["tag"]) for r in rows}, key=lambda k: (MODES.index(k[0]), k[1]))
    for mode, tag in keys:
        rs = [r for r in rows if (r["mode"], r["tag"]) == (mode, tag)]
        cols = [ms([r.get(k, float("nan")) for r in rs]) for k in METRICS]
        name = mode + (f" [{tag}]" if tag else "")
        div = [str(r["diverged_at"]) for r in rs if "diverged_at" in r]
        div_col = f"{len(div)} (at iter {', '.join(div)})" if div else "0"
        lines.append(f"| {name} | {len(rs)} | {div_col} | " + " | ".join(cols)
                     + f" | {statistics.median(r['step_s'] for r in rs):.2f} |")
    return "\n".join(lines)


def cpu_flags() -> str:
    """``"<CPU model> (<N> CPUs; <bf16/AMX/VNNI flags>)"`` (:mod:`detkit.machine`)."""
    from detkit.machine import machine_info

    return machine_info().cpu_summary()


#: per-dataset defaults of --iters, --batch, --warmup, --min-size, --max-size
DEFAULTS = {"coco128-person": dict(iters=300, batch=2, warmup=100, min_size=256, max_size=416),
            "shapes": dict(iters=400, batch=4, warmup=100, min_size=160, max_size=224)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="coco128-person")
    p.add_argument("--data", type=Path, default=COCO128, help="coco128 folder (annotations.json, images/)")
    p.add_argument("--category", default="person")
    p.add_argument("--test-every", type=int, default=3, help="every k-th image (by id) is a test image")
    p.add_argument("--shapes-train", type=int, default=400, help="shapes: training images")
    p.add_argument("--shapes-test", type=int, default=150, help="shapes: test images")
    for name in ("iters", "batch", "warmup", "min_size", "max_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {DEFAULTS['coco128-person'][name]} (coco128-person), "
                            f"{DEFAULTS['shapes'][name]} (shapes)")
    p.add_argument("--lr", type=float, default=None, help="base LR (default 0.005 x batch: 0.02 at batch 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--detkit-overrides", nargs="*", default=[], help="extra key=value for the detkit modes")
    p.add_argument("--tag", default="", help="name of the ablation arm (with --detkit-overrides or --detkit-root)")
    p.add_argument("--detkit-root", type=Path, default=ROOT,
                   help="detkit checkout whose tools/ and detkit/ the detkit modes run (e.g. a git worktree of an "
                        "older commit, for an ablation arm)")
    p.add_argument("--workers", type=int, default=0, help="detkit data-loader workers")
    p.add_argument("--output-dir", type=Path, default=None, help="default output/bench_recipe/<dataset>")
    p.add_argument("--force", action="store_true", help="rerun cached runs")
    p.add_argument("--summary", action="store_true", help="only print the table of every cached run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (each gets cpu_count / jobs threads; step times then share the CPU)")
    p.add_argument("--threads", type=int, default=None, help="threads per run (default cpu_count / jobs)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one torchvision run
    args = p.parse_args()
    for name, value in DEFAULTS[args.dataset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr is None:
        args.lr = 0.005 * args.batch
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    if args.output_dir is None:
        args.output_dir = ROOT / "output" / "bench_recipe" / args.dataset
    if args.summary:
        rows = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(args.output_dir.glob("runs/*/result.json"))]
        print(summarize(rows) if rows else f"no cached runs under {args.output_dir}")
        return 0
    if args.dataset == "shapes":
        args.train_json, args.train_images, args.test_json, args.test_images, stats = make_shapes(
            args.output_dir / "data", args.shapes_train, args.shapes_test)
        what = "shapes"
    else:
        if not (args.data / "annotations.json").is_file():
            print(f"coco128 not found at {args.data}; pass --data", file=sys.stderr)
            return 2
        args.train_json, args.test_json, stats = make_split(args.data, args.output_dir / "data", args.category,
                                                            args.test_every)
        args.train_images = args.test_images = args.data / "images"
        what = args.category
    if args.worker is not None:
        out = args.output_dir / "runs" / f"torchvision_s{args.worker}"
        res = run_torchvision(args, args.worker, out)
        (out / "tv_result.json").write_text(json.dumps(res), encoding="utf-8")
        return 0
    print(f"{what}: train {stats['train'][0]} images / {stats['train'][1]} instances, "
          f"test {stats['test'][0]} / {stats['test'][1]}; {args.iters} iterations at batch {args.batch}, "
          f"{args.min_size}-{args.max_size} px; {cpu_flags()}", flush=True)
    grid = [(mode, seed) for seed in args.seeds for mode in args.modes]
    rows = []
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:  # threads only wait on the processes
        futures = {pool.submit(run_one, args, mode, seed): (mode, seed) for mode, seed in grid}
        for fut in as_completed(futures):
            r = fut.result()
            rows.append(r)
            note = f" DIVERGED at iteration {r['diverged_at']} (scored 0)" if "diverged_at" in r else ""
            print(f"  {r['mode']}{' [' + r['tag'] + ']' if r['tag'] else ''} seed {r['seed']}:{note} bbox AP "
                  f"{r['bbox_AP']:.1f} AP50 {r['bbox_AP50']:.1f}, segm AP {r['segm_AP']:.1f} "
                  f"AP75 {r.get('segm_AP75', float('nan')):.1f}, step {r['step_s']:.2f} s "
                  f"({r['threads']} threads), wall {r['wall_s'] / 60:.1f} min", flush=True)
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
