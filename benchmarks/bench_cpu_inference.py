"""CPU inference speed of Faster R-CNN R50-FPN: torchvision vs detkit fp32 vs detkit bf16, same weights.

torchvision's ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` gets reproducible
random weights biased so that detections appear (the parity tests' helper, tests/torchvision_reference.py,
then a background logit of 9 so that 800 px images get tens of detections, as trained models do).
The same state dict goes into detkit through ``Predictor(configs/torchvision/faster_rcnn_R_50_FPN.yaml,
weights=..., precision="fp32" | "bf16")``, i.e. exactly what ``detkit.Predictor`` runs. All models see
the same uint8 images already at test size (coco128 resized to short side 800 / long side <= 1333,
synthetic images without coco128), so torchvision's transform does not resize. Each image is
timed for every model in turn (rotating the order), after warm-up.

Printed: s/img (mean, median, process CPU), ratios to torchvision, parity of detkit fp32 with
torchvision (labels equal, box IoU >= 0.99, |score diff| <= 1e-3, as in the parity tests), agreement
of bf16 with fp32, achieved GFLOP/s (FLOPs counted by ``FlopCounterMode`` on torchvision's model,
per image) next to GEMM peaks measured here, and peak RSS per model measured in a fresh subprocess
each (the kernel's RSS high-water mark ``VmHWM`` over the whole child, and the inference-only peak
after resetting it through ``/proc/self/clear_refs`` once the model is loaded).

    python benchmarks/bench_cpu_inference.py [--images 4] [--threads N] [--levers] [--ap [--ap-images 128]]

``--levers`` adds the lever table (each optimization alone); ``--ap`` runs coco128 and scores bf16
against fp32 detections with COCOeval (fp32 detections as the ground truth) and both against the
real annotations; ``--compile`` times ``torch.compile`` of the backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import detkit  # noqa: E402
from detkit import Predictor  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.machine import cpu_capability, machine_info  # noqa: E402
from detkit.models.build import build_detector  # noqa: E402
from detkit.inference.optimize import bf16_supported, optimize_for_inference  # noqa: E402
from torchvision_reference import randomize_for_detections  # noqa: E402  (tests/: the parity tests' weights)

CONFIG = ROOT / "configs/torchvision/faster_rcnn_R_50_FPN.yaml"
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
BACKGROUND_LOGIT = 9.0

Det = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # boxes, scores, labels (detkit convention)


# --------------------------------------------------------------------------- models and images
def torchvision_model(seed: int = 0) -> nn.Module:
    """torchvision's Faster R-CNN R50-FPN v1 with reproducible, detection-producing random weights."""
    torch.manual_seed(seed)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    randomize_for_detections(model, seed)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] = BACKGROUND_LOGIT  # torchvision: background first
    return model


