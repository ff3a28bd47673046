"""detkit vs torchvision's own Faster / Mask R-CNN R50-FPN v2 with the same random weights.

torchvision's ``fasterrcnn_resnet50_fpn_v2`` / ``maskrcnn_resnet50_fpn_v2`` is built with ``weights=None``
and randomized reproducibly so that it detects things: every BatchNorm (backbone, FPN, box head, mask head)
gets non-trivial statistics (running mean != 0, running var != 1), the RPN convs keep the feature scale,
the classifier reads how RoIs differ (not what a whole image shares) and its background bias is calibrated
on the test images so that a few dozen detections of several classes appear. Its state dict goes through
``detkit.load_weights`` into the model of ``configs/torchvision/*_v2.yaml``; the load must consume every
tensor and leave nothing at its random initialization. Both then run on the same images, already at test
size (torchvision's transform leaves them unchanged): every torchvision detection needs a detkit detection
with label - 1, box IoU >= 0.99, |score diff| <= 1e-3 and (Mask R-CNN) mask IoU >= 0.98; the counts agree.

Cases: two synthetic images of different widths in one batch (short side 320) and one real COCO128 image
at torchvision's test size (short side 800) with torchvision's test settings; the synthetic batch keeps
300 proposals per image (both models) to stay cheap. Plus the legacy key layout, and the bad input: a v1 file into a v2 config and a v2 file
into a v1 config fail in one line that names the tensors that do not fit.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

import detkit
from detkit.checkpoint import CheckpointError, load_initial_weights
from detkit.checkpoint.torchvision import convert_torchvision_detection
from detkit.config import load_config
from detkit.layers import FrozenBatchNorm2d
from detkit.models.build import build_detector
from detkit.structures import Detections
from shared_data import coco128_root, require_coco128

ROOT = Path(__file__).resolve().parents[1]
COCO128 = coco128_root() / "images"
TVD = torchvision.models.detection
V2_BUILDERS = {"faster": TVD.fasterrcnn_resnet50_fpn_v2, "mask": TVD.maskrcnn_resnet50_fpn_v2}
V1_BUILDERS = {"faster": TVD.fasterrcnn_resnet50_fpn, "mask": TVD.maskrcnn_resnet50_fpn}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# RPN proposals per image in the synthetic case (torchvision's default 1000 in the real-image case): the
# 4conv1fc box head costs about 0.2 GFLOP per RoI, most of a v2 forward pass
SYNTHETIC_PROPOSALS = 300


def _config(arch: str, version: str):
    suffix = "_v2" if version == "v2" else ""
    return load_config(ROOT / f"configs/torchvision/{arch}_rcnn_R_50_FPN{suffix}.yaml")


def _noise_image(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 [3, h, w]: blurred noise under a few solid boxes, so features have edges and regions."""
    g = torch.Generator().manual_seed(seed)
    img = nn.functional.avg_pool2d(torch.rand(1, 3, h, w, generator=g) * 255, 7, 1, 3)[0]
    for _ in range(5):
        bh = int(torch.randint(32, h // 2, (1,), generator=g))
        bw = int(torch.randint(32, w // 2, (1,), generator=g))
        y = int(torch.randint(0, h - bh, (1,), generator=g))
        x = int(torch.randint(0, w - bw, (1,), generator=g))
        img[:, y : y + bh, x : x + bw] = torch.rand(3, 1, 1, generator=g) * 255
    return img.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def _randomize_v2(model: nn.Module, seed: int, calibration: list[tuple[list[torch.Tensor], int]]) -> None:
    """Reproducible random weights under which torchvision's v2 model gives varied detections on images
    like ``calibration``: (batch of uint8 [3, H, W] sharing a short side, RPN proposals per image) pairs,
    each batch run at its own size with that many proposals."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # eval mode: FrozenBN (eps 1e-5) with these statistics
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    rpn = model.rpn.head
    for block in rpn.conv:  # Conv2dNormActivation(conv, ReLU): He init keeps the scale through both convs
        conv = block[0]
        conv.weight.normal_(0, math.sqrt(2.0 / (conv.in_channels * 9)), generator=g)
        conv.bias.normal_(0, 0.01, generator=g)
    rpn.cls_logits.weight.normal_(0, 0.02, generator=g)  # spread objectness: no near-ties in top-k
    rpn.cls_logits.bias.normal_(0, 0.5, generator=g)
    rpn.bbox_pred.weight.normal_(0, 0.005, generator=g)
    (fc,) = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Linear)]
    fc.weight.normal_(0, math.sqrt(2.0 / fc.in_features), generator=g)
    fc.bias.normal_(0, 0.01, generator=g)
    pred = model.roi_heads.box_predictor
    pred.bbox_pred.weight.normal_(0, 0.002, generator=g)
    # The classifier reads the main directions in which RoIs of one batch differ (the top principal
    # components of the box features, half-whitened, mixed at random per class), and nothing of each
    # calibration batch's mean feature: the class depends on the RoI, and no class wins everywhere.
    # The background logit is a constant, set so that about 40 (RoI, class) pairs of each calibration
    # batch score above the 0.05 threshold (more on batches with stronger RoIs).
    feats: list[torch.Tensor] = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.append(o))
    model.eval()
    default_proposals = model.rpn._post_nms_top_n["testing"]
    for batch, proposals in calibration:
        model.transform.min_size = (min(batch[0].shape[1:]),)
        model.transform.max_size = max(max(im.shape[1:]) for im in batch)
        model.rpn._post_nms_top_n["testing"] = proposals
        model([im.float() / 255 for im in batch])
    model.rpn._post_nms_top_n["testing"] = default_proposals
    hook.remove()
    centered = torch.cat([f - f.mean(0) for f in feats])  # (R, 1024)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    k = 16
    # (k, 1024): half-whitened components (a component's std s becomes sqrt(s)), big ones still count more
    mix = v[:k] / (s[:k, None] / math.sqrt(centered.shape[0])).sqrt()
    w = pred.cls_score.weight
    w.zero_()
    w[1:] = torch.randn(w.shape[0] - 1, k, generator=g) @ mix
    w *= 2.0 / float((centered @ w[1:].T).std())
    basis: list[torch.Tensor] = []
    for f in feats:  # Gram-Schmidt on the per-batch means, then project them out of every class row
        m = f.mean(0)
        for u in basis:
            m = m - (m @ u) * u
        basis.append(m / m.norm())
    for u in basis:
        w -= (w @ u)[:, None] * u[None, :]
    pred.cls_score.bias.normal_(0, 0.5, generator=g)
    # per batch, the 40th largest (RoI, class) foreground logit; the batch with the weakest RoIs decides
    kth = [float((f @ w[1:].T + pred.cls_score.bias[1:]).flatten().topk(40).values[-1]) for f in feats]
    pred.cls_score.bias[0] = min(kth) + math.log(19.0)


def _coco128_image(short: int = 800, max_long: int = 1333) -> torch.Tensor | None:
    """The first COCO128 image (RGB uint8 [3, H, W]) at torchvision's test size, or None if absent."""
    if not COCO128.is_dir():
        return None
    import cv2

    bgr = cv2.imread(str(COCO128 / sorted(os.listdir(COCO128))[0]), cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    s = min(short / min(h, w), max_long / max(h, w))
    bgr = cv2.resize(bgr, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1])).permute(2, 0, 1)


def _synthetic_batch() -> list[torch.Tensor]:
    return [_noise_image(320, 416, seed=1), _noise_image(320, 352, seed=2)]


@pytest.fixture(scope="module")
def v2_mask_weights() -> dict[str, torch.Tensor]:
    """Randomized ``maskrcnn_resnet50_fpn_v2`` weights; without ``roi_heads.mask_*`` they are the Faster
    R-CNN v2 weights too (one calibration for both)."""
    torch.manual_seed(0)
    tv = V2_BUILDERS["mask"](weights=None, weights_backbone=None).eval()
    # calibrate on the synthetic test batch (as tested: 300 proposals) and (when there) the COCO image at
    # half its test size
    calibration = [(_synthetic_batch(), SYNTHETIC_PROPOSALS)]
    calibration += [([im], 1000) for im in [_coco128_image(400)] if im is not None]
    _randomize_v2(tv, seed=0, calibration=calibration)
    return tv.state_dict()


@pytest.fixture(scope="module", params=["faster", "mask"])
def v2_models(request, v2_mask_weights):
    arch = request.param
    tv = V2_BUILDERS[arch](weights=None, weights_backbone=None).eval()
    sd = {k: v for k, v in v2_mask_weights.items() if arch == "mask" or not k.startswith("roi_heads.mask_")}
    tv.load_state_dict(sd)  # strict: the Faster R-CNN v2 model has exactly these keys
    dk = build_detector(_config(arch, "v2"), num_classes=90).eval()
    report = detkit.load_weights(dk, tv.state_dict())
    return arch, tv, dk, report


def test_v2_load_consumes_every_tensor(v2_models) -> None:
    """Every torchvision tensor lands in detkit with its value (nothing left random, nothing dropped),
    BN statistics of the FPN and the heads included; every norm uses eps 1e-5."""
    arch, tv, dk, report = v2_models
    assert report.source_format == "torchvision detection v2"
    assert not (report.missing or report.mismatched or report.unexpected or report.dropped), report.summary()
    tv_sd = tv.state_dict()
    converted = convert_torchvision_detection(tv_sd)
    dk_sd = dk.state_dict()
    assert set(report.loaded) == set(dk_sd)
    # every torchvision tensor was used; the only ones without a detkit home are the step counters of
    # the BNs detkit freezes (stem and res2, freeze_at=2)
    unused = sorted(set(converted) - set(report.loaded))
    assert unused and all(k.endswith("num_batches_tracked") and (".stem." in k or ".res2." in k) for k in unused), unused
    for k in report.loaded:
        assert torch.equal(dk_sd[k], converted[k]), k
    n_bn = {"faster": 53 + 8 + 4, "mask": 53 + 8 + 4 + 4}[arch]  # ResNet-50, FPN, box head, mask head
    bn_stats = [k for k in report.loaded if k.endswith("running_var")]
    assert len(bn_stats) == n_bn, len(bn_stats)
    assert all(not torch.equal(dk_sd[k], torch.ones_like(dk_sd[k])) for k in bn_stats)
    norms = [m for m in dk.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == n_bn and {m.eps for m in norms} == {1e-5}
    # the parts that make it v2: FPN convs without bias, a two-conv RPN head, a 4conv1fc box head
    assert all(b.conv.bias is None for b in [*dk.backbone.fpn.lateral_convs, *dk.backbone.fpn.output_convs])
    assert len(dk.rpn.head.convs) == 2
    assert len(dk.roi_heads.box_head.convs) == 4 and len(dk.roi_heads.box_head.fcs) == 1


def _run(tv: nn.Module, dk: nn.Module, images: list[torch.Tensor], proposals: int) -> tuple[list[dict], list[Detections]]:
    """Both models on ``images`` (one short side), each keeping ``proposals`` RPN proposals per image."""
    short = {min(im.shape[1:]) for im in images}
    assert len(short) == 1, "images of one batch must share the short side (no resizing in torchvision)"
    tv.transform.min_size = (short.pop(),)
    tv.transform.max_size = max(max(im.shape[1:]) for im in images)
    tv_default, dk_default = tv.rpn._post_nms_top_n["testing"], dk.rpn.post_nms_topk
    tv.rpn._post_nms_top_n["testing"], dk.rpn.post_nms_topk = proposals, (dk_default[0], proposals)
    try:
        with torch.no_grad():
            ref = tv([im.float() / 255 for im in images])
            out = dk.predict(images)
    finally:
        tv.rpn._post_nms_top_n["testing"], dk.rpn.post_nms_topk = tv_default, dk_default
    return ref, out


def _match(ref: dict, det: Detections, with_masks: bool) -> dict[str, float]:
    """Pair each torchvision detection (score order) with an unused detkit one of label - 1 and box IoU
    >= 0.99 (the closest score among them); assert the tolerances and return the worst figures."""
    n = len(ref["boxes"])
    assert len(det) == n, f"detkit has {len(det)} detections, torchvision {n}"
    worst = {"box_iou_min": 1.0, "score_diff_max": 0.0, "mask_iou_min": 1.0}
    if n == 0:
        return worst
    iou = box_iou(ref["boxes"], det.boxes)
    iou[(det.labels[None, :] + 1) != ref["labels"][:, None]] = -1.0
    used = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        gap = (det.scores - ref["scores"][i]).abs()
        ok = (iou[i] >= 0.99) & ~used
        assert ok.any(), f"torchvision detection {i} (label {int(ref['labels'][i])}) has no detkit counterpart"
        j = int(torch.where(ok, gap, torch.full_like(gap, math.inf)).argmin())
        used[j] = True
        worst["box_iou_min"] = min(worst["box_iou_min"], float(iou[i, j]))
        worst["score_diff_max"] = max(worst["score_diff_max"], float(gap[j]))
        if with_masks:
            a, b = ref["masks"][i, 0] > 0.5, det.masks[j]
            union = int((a | b).sum())
            worst["mask_iou_min"] = min(worst["mask_iou_min"], 1.0 if union == 0 else int((a & b).sum()) / union)
    assert worst["score_diff_max"] <= 1e-3, worst
    assert worst["mask_iou_min"] >= 0.98, worst
    return worst


def _untied_proposal_count(dk: nn.Module, images: list[torch.Tensor], wanted: int, gap: float = 1e-4) -> int:
    """The largest proposal count <= ``wanted`` whose cutoff is no float-rounding tie in any image.

    Random weights give thousands of proposals with nearly equal objectness; where the ``wanted``-th and
    the next differ by ~1e-5, the rounding of another CPU's kernels (AVX2 against AVX-512) decides which
    one either model keeps, and that one proposal becomes a detection of its own. Cutting where the
    sorted objectness logits (after NMS, as kept) step by more than ``gap`` keeps that noise out of a
    comparison meant to catch real differences.
    """
    default = dk.rpn.post_nms_topk
    dk.rpn.post_nms_topk = (default[0], 2 * wanted)
    try:
        with torch.no_grad():
            x, sizes = dk.preprocess(images)
            proposals, _ = dk.rpn(sizes, dk.backbone(x), None)
    finally:
        dk.rpn.post_nms_topk = default
    scores = [p.objectness.sort(descending=True).values for p in proposals]
    for k in range(wanted, wanted // 2, -1):
        if all(len(v) <= k or float(v[k - 1] - v[k]) > gap for v in scores):
            return k
    return wanted


def _check(v2_models, images: list[torch.Tensor], tag: str, proposals: int = 1000) -> None:
    arch, tv, dk, _ = v2_models
    proposals = _untied_proposal_count(dk, images, proposals)
    ref, out = _run(tv, dk, images, proposals)
    counts = [len(r["boxes"]) for r in ref]
    assert sum(counts) > 0, "the randomized model should produce detections"
    for k, (r, d, im) in enumerate(zip(ref, out, images)):
        if arch == "mask":
            assert d.masks is not None and tuple(d.masks.shape) == (len(d), *im.shape[1:])
        worst = _match(r, d, with_masks=arch == "mask")
        print(f"[v2 parity {arch} {tag} image {k} {tuple(im.shape[1:])}] detections={len(d)} "
              f"classes={len(set(d.labels.tolist()))} "
              + " ".join(f"{a}={b:.3g}" if "score" in a else f"{a}={b:.6f}" for a, b in worst.items()))


def test_v2_parity_synthetic(v2_models) -> None:
    """Two widths in one batch: padding and per-image clipping (both models with SYNTHETIC_PROPOSALS)."""
    _check(v2_models, _synthetic_batch(), "synthetic", proposals=SYNTHETIC_PROPOSALS)


def test_v2_parity_coco128_at_test_size(v2_models) -> None:
    """A real COCO image at torchvision's test size (short side 800, long side <= 1333) and settings."""
    rgb = _coco128_image()
    if rgb is None:
        require_coco128("images")
    _check(v2_models, [rgb], "coco128-800")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", ["faster", "mask"])
@pytest.mark.parametrize("file_version,config_version", [("v1", "v2"), ("v2", "v1")])
def test_other_generation_is_refused_in_one_line(tmp_path, arch, file_version, config_version) -> None:
    """A v1 file into a v2 config (or the other way round) is refused, for inference, in one line that
    names the file and the tensors that do not fit (the FPN norms and conv biases, the box head's fc)."""
    builders = V1_BUILDERS if file_version == "v1" else V2_BUILDERS
    path = tmp_path / f"{arch}rcnn_{file_version}.pth"
    torch.save(builders[arch](weights=None, weights_backbone=None).state_dict(), path)
    cfg = _config(arch, config_version)
    model = build_detector(cfg, num_classes=90)
    with pytest.raises(CheckpointError) as info:
        load_initial_weights(model, cfg, str(path), training=False)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    # v2 has FPN norms and no FPN conv bias; v1 has a second box fc
    v2_only, v1_only = "backbone.fpn.lateral_convs.0.norm.weight", "backbone.fpn.lateral_convs.0.conv.bias"
    assert v2_only in msg and v1_only in msg, msg
    assert ("missing" in msg) and ("unknown" in msg or "unexpected" in msg), msg
    # the message says which generation the file is
    assert f"(torchvision detection{' v2' if file_version == 'v2' else ''})" in msg, msg
    # fine-tuning does not excuse it either: these are not class layers
    cfg.model.num_classes = 3
    with pytest.raises(CheckpointError):
        load_initial_weights(build_detector(cfg, num_classes=3), cfg, str(path), training=True)


def test_predictor_refuses_v1_file_for_v2_config(tmp_path) -> None:
    """``Predictor(v2 config, weights=v1 file)`` gives the same one-line refusal, naming its argument."""
    path = tmp_path / "fasterrcnn_v1.pth"
    torch.save(V1_BUILDERS["faster"](weights=None, weights_backbone=None).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        detkit.Predictor(ROOT / "configs/torchvision/faster_rcnn_R_50_FPN_v2.yaml", weights=str(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Predictor(weights=...)") and str(path) in msg, msg
    assert "backbone.fpn.lateral_convs.0.norm.weight" in msg, msg


# --------------------------------------------------------------------------- legacy key layouts
def _to_legacy_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite a torchvision Mask R-CNN state dict into the key layout of files saved before the
    ``_version = 2`` modules (FPN blocks, RPN conv, mask head convs without a Sequential level)."""
    out = {}
    for k, v in sd.items():
        for block in ("inner_blocks", "layer_blocks"):
            k = re.sub(rf"^backbone\.fpn\.{block}\.(\d+)\.0\.(weight|bias)$", rf"backbone.fpn.{block}.\1.\2", k)
        k = re.sub(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1", k)
        m = re.match(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", k)
        if m:
            k = f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
        out[k] = v
    return out


def test_legacy_key_layout_loads_like_the_current_one() -> None:
    """torchvision renames pre-version-2 keys when it loads them (the ``_load_from_state_dict`` hooks of
    FeaturePyramidNetwork, RPNHead and MaskRCNNHeads); detkit's converter gives the same weights."""
    torch.manual_seed(0)
    tv = V1_BUILDERS["mask"](weights=None, weights_backbone=None)
    current = tv.state_dict()
    legacy = _to_legacy_layout(current)
    renamed = set(legacy) - set(current)
    assert len(renamed) == 16 + 2 + 8, sorted(renamed)  # FPN 8 convs x (w, b), RPN conv (w, b), mask convs 4 x (w, b)
    # the reference: torchvision itself accepts the legacy layout (a plain dict has no version metadata)
    again = V1_BUILDERS["mask"](weights=None, weights_backbone=None)
    again.load_state_dict(legacy)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in current.items())
    cfg = _config("mask", "v1")
    a, b = build_detector(cfg, num_classes=90), build_detector(cfg, num_classes=90)
    ra, rb = detkit.load_weights(a, current), detkit.load_weights(b, legacy)
    for r in (ra, rb):
        assert not (r.missing or r.mismatched or r.unexpected or r.dropped), r.summary()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
