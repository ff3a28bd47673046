"""detkit.inference.optimize: BN folding, prepacked fused layers, channels_last, bf16 with fp32 islands, fast RoIAlign.

Every optimized model is compared with the plain model it came from (or with torchvision's own
RoIAlign), on tiny random models and images.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

import detkit.inference.optimize as speed
from detkit import Predictor
from detkit.config import DetectionConfig, load_config
from detkit.layers import FrozenBatchNorm2d, fold_frozen_bn
from detkit.models.backbones.resnet import build_resnet
from detkit.models.build import build_detector
from detkit.models.poolers import MultiScaleRoIAlign
from detkit.inference.optimize import (
    FastMultiScaleRoIAlign,
    InferenceConv2d,
    PackedLinear,
    bf16_supported,
    optimize_for_inference,
    resolve_precision,
    roi_align_nhwc,
)

MKLDNN = speed.mkldnn_linear_available()
ONEDNN_CONV = speed.onednn_conv_available()
BF16 = bf16_supported("cpu")
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no native bf16 (AVX512-BF16/AMX) or no oneDNN")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial frozen BN statistics, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def _cfg(arch: str = "faster_rcnn", backbone: str = "resnet18", box_head: str = "2fc") -> DetectionConfig:
    cfg = DetectionConfig()
    m = cfg.model
    m.meta_architecture = arch
    m.backbone.name, m.backbone.norm, m.backbone.freeze_at = backbone, "FrozenBN", 2
    m.fpn.out_channels = 32
    m.anchors.sizes = [[16], [32], [64], [128], [256]]
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 300, 100
    m.roi_heads.box_head.type, m.roi_heads.box_head.fc_dim = box_head, 64
    m.roi_heads.box_head.conv_dim, m.roi_heads.box_head.norm = 32, "GN" if box_head == "4conv1fc" else ""
    m.roi_heads.mask_head.conv_dim = 32
    m.roi_heads.box_head.pooler_sampling_ratio = 0  # adaptive sampling in the fast RoIAlign too
    return cfg


@torch.no_grad()
def _detector(arch: str = "faster_rcnn", **kw) -> nn.Module:
    """A tiny random detector with a few confident detections."""
    torch.manual_seed(0)
    model = build_detector(_cfg(arch, **kw), num_classes=3).eval()
    _randomize_norms(model)
    pred = model.roi_heads.box_predictor
    pred.cls_score.weight.normal_(0, 0.2)
    pred.cls_score.bias.copy_(torch.tensor([1.5, 0.5, 0.0, -2.0]))
    pred.bbox_pred.weight.normal_(0, 0.01)
    model.rpn.head.objectness.weight.normal_(0, 0.05)
    return model


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = []
    for h, w in ((128, 160), (112, 96)):
        img = torch.nn.functional.avg_pool2d(torch.rand(1, 3, h, w, generator=g) * 255, 5, 1, 2)[0]
        img[:, 20:70, 30:80] = torch.tensor([200.0, 40.0, 40.0])[:, None, None]
        out.append(img.to(torch.uint8))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
    err = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x {scale:.3g}"


def _same_detections(ref, out, box_atol: float = 1e-2, score_atol: float = 1e-4) -> None:
    for r, o in zip(ref, out):
        assert len(r) == len(o), f"{len(r)} vs {len(o)} detections"
        assert torch.equal(r.labels, o.labels)
        torch.testing.assert_close(o.boxes, r.boxes, atol=box_atol, rtol=0)
        torch.testing.assert_close(o.scores, r.scores, atol=score_atol, rtol=0)


# ------------------------------------------------------------------------------------- capabilities
def test_bf16_supported_returns_bool_and_can_be_disabled(monkeypatch) -> None:
    for device in ("cpu", "meta", torch.device("cpu")):
        assert isinstance(bf16_supported(device), bool)
    assert bf16_supported("meta") is False
    monkeypatch.setenv("DETKIT_DISABLE_BF16", "1")
    assert bf16_supported("cpu") is False
    assert resolve_precision("bf16", "cpu") == "fp32"
    with pytest.raises(ValueError, match="test.precision"):
        resolve_precision("fp8", "cpu")
    assert resolve_precision("fp16", "cpu") == "fp32"  # the GPUs' half precision: emulated on a CPU


def test_fp32_fallback_when_bf16_unsupported(monkeypatch, caplog, tmp_path) -> None:
    monkeypatch.setattr(speed, "bf16_supported", lambda device="cpu": False)
    plain = _detector()
    model = copy.deepcopy(plain)
    with caplog.at_level(logging.WARNING, logger="detkit"):
        optimize_for_inference(model, "bf16")
    assert model.inference_precision == "fp32"
    assert "running in fp32" in caplog.text
    packed = [m for m in model.modules() if isinstance(m, (InferenceConv2d, PackedLinear))]
    assert packed and all(m.dtype == torch.float32 for m in packed)
    with torch.no_grad():
        _same_detections(plain.predict(_images()), model.predict(_images()))
    # the Predictor falls back the same way
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_cfg().model_dump(mode="json") | {"data": {"class_names": ["a", "b", "c"]}}))
    pred = Predictor(path, weights=plain.state_dict(), precision="bf16")
    assert pred.precision == "fp32"
    assert isinstance(pred(np.zeros((64, 80, 3), np.uint8)).boxes, np.ndarray)


# ------------------------------------------------------------------------------------- fp32 equivalence
def test_folded_bn_equals_unfolded() -> None:
    torch.manual_seed(0)
    plain = build_resnet("resnet18", norm="FrozenBN", freeze_at=0).eval()
    _randomize_norms(plain)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = plain(x)
        folded = fold_frozen_bn(copy.deepcopy(plain))
        fused = optimize_for_inference(copy.deepcopy(plain), "fp32")
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
        for out in (folded(x), fused(x)):
            for k in ref:
                _close(ref[k], out[k], 1e-4)


@pytest.mark.parametrize("norm,shortcut", [("FrozenBN", "A"), ("FrozenBN", "C"), ("GN", "B")])
def test_resnet_blocks_fuse_when_folded_else_convert_generically(norm: str, shortcut: str) -> None:
    torch.manual_seed(0)
    plain = build_resnet("resnet18", norm=norm, freeze_at=0, shortcut=shortcut).eval()
    _randomize_norms(plain)
    fused = optimize_for_inference(copy.deepcopy(plain), "fp32")
    kinds = {type(m) for m in fused.modules()}
    if norm == "GN":  # nothing folds: the blocks stay, their convs are converted, the norms kept
        assert not kinds & {speed.FusedStem, speed.FusedBasicBlock} and nn.GroupNorm in kinds
    else:
        assert {speed.FusedStem, speed.FusedBasicBlock} <= kinds and FrozenBatchNorm2d not in kinds
    assert InferenceConv2d in kinds and nn.Conv2d not in kinds
    folded = fold_frozen_bn(copy.deepcopy(plain)).state_dict()
    assert list(fused.state_dict()) == list(folded)  # option C's proj_shortcut keys too
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = plain(x), fused(x)
    for k in ref:
        _close(ref[k], out[k], 1e-4)


def test_channels_last_gives_the_same_results() -> None:
    plain = _detector()
    cl = optimize_for_inference(copy.deepcopy(plain), "fp32", fuse=False, channels_last=True)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in cl.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    with torch.no_grad():
        x, _ = plain.preprocess(_images())
        feats = cl.backbone(x)
        assert feats["p2"].is_contiguous(memory_format=torch.channels_last)
        for k, v in plain.backbone(x).items():
            _close(v, feats[k], 1e-4)
        _same_detections(plain.predict(_images()), cl.predict(_images()))


@pytest.mark.parametrize("arch,backbone,box_head", [
    ("faster_rcnn", "resnet18", "2fc"), ("mask_rcnn", "resnet50", "4conv1fc"),
])
def test_fused_detector_matches_plain(arch: str, backbone: str, box_head: str) -> None:
    plain = _detector(arch, backbone=backbone, box_head=box_head)
    fused = optimize_for_inference(copy.deepcopy(plain), "fp32")
    assert fused.inference_precision == "fp32"
    assert any(isinstance(m, FastMultiScaleRoIAlign) for m in fused.modules())
    assert not any(isinstance(m, (nn.Conv2d, FrozenBatchNorm2d)) for m in fused.modules())
    if MKLDNN:
        assert all(m.use_mkldnn for m in fused.modules() if isinstance(m, PackedLinear))
    with torch.no_grad():
        ref, out = plain.predict(_images()), fused.predict(_images())
    assert sum(len(r) for r in ref) > 0, "the tiny model should detect something"
    _same_detections(ref, out)
    if arch == "mask_rcnn":
        for r, o in zip(ref, out):
            assert (r.masks != o.masks).float().mean() < 1e-3


@pytest.mark.skipif(not ONEDNN_CONV, reason="no oneDNN convolution operators in this PyTorch build")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_onednn_conv_kernel_matches_aten(precision: str) -> None:
    if precision == "bf16" and not BF16:
        pytest.skip("this CPU has no native bf16")
    plain = _detector("mask_rcnn", backbone="resnet50")
    aten = optimize_for_inference(copy.deepcopy(plain), precision, conv_kernel="aten")
    onednn = optimize_for_inference(copy.deepcopy(plain), precision, conv_kernel="onednn")
    convs = [m for m in onednn.modules() if isinstance(m, InferenceConv2d)]
    assert convs and all(m.onednn for m in convs)
    assert not any(m.onednn for m in aten.modules() if isinstance(m, InferenceConv2d))
    with torch.no_grad():
        ref, out = aten.predict(_images()), onednn.predict(_images())
        feats_a = aten.backbone(_images()[0][None].float())
        feats_o = onednn.backbone(_images()[0][None].float())
    assert sum(len(r) for r in ref) > 0
    for k in feats_a:  # the same features: only the kernel (and its rounding order) differs
        _close(feats_a[k], feats_o[k], 1e-4 if precision == "fp32" else 3e-2)
    if precision == "fp32":  # (a deep random R50 amplifies the rounding: the parity tests' score bar)
        _same_detections(ref, out, score_atol=1e-3)
    assert list(onednn.state_dict()) == list(aten.state_dict())  # the packed weights are not saved


def test_conv_kernel_choice(monkeypatch) -> None:
    monkeypatch.delenv("DETKIT_CONV_KERNEL", raising=False)
    amx = frozenset({"avx512f", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(speed, "cpu_flags", lambda: amx)
    expect = "onednn" if ONEDNN_CONV else "aten"
    assert speed.choose_conv_kernel("bf16") == expect
    assert speed.choose_conv_kernel("fp32") == "aten"
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert speed.choose_conv_kernel("bf16") == "aten"
    assert speed.choose_conv_kernel("bf16", "onednn") == expect
    monkeypatch.setenv("DETKIT_CONV_KERNEL", "onednn")
    assert speed.choose_conv_kernel("fp32") == expect
    monkeypatch.setenv("DETKIT_CONV_KERNEL", "fast")
    with pytest.raises(ValueError, match="DETKIT_CONV_KERNEL"):
        speed.choose_conv_kernel("bf16")
    with pytest.raises(ValueError, match="conv_kernel"):
        speed.choose_conv_kernel("bf16", "winograd")


def test_state_dict_is_the_folded_models() -> None:
    plain = _detector("mask_rcnn")
    folded = fold_frozen_bn(copy.deepcopy(plain)).state_dict()
    fused = optimize_for_inference(copy.deepcopy(plain), "fp32").state_dict()
    assert list(fused) == list(folded)
    for k, v in folded.items():
        assert torch.equal(fused[k], v), k


# ------------------------------------------------------------------------------------- bf16
@needs_bf16
def test_bf16_close_to_fp32() -> None:
    plain = _detector()
    fp32 = optimize_for_inference(copy.deepcopy(plain), "fp32")
    bf16 = optimize_for_inference(copy.deepcopy(plain), "bf16")
    assert bf16.inference_precision == "bf16"
    assert bf16.roi_heads.box_predictor.cls_score.dtype == torch.float32  # fp32 island
    with torch.no_grad():
        ref, out = fp32.predict(_images()), bf16.predict(_images())
    for r, o in zip(ref, out):
        assert o.boxes.dtype == torch.float32 and o.scores.dtype == torch.float32
        assert len(r) > 0 and abs(len(o) - len(r)) <= max(2, len(r) // 10)
        # random weights give many overlapping near-tie boxes, where bf16 rounding can let NMS keep a
        # neighbour instead: the best detection and most of the top 10 must have a close bf16 twin
        iou = torchvision.ops.box_iou(r.boxes[:10], o.boxes)  # (10, D)
        same = (r.labels[:10, None] == o.labels[None, :]) & ((r.scores[:10, None] - o.scores[None, :]).abs() < 0.02)
        best = torch.where(same, iou, torch.zeros_like(iou)).max(dim=1).values
        assert best[0] > 0.98 and (best > 0.98).float().mean() >= 0.8, f"best IoU of top fp32 detections: {best}"


@needs_bf16
def test_bf16_mask_rcnn_runs_with_fp32_outputs() -> None:
    plain = _detector("mask_rcnn")
    bf16 = optimize_for_inference(copy.deepcopy(plain), "bf16")
    with torch.no_grad():
        ref, out = plain.predict(_images()), bf16.predict(_images())
    for r, o, im in zip(ref, out, _images()):
        assert o.masks.dtype == torch.bool and tuple(o.masks.shape) == (len(o), *im.shape[1:])
        assert o.boxes.dtype == torch.float32 and len(o) > 0 and abs(len(o) - len(r)) <= max(2, len(r) // 10)
        assert torchvision.ops.box_iou(r.boxes[:1], o.boxes).max() > 0.98


def test_inference_layers_match_reference() -> None:
    torch.manual_seed(0)
    cases = [dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
             dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1, groups=8),
             dict(in_channels=16, out_channels=16, kernel_size=3, padding=2, dilation=2),
             dict(in_channels=16, out_channels=24, kernel_size=1, stride=2, bias=False)]
    dtypes = [torch.float32] + ([torch.bfloat16] if BF16 else [])
    for kw in cases:
        conv = nn.Conv2d(**kw).eval()
        x = torch.randn(2, kw["in_channels"], 17, 23)
        with torch.no_grad():
            ref = conv(x)
            other = torch.randn_like(ref)
            for dtype, onednn in [(d, o) for d in dtypes for o in {False, ONEDNN_CONV}]:
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                p = InferenceConv2d(conv, relu=True, dtype=dtype, onednn=onednn)
                assert p.onednn == (onednn and kw.get("groups", 1) == 1)
                _close(ref.relu(), p(x), tol)
                _close((ref + other).relu(), p.forward_add_relu(x, other), tol)
                # a second input size after the weight was packed for the first one
                x2 = torch.randn(1, kw["in_channels"], 9, 30)
                _close(conv(x2).relu(), p(x2), tol)
                assert p(x).is_contiguous(memory_format=torch.channels_last) and p(x).dtype == dtype
    lin = nn.Linear(8 * 3 * 3, 10)
    x = torch.randn(5, 8, 3, 3)
    with torch.no_grad():
        ref = lin(x.flatten(1))
        for use_mkldnn in {False, MKLDNN}:
            _close(ref, PackedLinear(lin, use_mkldnn=use_mkldnn)(x.flatten(1)), 1e-5)
            nhwc = PackedLinear(lin, relu=True, use_mkldnn=use_mkldnn, nhwc_channels=8)
            _close(ref.relu(), nhwc(x.permute(0, 2, 3, 1).flatten(1)), 1e-5)
            torch.testing.assert_close(nhwc.dense_weight(), lin.weight)
        assert PackedLinear(lin)(torch.zeros(0, 72)).shape == (0, 10)


@pytest.mark.skipif(not MKLDNN, reason="no oneDNN linear operators in this PyTorch build")
def test_wrong_device_is_a_clear_error() -> None:
    p = PackedLinear(nn.Linear(3, 4))
    with pytest.raises(RuntimeError, match="optimize_for_inference"):
        p(torch.zeros(2, 3, device="meta"))


# ------------------------------------------------------------------------------------- RoIAlign
def _rois(num: int, size: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * size * 1.1 - 0.05 * size  # some outside the image
    wh = torch.rand(num, 2, generator=g) * size / 2
    wh[:3] = 0.0  # degenerate boxes
    idx = torch.randint(0, 2, (num, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_nhwc_matches_torchvision(aligned: bool, sampling_ratio: int) -> None:
    feats = torch.randn(2, 16, 24, 30)
    rois = _rois(60, 120.0, seed=sampling_ratio)
    ref = torchvision.ops.roi_align(feats, rois, 7, 0.25, sampling_ratio, aligned)
    for f in (feats, feats.contiguous(memory_format=torch.channels_last)):
        out = roi_align_nhwc(f, rois, 7, 0.25, sampling_ratio, aligned)
        assert out.shape == (60, 7, 7, 16)
        _close(ref, out.permute(0, 3, 1, 2), 1e-5)
    if BF16:
        out = roi_align_nhwc(feats.to(torch.bfloat16), rois, 7, 0.25, sampling_ratio, aligned)
        assert out.dtype == torch.bfloat16
        _close(ref, out.permute(0, 3, 1, 2), 3e-2)


def test_fast_pooler_matches_multiscale_roi_align() -> None:
    torch.manual_seed(0)
    pooler = MultiScaleRoIAlign(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2, aligned=False)
    feats = [torch.randn(2, 8, 64 // 2**i, 80 // 2**i).contiguous(memory_format=torch.channels_last) for i in range(4)]
    boxes = [_rois(40, 250.0, seed=s)[:, 1:] for s in (3, 4)]
    boxes[1] = boxes[1][:0]  # an image without boxes
    ref = pooler(feats, boxes)
    out = FastMultiScaleRoIAlign(pooler)(feats, boxes)
    assert out.shape == ref.shape == (40, 8, 7, 7)
    _close(ref, out, 1e-5)
    assert FastMultiScaleRoIAlign(pooler)(feats, [b[:0] for b in boxes]).shape == (0, 8, 7, 7)


def test_predictor_takes_precision_from_config(tmp_path) -> None:
    plain = _detector()
    path = tmp_path / "cfg.yaml"
    cfg = _cfg().model_dump(mode="json") | {"data": {"class_names": ["a", "b", "c"]}, "test": {"precision": "bf16"}}
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).test.precision == "bf16"
    pred = Predictor(path, weights=plain.state_dict())
    assert pred.precision == ("bf16" if BF16 else "fp32")
    assert Predictor(path, weights=plain.state_dict(), precision="fp32").precision == "fp32"
