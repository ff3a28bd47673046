"""detkit vs torchvision's own Faster / Mask R-CNN R50-FPN (v1) with the same random weights.

torchvision's model is built with ``weights=None``, its weights are randomized reproducibly so that
detections appear (BN statistics in sane ranges, a centered classifier with a biased background,
spread-out RPN objectness), its state dict is loaded into detkit (configs/torchvision/*.yaml) through
``detkit.load_weights``, and both run on the same images, already at test size (torchvision's
transform then leaves them unchanged). Every torchvision detection must have a detkit detection
with label - 1, box IoU >= 0.99, |score diff| <= 1e-3 and (Mask R-CNN) mask IoU >= 0.98, and the
counts must agree.

Cases: two synthetic images of different widths in one batch (short side 320), one real COCO128 image
at torchvision's test size (short side 800), and two more real COCO128 images, a landscape and a
portrait one, in one batch at short side 320.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

import detkit
from detkit.config import load_config
from detkit.models.build import build_detector
from detkit.structures import Detections
from shared_data import coco128_root, require_coco128
from torchvision_reference import randomize_for_detections, synthetic_image

ROOT = Path(__file__).resolve().parents[1]
COCO128 = coco128_root() / "images"
BUILDERS = {
    "faster": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "mask": torchvision.models.detection.maskrcnn_resnet50_fpn,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module", params=["faster", "mask"])
def models(request):
    arch = request.param
    torch.manual_seed(0)
    tv = BUILDERS[arch](weights=None, weights_backbone=None).eval()
    randomize_for_detections(tv, seed=0)
    cfg = load_config(ROOT / f"configs/torchvision/{arch}_rcnn_R_50_FPN.yaml")
    dk = build_detector(cfg, num_classes=90).eval()
    report = detkit.load_weights(dk, tv.state_dict())
    assert not report.missing and not report.mismatched and not report.unexpected, report.summary()
    return arch, tv, dk


def _run(tv: nn.Module, dk: nn.Module, images: list[torch.Tensor]) -> tuple[list[dict], list[Detections]]:
    short = {min(im.shape[1:]) for im in images}
    assert len(short) == 1, "images of one batch must share the short side (no resizing in torchvision)"
    tv.transform.min_size = (short.pop(),)
    tv.transform.max_size = max(max(im.shape[1:]) for im in images)
    with torch.no_grad():
        ref = tv([im.float() / 255 for im in images])
        out = dk.predict(images)
    return ref, out


def _compare(ref: dict, det: Detections, with_masks: bool) -> dict[str, float]:
    """Greedy one-to-one matching in torchvision's score order; asserts the tolerances."""
    n_ref = len(ref["boxes"])
    assert len(det) == n_ref, f"detkit {len(det)} vs torchvision {n_ref} detections"
    iou = box_iou(ref["boxes"], det.boxes)  # (n_ref, n_det)
    same_label = (det.labels[None, :] + 1) == ref["labels"][:, None]
    iou = torch.where(same_label, iou, torch.full_like(iou, -1.0))
    taken = torch.zeros(len(det), dtype=torch.bool)
    worst = {"box_iou_min": 1.0, "score_diff_max": 0.0, "mask_iou_min": 1.0}
    if n_ref == 0:
        return worst
    for i in range(n_ref):
        cand = iou[i].masked_fill(taken, -1.0)
        # among near-identical boxes of one class prefer the closest score
        score_gap = (det.scores - ref["scores"][i]).abs()
        ok = cand >= 0.99
        assert ok.any(), f"torchvision detection {i} (label {int(ref['labels'][i])}) has no detkit match"
        j = int(torch.where(ok, score_gap, torch.full_like(score_gap, float("inf"))).argmin())
        taken[j] = True
        worst["box_iou_min"] = min(worst["box_iou_min"], float(iou[i, j]))
        worst["score_diff_max"] = max(worst["score_diff_max"], float(score_gap[j]))
        if with_masks:
            a, b = ref["masks"][i, 0] > 0.5, det.masks[j]
            union = int((a | b).sum())
            m_iou = 1.0 if union == 0 else int((a & b).sum()) / union
            worst["mask_iou_min"] = min(worst["mask_iou_min"], m_iou)
    assert worst["score_diff_max"] <= 1e-3, worst
    assert worst["mask_iou_min"] >= 0.98, worst
    return worst


def _check(models, images: list[torch.Tensor], tag: str) -> None:
    arch, tv, dk = models
    ref, out = _run(tv, dk, images)
    assert sum(len(r["boxes"]) for r in ref) > 0, "the randomized model should produce detections"
    for k, (r, d, im) in enumerate(zip(ref, out, images)):
        assert d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64
        if arch == "mask":
            assert d.masks is not None and d.masks.dtype == torch.bool
            assert tuple(d.masks.shape) == (len(d), *im.shape[1:])
        else:
            assert d.masks is None
        worst = _compare(r, d, with_masks=arch == "mask")
        print(f"[parity {arch} {tag} image {k} {tuple(im.shape[1:])}] detections={len(d)} "
              f"labels={len(set(d.labels.tolist()))} " + " ".join(f"{a}={b:.3g}" if "score" in a else f"{a}={b:.6f}" for a, b in worst.items()))


def test_parity_synthetic_small(models) -> None:
    # two images of different sizes in one batch: exercises padding and per-image clipping
    _check(models, [synthetic_image(320, 416, seed=1), synthetic_image(320, 352, seed=2)], "synthetic")


def _coco128_images(indices: list[int], short: int, max_long: int = 1333) -> list[torch.Tensor]:
    """COCO128 images (by index in name order) resized to short side ``short`` (long side <= ``max_long``);
    skips the test when the images are not there."""
    require_coco128("images")
    import cv2

    names = sorted(os.listdir(COCO128))
    images = []
    for i in indices:
        bgr = cv2.imread(str(COCO128 / names[i]), cv2.IMREAD_COLOR)
        h, w = bgr.shape[:2]
        s = min(short / min(h, w), max_long / max(h, w))
        rgb = cv2.cvtColor(cv2.resize(bgr, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        images.append(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))
    return images


def test_parity_coco128_at_test_size(models) -> None:
    """A real COCO image at torchvision's test size (short side 800, long side <= 1333), the size the
    tolerances are stated for (about 10-20 s per model on one thread)."""
    (im,) = _coco128_images([0], 800)
    _check(models, [im], "coco128-800")


def test_parity_coco128_landscape_and_portrait_batch(models) -> None:
    """Two more real images, a landscape and a portrait one, in one batch at short side 320: padding
    along both sides and per-image clipping on real content."""
    images = _coco128_images([2, 4], 320)
    (h0, w0), (h1, w1) = (im.shape[1:] for im in images)
    assert h0 < w0 and h1 > w1, "expected a landscape then a portrait image"
    _check(models, images, "coco128-320")
