"""detkit vs Detectron2 itself on the ten COCO model-zoo R-CNNs (Cascade Mask R-CNN included), same random weights.

Detectron2 is not on the package index: build it from source into its own virtual environment
(a CPU build works) and run this script with that environment's Python::

    python -m venv --system-site-packages /work/d2venv      # reuses the system torch / torchvision
    /work/d2venv/bin/pip install fvcore iopath pycocotools omegaconf hydra-core ...
    FORCE_CUDA=0 /work/d2venv/bin/pip install --no-build-isolation --no-deps -e <detectron2 source>
    /work/d2venv/bin/python benchmarks/parity_detectron2.py                       # all ten, 4 images
    /work/d2venv/bin/python benchmarks/parity_detectron2.py --models faster_rcnn_R_50_FPN_1x --images 2

For each model the script

1. builds Detectron2's model from its zoo config (CPU, eval) with a fixed seed, and calibrates the
   random weights in one forward pass over the compared images at Detectron2's test size
   (pre-hooks set each layer from the input it actually receives, in execution order): every
   FrozenBN gets its input's per-channel mean / variance as running statistics (random affine
   around 1 / 0), so activations stay O(1) through the 50-101 blocks; the RPN objectness logits get
   a spread of 1.5 (no near-ties in top-k); the box classifier is made blind to each image's mean
   RoI feature (scores depend on the RoI, not on the image) with a constant background logit chosen
   so that tens of detections survive per image (at least ~40 (RoI, class) pairs above the score
   threshold before NMS in the sparsest image); the box / anchor deltas and the mask logits get
   moderate ranges (mask logits centred, so masks have edges);
2. writes the state dict as a zoo-format ``.pkl`` (``{"model": {name: ndarray}, "__author__"}``),
   including the buffers the published zoo files carry (``pixel_mean``, ``pixel_std``,
   ``proposal_generator.anchor_generator.cell_anchors.{0..4}``; ``--no-legacy-buffers`` leaves them
   out);
3. loads that file with ``detkit.Predictor(configs/detectron2/<model>.yaml, weights=..., "fp32")``
   and runs both on ``--images`` coco128 images, in two input modes:

   * ``own``: each side does its own test-time resize (Detectron2's ``DefaultPredictor`` pipeline:
     BGR, ``ResizeShortestEdge(800, 1333)`` with PIL bilinear; detkit's ``Predictor``: RGB in,
     its configured transform);
   * ``same``: detkit gets exactly the pixels Detectron2's resize produced (bypassing its own
     transform), so only the models differ;
   * ``d2-on-dk-pixels`` (``--resize-control``): Detectron2 against itself fed detkit's resized
     pixels, so the resize difference alone is measured (the ``dk`` columns are then Detectron2's).

Detections (in original-image pixels) are matched one-to-one, greedily in score order: same label,
box IoU >= 0.99, the closest score among those. The table gives, per model and mode, the fraction
of detkit detections matched to Detectron2 ones and vice versa, the mean / min box IoU and max
score difference of the matches, and (Mask R-CNN) the mean / min mask IoU of the matched pasted
masks. The bar (issue #10): matched >= 0.99 both ways, box IoU >= 0.99, mask IoU >= 0.98 (``result``
applies it as is). Unmatched detections are listed after the table with their scores; the
``unmatched at thresh`` column counts those within 1e-3 of the 0.05 score threshold: the same
candidate landing on either side of the threshold after float rounding (scores differ by up to a
few 1e-4 under these random weights), not a different detection.
``--stages`` also compares the first image stage by stage (normalized input, FPN features,
proposals) on the ``same`` input, to say where a disagreement starts.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from d2_calibration import calibrate_d2  # noqa: E402  (benchmarks/ is the script's folder)
COCO128 = ROOT.parent / "shared" / "data" / "coco128" / "images"
MODELS = tuple(
    f"{arch}_rcnn_{net}"
    for arch in ("faster", "mask")
    for net in ("R_50_FPN_1x", "R_50_FPN_3x", "R_101_FPN_3x", "X_101_32x8d_FPN_3x")
) + ("cascade_mask_rcnn_R_50_FPN_1x", "cascade_mask_rcnn_R_50_FPN_3x")  # appended: the others keep their seeds
MATCH_IOU = 0.99
SCORE_THRESH = 0.05  # Detectron2's ROI_HEADS.SCORE_THRESH_TEST in all ten configs
NEAR_THRESH = 1e-3  # an unmatched detection this close to SCORE_THRESH is a threshold flip


def has_masks(name: str) -> bool:
    """Mask R-CNN and Cascade Mask R-CNN zoo names."""
    return name.startswith(("mask_rcnn", "cascade_mask_rcnn"))


@dataclass
class Dets:
    """Detections of one image in its original pixels: boxes float [N, 4] xyxy, scores [N],
    labels int64 [N] (0..79, Detectron2's contiguous COCO order), masks bool [N, H, W] or None."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray]


# ----------------------------------------------------------------------------- Detectron2 side
def build_d2(name: str, seed: int) -> tuple[nn.Module, object]:
    """Detectron2's model and config for a zoo model name, on CPU, eval mode, random init."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    if name.startswith("cascade"):
        folder = "Misc"  # Detectron2 keeps its Cascade R-CNN configs there
    else:
        folder = "COCO-InstanceSegmentation" if name.startswith("mask") else "COCO-Detection"
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(f"{folder}/{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(seed)
    return build_model(cfg).eval(), cfg


def write_zoo_pkl(model: nn.Module, cfg: object, path: Path, legacy_buffers: bool) -> tuple[int, int]:
    """Write ``model``'s weights as a Detectron2 model-zoo ``.pkl``; returns the number of arrays and
    how many of them are legacy buffers."""
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    n_weights = len(sd)
    if legacy_buffers:  # what the published zoo files carry besides the weights
        sd["pixel_mean"] = np.asarray(cfg.MODEL.PIXEL_MEAN, np.float32).reshape(3, 1, 1)
        sd["pixel_std"] = np.asarray(cfg.MODEL.PIXEL_STD, np.float32).reshape(3, 1, 1)
        for i, a in enumerate(model.proposal_generator.anchor_generator.cell_anchors):
            sd[f"proposal_generator.anchor_generator.cell_anchors.{i}"] = a.cpu().numpy()
    with open(path, "wb") as f:
        pickle.dump({"model": sd, "__author__": "detkit parity"}, f)
    return len(sd), len(sd) - n_weights


def d2_resize(cfg: object, image_bgr: np.ndarray) -> np.ndarray:
    """Detectron2's DefaultPredictor resize (ResizeShortestEdge, PIL bilinear) of a uint8 HxWx3 image."""
    from detectron2.data import transforms as T

    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    return aug.get_transform(image_bgr).apply_image(image_bgr)


@torch.no_grad()
def d2_predict(model: nn.Module, resized_bgr: np.ndarray, orig_hw: tuple[int, int]) -> Dets:
    """DefaultPredictor's model call on an already resized BGR image; detections in original pixels."""
    t = torch.from_numpy(np.ascontiguousarray(resized_bgr.transpose(2, 0, 1)).astype(np.float32))
    inst = model([{"image": t, "height": orig_hw[0], "width": orig_hw[1]}])[0]["instances"]
    return Dets(
        boxes=inst.pred_boxes.tensor.numpy().astype(np.float32),
        scores=inst.scores.numpy().astype(np.float32),
        labels=inst.pred_classes.numpy().astype(np.int64),
        masks=inst.pred_masks.numpy().astype(bool) if inst.has("pred_masks") else None,
    )


# ----------------------------------------------------------------------------- detkit side
def detkit_predict(predictor: object, image_rgb: np.ndarray, resized_rgb: Optional[np.ndarray] = None) -> Dets:
    """detkit on the original image (its own resize), or on ``resized_rgb`` as given (no resize)."""
    from detkit.models.detector import rescale_detections

    if resized_rgb is None:
        p = predictor(image_rgb)
        return Dets(p.boxes, p.scores, p.labels, p.masks)
    t = torch.from_numpy(np.ascontiguousarray(resized_rgb.transpose(2, 0, 1)))  # (H', W', 3) -> (3, H', W')
    model = predictor.model
    with torch.inference_mode():
        det = model.predict([t], paste_masks=False)[0]
        paste = {"mask_paste": model.mask_paste} if hasattr(model, "mask_paste") else {}  # as Predictor pastes
        det = rescale_detections(det, resized_rgb.shape[:2], image_rgb.shape[:2], model.mask_threshold, **paste)
    return Dets(det.boxes.float().numpy(), det.scores.float().numpy(), det.labels.numpy().astype(np.int64),
                None if det.masks is None else det.masks.numpy().astype(bool))


# ----------------------------------------------------------------------------- comparison
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of xyxy boxes (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def match(a: Dets, b: Dets) -> list[tuple[int, int]]:
    """One-to-one pairs (i in a, j in b): greedily in a's score order, same label, IoU >= 0.99,
    the closest score among the candidates left."""
    if len(a.boxes) == 0 or len(b.boxes) == 0:
        return []
    iou = _box_iou(a.boxes, b.boxes)
    ok = (iou >= MATCH_IOU) & (a.labels[:, None] == b.labels[None, :])
    taken = np.zeros(len(b.boxes), bool)
    pairs = []
    for i in np.argsort(-a.scores, kind="stable"):
        cand = ok[i] & ~taken
        if cand.any():
            gap = np.where(cand, np.abs(b.scores - a.scores[i]), np.inf)
            j = int(gap.argmin())
            taken[j] = True
            pairs.append((int(i), j))
    return pairs


@dataclass
class Tally:
    """Running figures for one (model, mode) over images."""

    n_d2: int = 0
    n_dk: int = 0
    d2_matched: int = 0
    dk_matched: int = 0
    box_ious: list[float] = field(default_factory=list)
    score_diffs: list[float] = field(default_factory=list)
    mask_ious: list[float] = field(default_factory=list)
    resize_note: str = ""
    unmatched: list[str] = field(default_factory=list)
    threshold_flips: int = 0
    worst_mask: str = ""

    def add(self, d2: Dets, dk: Dets) -> None:
        self.n_d2 += len(d2.boxes)
        self.n_dk += len(dk.boxes)
        pairs = match(d2, dk)
        back = match(dk, d2)
        self.d2_matched += len(pairs)
        self.dk_matched += len(back)
        for side, dets, used in (("d2", d2, {i for i, _ in pairs}), ("dk", dk, {i for i, _ in back})):
            other = dk if side == "d2" else d2
            for i in sorted(set(range(len(dets.boxes))) - used):
                self.threshold_flips += int(abs(float(dets.scores[i]) - SCORE_THRESH) < NEAR_THRESH)
                iou = _box_iou(dets.boxes[i : i + 1], other.boxes)[0] if len(other.boxes) else np.zeros(0)
                same = np.where(other.labels == dets.labels[i], iou, -1.0)
                j = int(same.argmax()) if len(same) else -1
                near = f"; nearest same-label box IoU {same[j]:.4f} score {other.scores[j]:.7f}" if j >= 0 else ""
                self.unmatched.append(
                    f"{side} only: label {dets.labels[i]} score {dets.scores[i]:.7f} box "
                    f"{np.round(dets.boxes[i], 1).tolist()} (of {len(dets.boxes)} on the image){near}")
        for i, j in pairs:
            self.box_ious.append(float(_box_iou(d2.boxes[i : i + 1], dk.boxes[j : j + 1])[0, 0]))
            self.score_diffs.append(abs(float(d2.scores[i]) - float(dk.scores[j])))
            if d2.masks is not None and dk.masks is not None:
                a, b = d2.masks[i], dk.masks[j]
                union = int((a | b).sum())
                iou = 1.0 if union == 0 else int((a & b).sum()) / union
                if not self.mask_ious or iou < min(self.mask_ious):
                    self.worst_mask = (f"worst mask IoU {iou:.4f}: {int(a.sum())} px (Detectron2) vs {int(b.sum())} px "
                                       f"(detkit), box {np.round(d2.boxes[i], 1).tolist()}, score {d2.scores[i]:.4f}")
                self.mask_ious.append(iou)

    def row(self) -> dict[str, str]:
        def frac(m: int, n: int) -> str:
            return "n/a" if n == 0 else f"{m / n:.4f}"

        def mean_min(v: list[float]) -> str:
            return "-" if not v else f"{np.mean(v):.4f}/{min(v):.4f}"

        return {
            "dets d2/dk": f"{self.n_d2}/{self.n_dk}",
            "dk->d2": frac(self.dk_matched, self.n_dk),
            "d2->dk": frac(self.d2_matched, self.n_d2),
            "box IoU mean/min": mean_min(self.box_ious),
            "max |dscore|": "-" if not self.score_diffs else f"{max(self.score_diffs):.1e}",
            "mask IoU mean/min": mean_min(self.mask_ious),
            "unmatched at thresh": str(self.threshold_flips),
        }

    def passed(self, with_masks: bool) -> bool:
        ok = self.n_d2 > 0 and self.dk_matched >= 0.99 * self.n_dk and self.d2_matched >= 0.99 * self.n_d2
        return ok and (not with_masks or (bool(self.mask_ious) and min(self.mask_ious) >= 0.98))


# ----------------------------------------------------------------------------- stage diagnostics
@torch.no_grad()
def compare_stages(d2_model: nn.Module, dk_model: nn.Module, resized_bgr: np.ndarray) -> list[str]:
    """Normalized input, FPN features and proposals of both models on the same resized image."""
    lines = []
    t = torch.from_numpy(np.ascontiguousarray(resized_bgr.transpose(2, 0, 1)).astype(np.float32))
    images = d2_model.preprocess_image([{"image": t}])
    f2 = d2_model.backbone(images.tensor)
    rgb = torch.from_numpy(np.ascontiguousarray(resized_bgr[:, :, ::-1].transpose(2, 0, 1)))
    x, sizes = dk_model.preprocess([rgb])
    if tuple(x.shape) != tuple(images.tensor.shape):
        lines.append(f"input: padded shapes differ: d2 {tuple(images.tensor.shape)} vs detkit {tuple(x.shape)}")
    else:
        lines.append(f"input: max |diff| {float((x - images.tensor).abs().max()):.2e}")
    fk = dk_model.backbone(x)
    for k in sorted(f2):
        if k not in fk:
            lines.append(f"features {k}: missing in detkit (has {sorted(fk)})")
            continue
        a, b = f2[k], fk[k]
        if a.shape != b.shape:
            lines.append(f"features {k}: shape d2 {tuple(a.shape)} vs detkit {tuple(b.shape)}")
            continue
        lines.append(f"features {k}: max |diff| {float((a - b).abs().max()):.2e} (max |d2| {float(a.abs().max()):.2e})")
    p2 = d2_model.proposal_generator(images, f2)[0][0]
    pk = dk_model.rpn(sizes, fk, None)[0][0]
    a = Dets(p2.proposal_boxes.tensor.numpy(), torch.sigmoid(p2.objectness_logits).numpy(),
             np.zeros(len(p2), np.int64), None)
    b = Dets(pk.boxes.float().numpy(), torch.sigmoid(pk.objectness.float()).numpy(), np.zeros(len(pk), np.int64), None)
    m = match(a, b)
    top = min(100, len(p2), len(pk))
    same_top = int(np.all(np.abs(a.boxes[:top] - b.boxes[:top]) < 1e-2, axis=1).sum()) if top else 0
    lines.append(f"proposals: d2 {len(p2)} detkit {len(pk)}; d2 matched at IoU>=0.99: {len(m)}; "
                 f"first {top} equal (1e-2 px): {same_top}")
    return lines


# ----------------------------------------------------------------------------- main
def _images(n: int) -> list[Path]:
    files = sorted(COCO128.glob("*.jpg"))
    if len(files) < n:
        raise SystemExit(f"need {n} images in {COCO128}, found {len(files)}")
    return files[:n]


def run_model(name: str, args: argparse.Namespace, workdir: Path, images: list[Path]) -> tuple[dict[str, Tally], list[str]]:
    import detkit

    seed = args.seed + MODELS.index(name)  # each model its own random weights
    d2, cfg = build_d2(name, seed)
    calib = [d2_resize(cfg, cv2.imread(str(p), cv2.IMREAD_COLOR)) for p in images]
    info = calibrate_d2(d2, calib, seed)
    pkl = workdir / f"{name}.pkl"
    n_arrays, n_legacy = write_zoo_pkl(d2, cfg, pkl, not args.no_legacy_buffers)
    notes = [f"{name}: {info['frozen_bn']} FrozenBN calibrated; calibration detections "
             f"{info['calibration_detections']}; {n_arrays} arrays in {pkl.name}"]
    config = ROOT / "configs" / "detectron2" / f"{name}.yaml"
    pred = detkit.Predictor(config, weights=pkl, precision="fp32", optimize=not args.plain, fold_bn=not args.plain)
    from detkit.models.build import build_detector

    report = detkit.load_weights(build_detector(pred.cfg, len(pred.class_names)), pkl)  # what the Predictor loaded
    notes += ["  detkit load report: " + line.strip() for line in report.summary().splitlines()]
    notes.append(f"  {n_arrays - len(report.loaded)} arrays of the file not loaded into model tensors "
                 f"(legacy buffers in the file: {n_legacy})")
    tallies = {"own": Tally(), "same": Tally()}
    if args.resize_control:
        tallies["d2-on-dk-pixels"] = Tally()
    for k, path in enumerate(images):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        resized_bgr = d2_resize(cfg, bgr)
        resized_rgb = np.ascontiguousarray(resized_bgr[:, :, ::-1])
        ref = d2_predict(d2, resized_bgr, bgr.shape[:2])
        tallies["own"].add(ref, detkit_predict(pred, rgb))
        tallies["same"].add(ref, detkit_predict(pred, rgb, resized_rgb))
        dk_resized = pred.transform(rgb).image
        if args.resize_control and dk_resized.shape == resized_rgb.shape:  # Detectron2 on detkit's pixels
            tallies["d2-on-dk-pixels"].add(ref, d2_predict(d2, np.ascontiguousarray(dk_resized[:, :, ::-1]), bgr.shape[:2]))
        if dk_resized.shape != resized_rgb.shape:
            tallies["own"].resize_note += f" {path.name}: d2 {resized_rgb.shape[:2]} dk {dk_resized.shape[:2]};"
        else:
            diff = np.abs(dk_resized.astype(np.int16) - resized_rgb.astype(np.int16))
            notes.append(f"  {path.name} {bgr.shape[:2]} -> {resized_rgb.shape[:2]}: detkit vs Detectron2 resized "
                         f"pixels: max |diff| {int(diff.max())}, {float((diff > 0).mean()):.1%} differ")
        if args.stages and k == 0:
            plain = detkit.Predictor(config, weights=pkl, precision="fp32", optimize=False, fold_bn=False)
            notes += ["  " + s for s in compare_stages(d2, plain.model, resized_bgr)]
    return tallies, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="NAME",
                    help=f"subset of {', '.join(MODELS)}")
    ap.add_argument("--images", type=int, default=4, help="number of coco128 images (sorted by name)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; the i-th of the ten models (in the default order) uses seed + i")
    ap.add_argument("--stages", action="store_true", help="also compare input / features / proposals on image 1")
    ap.add_argument("--resize-control", action="store_true",
                    help="also run Detectron2 on detkit's resized pixels (mode d2-on-dk-pixels): how much the "
                    "resize alone moves Detectron2's own detections under these random weights")
    ap.add_argument("--plain", action="store_true", help="detkit Predictor without optimize_for_inference / BN folding")
    ap.add_argument("--no-legacy-buffers", action="store_true",
                    help="leave pixel_mean / pixel_std / cell_anchors out of the .pkl")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the .pkl files here (default: a temp folder)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import detectron2

    start = time.perf_counter()
    images = _images(args.images)
    try:
        from detkit.machine import machine_info

        mi = machine_info()
        print(f"machine: {mi.cpu_summary()}, {mi.threads} torch threads; python {mi.python}, torch {mi.torch}, "
              f"torchvision {mi.torchvision}; detectron2 {detectron2.__version__}")
    except ImportError:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; detectron2 {detectron2.__version__}")
    print(f"images: {', '.join(p.name for p in images)} ({COCO128}); the same images calibrate the weights")
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="parity_d2_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            t0 = time.perf_counter()
            try:
                tallies, model_notes = run_model(name, args, workdir, images)
            except Exception as e:  # one model failing must not hide the others' figures
                rows.append({"model": name, "mode": "-", "result": f"ERROR {type(e).__name__}: {e}"[:300]})
                print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
                continue
            secs = time.perf_counter() - t0
            notes += model_notes
            for mode, t in tallies.items():
                row = {"model": name, "mode": mode, **t.row(),
                       "result": "PASS" if t.passed(has_masks(name)) else "FAIL", "time": f"{secs:.0f}s"}
                rows.append(row)
                print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                if t.resize_note:
                    notes.append(f"  {name} resize sizes differ:{t.resize_note}")
                notes += [f"  {name} {mode}: {u}" for u in t.unmatched[:10]]
                if t.worst_mask:
                    notes.append(f"  {name} {mode}: {t.worst_mask}")
    print()
    print("\n".join(notes))
    print()
    cols = ["model", "mode", "dets d2/dk", "dk->d2", "d2->dk", "box IoU mean/min", "max |dscore|",
            "mask IoU mean/min", "unmatched at thresh", "result", "time"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print(f"\ntotal time {time.perf_counter() - start:.0f}s; matched: same label and box IoU >= {MATCH_IOU}; "
          "own = each side resizes, same = detkit gets Detectron2's resized pixels; unmatched at thresh: unmatched "
          f"detections (either side) scoring within {NEAR_THRESH} of the {SCORE_THRESH} score threshold")


if __name__ == "__main__":
    main()
