"""TwoStageDetector / build_detector: preprocessing, training on tiny synthetic data, degenerate inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from detkit.config import DetectionConfig
from detkit.models.build import build_detector
from detkit.models.detector import TwoStageDetector, rescale_detections
from detkit.structures import Detections, Targets

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cfg(arch: str = "mask_rcnn") -> DetectionConfig:
    cfg = DetectionConfig()
    m = cfg.model
    m.meta_architecture = arch
    m.backbone.name = "resnet18"
    m.backbone.norm = "BN"
    m.backbone.freeze_at = 0
    m.fpn.out_channels = 64
    m.anchors.sizes = [[16], [32], [64], [128], [256]]
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 500, 200
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 300, 100
    m.roi_heads.batch_size_per_image = 64
    m.roi_heads.box_head.fc_dim = 128
    m.roi_heads.mask_head.conv_dim = 64
    return cfg


def _scene(seed: int, size: int = 128) -> tuple[torch.Tensor, Targets]:
    """A gray image with 2 colored rectangles, their boxes, labels and masks."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, size, size), 40, dtype=torch.uint8)
    boxes, masks = [], []
    for k in range(2):
        x0, y0 = int(torch.randint(0, size // 2, (1,), generator=g)), int(torch.randint(0, size // 2, (1,), generator=g))
        w, h = int(torch.randint(24, size // 2, (1,), generator=g)), int(torch.randint(24, size // 2, (1,), generator=g))
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.tensor([220, 60, 60] if k == 0 else [60, 60, 220], dtype=torch.uint8)[:, None, None]
        m = torch.zeros(size, size, dtype=torch.uint8)
        m[y0 : y0 + h, x0 : x0 + w] = 1
        boxes.append([x0, y0, x0 + w, y0 + h])
        masks.append(m)
    # the second rectangle may cover part of the first: recompute the first's visible mask
    masks[0] &= 1 - masks[1]
    return img, Targets(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([0, 1]), masks=torch.stack(masks))


def _empty_targets(size: int = 128) -> Targets:
    return Targets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, size, size, dtype=torch.uint8))


def test_preprocess_normalizes_then_pads() -> None:
    torch.manual_seed(0)
    model = build_detector(_cfg("faster_rcnn"), num_classes=2)
    a = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 64, 33), dtype=torch.uint8).float()
    x, sizes = model.preprocess([a, b])
    assert x.shape == (2, 3, 64, 96) and sizes == [(50, 70), (64, 33)]
    mean, std = model.pixel_mean, model.pixel_std
    torch.testing.assert_close(x[0, :, :50, :70], (a.float() - mean) / std)
    assert (x[0, :, 50:] == 0).all() and (x[0, :, :, 70:] == 0).all() and (x[1, :, :, 33:] == 0).all()
    bgr = TwoStageDetector(model.backbone, model.rpn, model.roi_heads, (1.0, 2.0, 3.0), (1.0, 1.0, 1.0), "BGR")
    xb, _ = bgr.preprocess([a])
    torch.testing.assert_close(xb[0, 0, :50, :70], a[2].float() - 1.0)
    with pytest.raises(ValueError, match="image 0 must be a \\[3, H, W\\]"):
        model.preprocess([torch.zeros(50, 70, 3)])


