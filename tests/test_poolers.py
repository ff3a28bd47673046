"""MultiScaleRoIAlign: parity with torchvision's pooler and FPN level assignment."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision

from detkit.models.poolers import MultiScaleRoIAlign, assign_boxes_to_levels, convert_boxes_to_rois

STRIDES = (4, 8, 16, 32)
SCALES = [1.0 / s for s in STRIDES]


def _features(batch: int = 2, channels: int = 4, size: int = 256, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=g) for s in STRIDES]


def _random_boxes(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * (size - 8)
    wh = torch.rand(n, 2, generator=g) * (size - xy).clamp(min=2) + 1
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)


def test_level_assignment_hand_picked() -> None:
    # sqrt(area): 224 -> canonical level 4; 112 -> 3; 448 -> 5; tiny -> clamped to 2; huge -> clamped to 5
    boxes = torch.tensor(
        [
            [0.0, 0.0, 224.0, 224.0],
            [10.0, 10.0, 122.0, 122.0],
            [0.0, 0.0, 448.0, 448.0],
            [0.0, 0.0, 2.0, 2.0],
            [0.0, 0.0, 2000.0, 2000.0],
            [0.0, 0.0, 223.0, 223.0],  # just below 224 -> level 3
            [0.0, 0.0, 56.0, 56.0],  # 224/4 -> level 2
            [0.0, 0.0, 448.0, 112.0],  # sqrt(area) = 224 -> level 4
            [5.0, 5.0, 5.0, 9.0],  # zero area -> finest level
        ]
    )
    levels = assign_boxes_to_levels(boxes, min_level=2, max_level=5) + 2
    assert levels.tolist() == [4, 3, 5, 2, 5, 3, 2, 4, 2]
    # same as torchvision's LevelMapper
    mapper = torchvision.ops.poolers.LevelMapper(2, 5)
    assert torch.equal(levels - 2, mapper([boxes]))


def test_level_assignment_custom_canonical() -> None:
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 50.0, 50.0]])
    levels = assign_boxes_to_levels(boxes, 2, 6, canonical_box_size=100, canonical_level=5) + 2
    assert levels.tolist() == [5, 4]


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (0, False)])
def test_parity_with_torchvision(sampling_ratio: int, aligned: bool) -> None:
    size = 512
    feats = _features(size=size)
    g = torch.Generator().manual_seed(1)
    boxes = [_random_boxes(37, size, g), _random_boxes(23, size, g)]
    # make sure every level is hit: a few boxes of canonical-ish sizes
    boxes[0][:4] = torch.tensor([[0, 0, 20, 20], [0, 0, 100, 100], [10, 10, 200, 230], [0, 0, 500, 470.0]])
    ours = MultiScaleRoIAlign(7, SCALES, sampling_ratio, aligned)(feats, boxes)

    names = ["p2", "p3", "p4", "p5"]
    tv = torchvision.ops.MultiScaleRoIAlign(names, 7, sampling_ratio)
    ref = tv(OrderedDict(zip(names, feats)), boxes, [(size, size)] * 2)
    assert ours.shape == (60, 4, 7, 7)
    levels = assign_boxes_to_levels(torch.cat(boxes), 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}, "test boxes should cover all four levels"
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff}"


def test_aligned_matches_roi_align_on_assigned_level() -> None:
    feats = _features(batch=1)
    box = torch.tensor([[30.5, 40.25, 90.0, 120.0]])  # sqrt(area) ~ 69 -> level 2 (stride 4)
    ours = MultiScaleRoIAlign(5, SCALES, 0, aligned=True)(feats, [box])
    ref = torchvision.ops.roi_align(feats[0], [box], 5, 0.25, 0, aligned=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    not_aligned = MultiScaleRoIAlign(5, SCALES, 0, aligned=False)(feats, [box])
    assert (ours - not_aligned).abs().max() > 1e-3


def test_output_order_and_batch_index() -> None:
    # image 1's features are image 0's plus 100: pooled RoIs of image 1 must be ~100 larger
    f0 = _features(batch=1, seed=3)
    feats = [torch.cat([f, f + 100.0]) for f in f0]
    b = torch.tensor([[0.0, 0.0, 30.0, 30.0], [5.0, 5.0, 220.0, 200.0], [10.0, 10.0, 60.0, 90.0]])
    pooler = MultiScaleRoIAlign(7, SCALES, 2, False)
    out = pooler(feats, [b[:2], b])
    assert out.shape[0] == 5
    torch.testing.assert_close(out[2:] - 100.0, pooler(f0, [b])[:], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:2], pooler(f0, [b[:2]]), atol=0, rtol=0)
    rois = convert_boxes_to_rois([b[:2], b])
    assert rois[:, 0].tolist() == [0, 0, 1, 1, 1]


def test_empty_boxes_and_single_level() -> None:
    feats = _features()
    pooler = MultiScaleRoIAlign(7, SCALES, 2, True)
    empty = torch.zeros((0, 4))
    out = pooler(feats, [empty, empty])
    assert out.shape == (0, 4, 7, 7) and out.dtype == feats[0].dtype
    # one image empty, the other not
    out = pooler(feats, [empty, torch.tensor([[0.0, 0.0, 50.0, 50.0]])])
    assert out.shape == (1, 4, 7, 7)
    single = MultiScaleRoIAlign(7, [1 / 16], 2, True)
    box = torch.tensor([[0.0, 0.0, 600.0, 600.0]])
    ref = torchvision.ops.roi_align(feats[2][:1], [box], 7, 1 / 16, 2, aligned=True)
    torch.testing.assert_close(single([feats[2][:1]], [box]), ref, rtol=0, atol=1e-6)


def test_gradients_flow_to_features() -> None:
    feats = [f.requires_grad_() for f in _features(batch=1, size=512)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 500.0, 500.0]])]  # levels 2 and 5
    MultiScaleRoIAlign(7, SCALES, 2, True)(feats, boxes).sum().backward()
    assert feats[0].grad.abs().sum() > 0 and feats[3].grad.abs().sum() > 0
    assert feats[1].grad is None or feats[1].grad.abs().sum() == 0  # level 3 pools no box


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="not 1/2"):
        MultiScaleRoIAlign(7, [0.3], 2, True)
    with pytest.raises(ValueError, match="consecutive"):
        MultiScaleRoIAlign(7, [1 / 4, 1 / 16], 2, True)
    pooler = MultiScaleRoIAlign(7, SCALES, 2, True)
    with pytest.raises(ValueError, match="feature maps"):
        pooler(_features()[:3], [torch.zeros((0, 4))] * 2)


def _far_boxes(size: int, seed: int) -> torch.Tensor:
    """xyxy boxes with corners in [size/2, size) px, off the 4 px grid of bf16 there, on all four levels."""
    g = torch.Generator().manual_seed(seed)
    half = size // 2
    # sqrt(area) ~ 40, 150, 300, 480 px -> levels 2, 3, 4, 5 (sizes for size = 1024)
    hand = torch.tensor([[600.3, 700.7, 641.1, 739.9], [530.9, 610.1, 681.3, 759.7],
                         [513.7, 517.3, 813.3, 818.9], [518.1, 522.9, 1001.7, 1003.3]]) * (size / 1024)
    xy = half + torch.rand(40, 2, generator=g) * (half - 40)
    wh = 8 + torch.rand(40, 2, generator=g) * (size - xy - 8)
    return torch.cat([hand, torch.cat([xy, xy + wh], dim=1)])


@pytest.mark.parametrize("single_level", [False, True], ids=["four-levels", "one-level"])
def test_bf16_features_pool_with_fp32_boxes_without_autocast(single_level: bool) -> None:
    # detkit's CPU RoIAlign takes fp32 boxes; casting them to bf16 first would move 512-1024 px
    # coordinates by up to 2 px (bf16 steps are 4 px there)
    size = 1024
    boxes = _far_boxes(size, seed=5)
    assert (boxes.to(torch.bfloat16).float() - boxes).abs().max() >= 1.0, "boxes should not be bf16-exact"
    feats = [f.to(torch.bfloat16) for f in _features(batch=1, size=size, seed=4)]
    ref_feats = [f.float() for f in feats]  # the same values, in fp32
    assert not torch.is_autocast_enabled("cpu")
    if single_level:
        out = MultiScaleRoIAlign(7, [1 / 8], 0, aligned=True)([feats[1]], [boxes])
        ref = torchvision.ops.roi_align(ref_feats[1], [boxes], 7, 1 / 8, 0, aligned=True)
    else:
        out = MultiScaleRoIAlign(7, SCALES, 2, aligned=False)(feats, [boxes])
        names = ["p2", "p3", "p4", "p5"]
        tv = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)  # v1 (aligned=False), fp32 boxes
        ref = tv(OrderedDict(zip(names, ref_feats)), [boxes], [(size, size)])
        assert set(assign_boxes_to_levels(boxes, 2, 5).tolist()) == {0, 1, 2, 3}
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (len(boxes), 4, 7, 7)
    # fp32 pooling rounded once to bf16: within one bf16 step (2**-8 relative) of the reference
    torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-5)


def test_torchvision_path_still_gets_rois_in_the_features_dtype() -> None:
    # while tracing, roi_align hands over to torchvision's operator, which needs rois in the
    # features' dtype outside autocast: fp64 features with fp32 boxes must still work there
    feats = [f.double() for f in _features(batch=1, size=512, seed=6)]
    boxes = _far_boxes(512, seed=7)
    pooler = MultiScaleRoIAlign(7, SCALES, 2, aligned=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated; export still traces
        traced = torch.jit.trace(lambda fs, b: pooler(list(fs), [b]), (tuple(feats), boxes), check_trace=False)
    out = traced(tuple(feats), boxes)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, pooler(feats, [boxes]), rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.usefixtures("one_thread")  # conftest.py
def test_bf16_detector_without_autocast_pools_with_fp32_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole Faster R-CNN cast to bf16, run without autocast on a 512x640 image."""
    from detkit.config import DetectionConfig
    from detkit.models import poolers
    from detkit.models.build import build_detector

    cfg = DetectionConfig()
    m = cfg.model
    m.meta_architecture = "faster_rcnn"
    m.backbone.name, m.backbone.norm, m.backbone.freeze_at = "resnet18", "FrozenBN", 2
    m.fpn.out_channels = 32
    m.anchors.sizes = [[16], [32], [64], [128], [256]]
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 300, 100
    m.roi_heads.box_head.fc_dim = 64
    torch.manual_seed(0)
    fp32 = build_detector(cfg, num_classes=3).eval()
    pred = fp32.roi_heads.box_predictor  # a few confident detections from random weights
    pred.cls_score.weight.normal_(0, 0.2)
    pred.cls_score.bias.copy_(torch.tensor([1.5, 0.5, 0.0, -2.0]))
    pred.bbox_pred.weight.normal_(0, 0.01)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    img = torch.full((3, 512, 640), 90, dtype=torch.uint8)
    img[:, 100:300, 150:400] = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    img[:, 330:500, 420:630] = torch.tensor([40, 40, 200], dtype=torch.uint8)[:, None, None]
    ref = fp32.predict([img])[0]

    calls: list[tuple[torch.dtype, torch.dtype]] = []  # (features, rois) dtypes of each roi_align call
    real_roi_align = poolers.roi_align

    def spy(feature: torch.Tensor, rois: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append((feature.dtype, rois.dtype))
        return real_roi_align(feature, rois, *args)

    monkeypatch.setattr(poolers, "roi_align", spy)
    assert not torch.is_autocast_enabled("cpu")
    out = bf16.predict([img])[0]
    assert calls and all(c == (torch.bfloat16, torch.float32) for c in calls), calls
    assert out.boxes.dtype == torch.float32 and len(ref) > 0 and abs(len(out) - len(ref)) <= max(2, len(ref) // 10)
    # near-tie boxes of random weights can swap under bf16 rounding in NMS: the best fp32 detection
    # and most of the top 10 must have a bf16 twin (same label, score within 0.02, IoU > 0.98)
    iou = torchvision.ops.box_iou(ref.boxes[:10], out.boxes)  # (10, D)
    same = (ref.labels[:10, None] == out.labels[None, :]) & ((ref.scores[:10, None] - out.scores[None, :]).abs() < 0.02)
    best = torch.where(same, iou, torch.zeros_like(iou)).max(dim=1).values
    assert best[0] > 0.98 and (best > 0.98).float().mean() >= 0.8, f"best IoU of top fp32 detections: {best}"