def load_images(n: int, short: int, max_size: int) -> list[np.ndarray]:
    """``n`` uint8 HxWx3 RGB images at test size: coco128 when present, else smoothed noise."""
    import cv2

    files = sorted((COCO128 / "images").glob("*.jpg"))[:n] if (COCO128 / "images").is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i < len(files):
            img = cv2.cvtColor(cv2.imread(str(files[i]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (9, 9), 0)
        h, w = img.shape[:2]
        s = min(short / min(h, w), max_size / max(h, w))
        out.append(cv2.resize(img, (int(w * s + 0.5), int(h * s + 0.5)), interpolation=cv2.INTER_LINEAR))
    return out


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def tv_runner(tv: nn.Module) -> Callable[[torch.Tensor], Det]:
    def run(im: torch.Tensor) -> Det:
        tv.transform.min_size, tv.transform.max_size = (min(im.shape[1:]),), max(im.shape[1:])
        out = tv([im.float() / 255])[0]
        return out["boxes"], out["scores"], out["labels"] - 1

    return run


def dk_runner(model: nn.Module, autocast: bool = False) -> Callable[[torch.Tensor], Det]:
    def run(im: torch.Tensor) -> Det:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            d = model.predict([im])[0]
        return d.boxes.float(), d.scores.float(), d.labels

    return run


# --------------------------------------------------------------------------- measurements
def compare(ref: Det, det: Det) -> dict[str, float]:
    """Greedy one-to-one matching in the reference's score order (as tests/test_torchvision_parity.py)."""
    rb, rs, rl = ref
    db, ds, dl = det
    res = {"n_ref": len(rb), "n_det": len(db), "matched": 0, "box_iou_min": 1.0, "score_diff_max": 0.0}
    if len(rb) == 0 or len(db) == 0:
        return res
    iou = box_iou(rb, db)
    iou = torch.where(dl[None, :] == rl[:, None], iou, torch.full_like(iou, -1.0))
    taken = torch.zeros(len(db), dtype=torch.bool)
    for i in range(len(rb)):
        ok = (iou[i] >= 0.99) & ~taken
        if not ok.any():
            continue
        gap = (ds - rs[i]).abs()
        j = int(torch.where(ok, gap, torch.full_like(gap, float("inf"))).argmin())
        taken[j] = True
        res["matched"] += 1
        res["box_iou_min"] = min(res["box_iou_min"], float(iou[i, j]))
        res["score_diff_max"] = max(res["score_diff_max"], float(gap[j]))
    return res


def count_flops(tv_run: Callable[[torch.Tensor], Det], images: list[torch.Tensor]) -> list[float]:
    """FLOPs of torchvision's model on each image (FlopCounterMode: convs, matmuls, ...)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for im in images:
        with FlopCounterMode(display=False) as counter:
            tv_run(im)
        flops.append(float(counter.get_total_flops()))
    return flops


def gemm_peaks(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of square matmuls: torch.mm fp32 and bf16, and oneDNN's prepacked fp32 GEMM."""

    def best(fn: Callable[[], torch.Tensor]) -> float:
        fn()
        t = min(_timed(fn) for _ in range(reps))
        return 2 * n**3 / t / 1e9

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"torch.mm fp32": best(lambda: torch.mm(a, b))}
    ab, bb = a.bfloat16(), b.bfloat16()
    out["torch.mm bf16"] = best(lambda: torch.mm(ab, bb))
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        out["oneDNN fp32 (packed)"] = best(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    return out


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_modes(modes: dict[str, Callable[[torch.Tensor], Det]], images: list[torch.Tensor], warmup: int,
               repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[Det]]]:
    """Wall and process-CPU seconds per image for each mode, interleaved image by image."""
    names = list(modes)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    outs: dict[str, list[Det]] = {k: [] for k in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for k in names:
                modes[k](images[0])
        for r in range(repeats):
            for i, im in enumerate(images):
                shift = (i + r) % len(names)
                for k in names[shift:] + names[:shift]:  # rotate who goes first
                    t0, c0 = time.perf_counter(), time.process_time()
                    det = modes[k](im)
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
                    if r == 0:
                        outs[k].append(det)
    return wall, cpu, outs


def rss_child(mode: str, weights: str, n_images: int, size: int) -> None:
    """Run one model in this (fresh) process and print its RSS figures as JSON."""
    images = [to_tensor(im) for im in load_images(n_images, size, 1333)]

    def rss_kb(field: str) -> int:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return -1

    base = rss_kb("VmRSS")
    if mode == "torchvision":
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
        model.load_state_dict(torch.load(weights, weights_only=True))
        run = tv_runner(model)
    else:
        run = dk_runner(Predictor(CONFIG, weights=weights, precision=mode.split("-")[1]).model)
    loaded, load_peak = rss_kb("VmRSS"), rss_kb("VmHWM")
    try:  # reset the peak-RSS counter so VmHWM covers inference only
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        resettable = True
    except OSError:
        resettable = False
    with torch.inference_mode():
        for im in [images[0]] + images:
            run(im)
    peak = rss_kb("VmHWM")
    print(json.dumps({
        "mode": mode, "base_mb": base / 1024, "loaded_mb": loaded / 1024,
        "inference_peak_mb": peak / 1024 if resettable else float("nan"),
        "lifetime_peak_mb": max(peak, load_peak) / 1024,
    }))


def measure_rss(weights: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for mode in ("torchvision", "detkit-fp32", "detkit-bf16"):
        cmd = [sys.executable, __file__, "--rss-child", mode, "--weights-file", weights,
               "--images", str(args.images), "--size", str(args.size), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not line:
            print(f"RSS child {mode} failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(line[-1]))
    return rows


# --------------------------------------------------------------------------- AP agreement
def ap_agreement(fp32: Predictor, bf16: Predictor, n: int) -> None:
    """COCOeval bbox AP of bf16 with fp32 detections as ground truth, and of both vs coco128's labels."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import cv2

    ann_file = COCO128 / "annotations.json"
    if not ann_file.is_file():
        print("AP: coco128 not found; skipped")
        return
    with open(ann_file, encoding="utf-8") as f:
        real = json.load(f)
    images = sorted(real["images"], key=lambda im: im["id"])[:n]
    results: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    t0 = time.perf_counter()
    for info in images:
        img = cv2.cvtColor(cv2.imread(str(COCO128 / "images" / info["file_name"])), cv2.COLOR_BGR2RGB)
        for name, pred in (("fp32", fp32), ("bf16", bf16)):
            p = pred(img)
            for box, score, label in zip(p.boxes.tolist(), p.scores.tolist(), p.labels.tolist()):
                x1, y1, x2, y2 = box
                results[name].append({"image_id": info["id"], "category_id": int(label) + 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    print(f"AP: {len(images)} coco128 images, {len(results['fp32'])} fp32 / {len(results['bf16'])} bf16 detections "
          f"({time.perf_counter() - t0:.0f} s)")
    cats = [{"id": i} for i in range(1, 91)]

    def evaluate(gt_dict: dict, dets: list[dict]) -> float:
        if not dets or not gt_dict["annotations"]:
            return float("nan")
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = gt_dict
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return 100.0 * float(ev.stats[0])

    for thresh in (0.0, 0.5):
        anns = [{"id": k + 1, "image_id": d["image_id"], "category_id": d["category_id"], "bbox": d["bbox"],
                 "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0}
                for k, d in enumerate(r for r in results["fp32"] if r["score"] >= thresh)]
        gt_dict = {"images": [{"id": im["id"], "width": im["width"], "height": im["height"]} for im in images],
                   "annotations": anns, "categories": cats}
        ap32, ap16 = evaluate(gt_dict, results["fp32"]), evaluate(gt_dict, results["bf16"])
        print(f"AP vs fp32 detections (score >= {thresh}) as GT: fp32 {ap32:.2f}, bf16 {ap16:.2f}, "
              f"difference {ap32 - ap16:.2f}")
    ids = {im["id"] for im in images}
    real_gt = {"images": [im for im in real["images"] if im["id"] in ids],
               "annotations": [a for a in real["annotations"] if a["image_id"] in ids],
               "categories": real["categories"]}
    ap32, ap16 = evaluate(real_gt, results["fp32"]), evaluate(real_gt, results["bf16"])
    print(f"AP vs coco128 annotations (random weights: ~0): fp32 {ap32:.3f}, bf16 {ap16:.3f}")


# --------------------------------------------------------------------------- main
def lever_modes(sd: dict, cfg_path: Path) -> dict[str, Callable[[torch.Tensor], Det]]:
    """One model per speed lever, all from the same weights."""
    cfg = load_config(cfg_path)

    def build() -> nn.Module:
        m = build_detector(cfg, num_classes=90).eval()
        detkit.load_weights(m, dict(sd))
        return m

    from detkit.layers import fold_frozen_bn

    fold_cl = optimize_for_inference(build(), "fp32", fuse=False, channels_last=True)
    modes = {
        "dk plain (FrozenBN)": dk_runner(build()),
        "dk +fold BN": dk_runner(fold_frozen_bn(build())),
        "dk +fold +channels_last": dk_runner(fold_cl),
        "dk +fold +CL +oneDNN linear": dk_runner(optimize_for_inference(build(), "fp32", fast_roi_align=False)),
    }
    if bf16_supported("cpu"):
        modes["dk bf16 autocast (fold+CL)"] = dk_runner(copy.deepcopy(fold_cl), autocast=True)
        modes["dk bf16 weights (pooler RoIAlign)"] = dk_runner(
            optimize_for_inference(build(), "bf16", fast_roi_align=False)
        )
    return modes


def time_compile(sd: dict, images: list[torch.Tensor]) -> None:
    """torch.compile (inductor) of the folded channels_last backbone: compile time and s/img."""
    cfg = load_config(CONFIG)
    model = build_detector(cfg, num_classes=90).eval()
    detkit.load_weights(model, sd)
    optimize_for_inference(model, "fp32", fuse=False)
    plain = copy.deepcopy(model)
    model.backbone = torch.compile(model.backbone)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.predict([images[0]])
        print(f"torch.compile: first call (compile) {time.perf_counter() - t0:.1f} s")
        for name, m in (("compiled backbone", model), ("eager", plain)) * 2:
            ts = [_timed(lambda im=im: m.predict([im])) for im in images]
            print(f"torch.compile: {name:18s} {statistics.mean(ts):.3f} s/img (images of differing sizes recompile)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the images")
    parser.add_argument("--size", type=int, default=800, help="short side of the test images")
    parser.add_argument("--levers", action="store_true", help="also time each optimization alone")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--ap", action="store_true", help="bf16 vs fp32 bbox AP agreement on coco128")
    parser.add_argument("--ap-images", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="time torch.compile of the backbone")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.weights_file, args.images, args.size)
        return

    tv = torchvision_model()
    sd = {k: v.clone() for k, v in tv.state_dict().items()}
    fp32 = Predictor(CONFIG, weights=dict(sd), precision="fp32")
    bf16 = Predictor(CONFIG, weights=dict(sd), precision="bf16")
    np_images = load_images(args.images, args.size, 1333)
    images = [to_tensor(im) for im in np_images]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"{machine_info().cpu_summary()}, CPU capability {cpu_capability()}, bf16 native: {bf16_supported('cpu')}; "
          f"images {[tuple(im.shape[1:]) for im in images]} ({'coco128' if COCO128.is_dir() else 'synthetic'})")

    modes: dict[str, Callable[[torch.Tensor], Det]] = {
        "torchvision fp32": tv_runner(tv),
        "detkit fp32": dk_runner(fp32.model),
        f"detkit {bf16.precision} (Predictor precision=bf16)": dk_runner(bf16.model),
    }
    if args.levers:
        modes.update(lever_modes(sd, CONFIG))
    with torch.inference_mode():
        flops = count_flops(modes["torchvision fp32"], images)  # also warms torchvision up
    peaks = gemm_peaks()
    wall, cpu, outs = time_modes(modes, images, args.warmup, args.repeats)

    tv_mean = statistics.mean(wall["torchvision fp32"])
    tv_med = statistics.median(wall["torchvision fp32"])
    gflop = sum(flops) / len(flops) / 1e9
    print(f"\nFLOPs (FlopCounterMode, torchvision): {gflop:.1f} GFLOP/img on average")
    print("GEMM peak here: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"\n{'mode':45s} {'s/img':>7s} {'median':>7s} {'CPU s':>7s} {'x tv':>6s} {'x tv med':>8s} {'GFLOP/s':>8s}")
    for k in modes:
        mean, med = statistics.mean(wall[k]), statistics.median(wall[k])
        print(f"{k:45s} {mean:7.3f} {med:7.3f} {statistics.mean(cpu[k]):7.3f} {tv_mean / mean:6.2f} "
              f"{tv_med / med:8.2f} {gflop / mean:8.1f}")

    print("\nparity (per image: matched/ref/det, min box IoU, max |score diff|):")
    checks = [("detkit fp32", "torchvision fp32", True)] + [
        (k, "torchvision fp32", True) for k in modes if k.startswith("dk ") and "bf16" not in k
    ] + [(k, "detkit fp32", False) for k in modes if "bf16" in k]
    for name, ref_name, strict in checks:
        rows = [compare(r, d) for r, d in zip(outs[ref_name], outs[name])]
        ok = all(r["n_ref"] == r["n_det"] == r["matched"] and r["score_diff_max"] <= 1e-3 for r in rows)
        desc = ", ".join(f"{r['matched']}/{r['n_ref']}/{r['n_det']} {r['box_iou_min']:.4f} {r['score_diff_max']:.1e}"
                         for r in rows)
        verdict = ("PASS" if ok else "FAIL") if strict else "(agreement)"
        print(f"  {name} vs {ref_name}: {verdict}  {desc}")

    if not args.no_rss:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.pth")
            torch.save(sd, path)
            rows = measure_rss(path, args)
        print("\npeak RSS, one fresh process per model (MB): after imports / after load / inference-only peak "
              "(VmHWM reset after loading) / lifetime peak (VmHWM, loading included)")
        for r in rows:
            print(f"  {r['mode']:12s} {r['base_mb']:7.0f} {r['loaded_mb']:7.0f} {r['inference_peak_mb']:7.0f} "
                  f"{r['lifetime_peak_mb']:7.0f}")
    if args.compile:
        time_compile(sd, images)
    if args.ap:
        ap_agreement(fp32, bf16, args.ap_images)


if __name__ == "__main__":
    main()