def test_overfit_two_images_losses_decrease() -> None:
    torch.manual_seed(0)
    model = build_detector(_cfg("mask_rcnn"), num_classes=2).train()
    (im1, t1), (im2, t2) = _scene(1), _scene(2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    history = []
    for _ in range(30):
        losses = model([im1, im2], [t1, t2])
        assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first = {k: sum(h[k] for h in history[:5]) / 5 for k in history[0]}
    last = {k: sum(h[k] for h in history[-5:]) / 5 for k in history[0]}
    for k in ("loss_rpn_cls", "loss_cls", "loss_mask"):
        assert last[k] < 0.5 * first[k], (k, first[k], last[k])
    assert last["loss_rpn_loc"] < first["loss_rpn_loc"], (first, last)
    # loss_box_reg is normalized by all sampled RoIs: it first grows as better proposals put more
    # foreground RoIs in the sample, so it is only required to stay finite (checked every step).
    rest = [k for k in first if k != "loss_box_reg"]
    assert sum(last[k] for k in rest) < 0.5 * sum(first[k] for k in rest), (first, last)


def test_image_without_gt_trains() -> None:
    torch.manual_seed(0)
    model = build_detector(_cfg("mask_rcnn"), num_classes=2).train()
    im, t = _scene(3)
    for targets in ([t, _empty_targets()], [_empty_targets(), _empty_targets()]):
        losses = model([im, torch.zeros(3, 128, 128, dtype=torch.uint8)], targets)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        total.backward()
    assert float(losses["loss_rpn_loc"].detach()) == 0.0 and float(losses["loss_box_reg"].detach()) == 0.0


def test_bad_gt_box_is_a_clear_error() -> None:
    model = build_detector(_cfg("faster_rcnn"), num_classes=2).train()
    im, t = _scene(4)
    bad = Targets(boxes=torch.tensor([[10.0, 10.0, 50.0, 60.0], [30.0, 40.0, 30.0, 80.0]]), labels=torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match=r"image 1 .* index 1, box \[30.0, 40.0, 30.0, 80.0\]"):
        model([im, im], [t, bad])
    with pytest.raises(ValueError, match="one Targets per image"):
        model([im, im], [t])


def test_predict_shapes_modes_and_blank_image() -> None:
    torch.manual_seed(0)
    model = build_detector(_cfg("mask_rcnn"), num_classes=2).train()
    im, _ = _scene(5, size=100)
    dets = model.predict([im, im[:, :80, :90]])
    assert model.training, "predict must restore the previous mode"
    for d, (h, w) in zip(dets, [(100, 100), (80, 90)]):
        assert d.boxes.shape == (len(d), 4) and d.masks.shape == (len(d), h, w) and d.masks.dtype == torch.bool
        if len(d):
            assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
    raw = model.predict([im], paste_masks=False)[0]
    assert raw.masks.dim() == 4 and raw.masks.shape[1:] == (1, 28, 28)
    assert model.predict([]) == []

    # no detections: a background bias no class can beat
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[-1] = 100.0
    for arch_model in (model,):
        (d,) = arch_model.predict([torch.zeros(3, 64, 96, dtype=torch.uint8)])
        assert len(d) == 0
        assert d.boxes.shape == (0, 4) and d.boxes.dtype == torch.float32
        assert d.scores.shape == (0,) and d.labels.shape == (0,) and d.labels.dtype == torch.int64
        assert d.masks.shape == (0, 64, 96) and d.masks.dtype == torch.bool


def test_rescale_detections() -> None:
    masks = torch.zeros(2, 1, 28, 28)
    masks[:, :, 4:24, 4:24] = 1.0
    det = Detections(
        boxes=torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 50.0]]),
        scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([1, 0]), masks=masks,
    )
    out = rescale_detections(det, (50, 100), (100, 150))
    torch.testing.assert_close(out.boxes, torch.tensor([[15.0, 40.0, 45.0, 80.0], [0.0, 0.0, 150.0, 100.0]]))
    assert out.masks.shape == (2, 100, 150) and out.masks.dtype == torch.bool
    assert out.masks[0, 60, 30] and not out.masks[0, 10, 10] and not out.masks[0, 60, 100]
    # pasted masks are resized; empty detections stay empty with the right shapes
    again = rescale_detections(out, (100, 150), (50, 75))
    assert again.masks.shape == (2, 50, 75) and again.masks[0, 30, 15]
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, 28, 28))
    e = rescale_detections(empty, (10, 10), (20, 30))
    assert e.boxes.shape == (0, 4) and e.masks.shape == (0, 20, 30)


def test_mask_rcnn_r18_256px_default_widths_forward_backward() -> None:
    # the step time of this model: benchmarks/bench_step_time.py
    torch.manual_seed(0)
    cfg = _cfg("mask_rcnn")
    cfg.model.fpn.out_channels = 256
    cfg.model.roi_heads.box_head.fc_dim = 1024
    cfg.model.roi_heads.mask_head.conv_dim = 256
    model = build_detector(cfg, num_classes=3).train()
    im, t = _scene(6, size=256)
    losses = model([im], [t])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.roi_heads.mask_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_build_then_load_weights_and_check_classes(tmp_path, caplog) -> None:
    from detkit.checkpoint import load_initial_weights

    torch.manual_seed(0)
    cfg = _cfg("faster_rcnn")
    src = build_detector(cfg, num_classes=2)
    path = tmp_path / "model.pth"
    torch.save(src.state_dict(), path)
    cfg.model.weights = str(path)
    dst = build_detector(cfg, num_classes=2)  # builds only
    assert any(not torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items() if v.is_floating_point())
    with caplog.at_level(logging.INFO, logger="detkit"):
        load_initial_weights(dst, cfg, training=True)
    assert "model.weights" in caplog.text and "loaded" in caplog.text
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    cfg.model.weights = None
    cfg.model.num_classes = 5
    with pytest.raises(ValueError, match="model.num_classes=5"):
        build_detector(cfg, num_classes=2)
    cfg.model.num_classes = None
    cfg.model.rpn.in_features = ["p2", "p9"]
    with pytest.raises(ValueError, match=r"model.rpn.in_features: features \['p9'\]"):
        build_detector(cfg, num_classes=2)
