"""Cascade R-CNN / Cascade Mask R-CNN (detkit.models.roi_heads.cascade), checked stage by stage.

The stage checks recompute, independently of detkit's code (IoU, box encoding/decoding, clipping,
losses written out here with the cascade's constants), what each stage must see and produce: the
matching at IoU 0.5 / 0.6 / 0.7 without low-quality matches, the box targets encoded with (10, 10, 5,
5) / (20, 20, 10, 10) / (30, 30, 15, 15), the 1/3 gradient scale on the pooled features, the detached
refined boxes passed between stages, and at test time the class probabilities averaged over the
stages with the last stage's boxes. Then the whole model: losses / detections, a few training steps on
the shapes data (bf16 autocast, EMA, eval), the Predictor in fp32 and bf16 with its fast CPU path on
every stage, and TorchScript / ONNX export verified on textured and blank images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torchvision.ops import batched_nms

from detkit import Predictor
from detkit.config import ConfigError, load_config
from detkit.data.synthetic import make_shapes_coco
from detkit.engine.run_detection import train_detection
from detkit.export import export_onnx, export_torchscript, verify_exports
from detkit.inference.layers import PackedLinear
from detkit.models.build import build_detector
from detkit.models.roi_heads import CascadeROIHeads
from detkit.models.roi_heads.cascade import ScaleGradient
from detkit.inference.optimize import FusedFCHead, bf16_supported
from detkit.structures import Detections, Proposals, Targets

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
K = 3
IOUS = (0.5, 0.6, 0.7)
WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
# the Cascade configs' box head (class-agnostic regression, XavierFill FCs) on the demo config
CASCADE = ["model.roi_heads.name=cascade", "model.roi_heads.box_head.cls_agnostic_bbox_reg=true",
           "model.roi_heads.box_head.fc_init=c2_xavier"]
TINY = [
    "model.fpn.out_channels=16", "model.roi_heads.box_head.fc_dim=32", "model.roi_heads.mask_head.conv_dim=16",
    "model.roi_heads.mask_head.num_conv=1", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=60", "model.roi_heads.batch_size_per_image=64",
    "model.roi_heads.detections_per_image=30", "input.min_size_test=128", "input.max_size_test=160",
    f"model.num_classes={K}",
]
IMAGE = (128, 160)  # (h, w) of the stage tests' image

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py


def tiny_cascade(arch: str = "mask_rcnn", *extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(load_config(DEMO, [f"model.meta_architecture={arch}", *CASCADE, *TINY, *extra]), K)


# --------------------------------------------------------------------------- independent box math (float64)
def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _center_size(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return b[:, 0] + w / 2, b[:, 1] + h / 2, w, h


def encode(gt: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    gx, gy, gw, gh = _center_size(gt.double())
    px, py, pw, ph = _center_size(boxes.double())
    wx, wy, ww, wh = weights
    return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1)


def decode(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    px, py, pw, ph = _center_size(boxes.double())
    d = deltas.double() / torch.tensor(weights, dtype=torch.float64)
    dw, dh = d[:, 2].clamp(max=math.log(1000 / 16)), d[:, 3].clamp(max=math.log(1000 / 16))
    cx, cy, w, h = px + d[:, 0] * pw, py + d[:, 1] * ph, pw * torch.exp(dw), ph * torch.exp(dh)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def clip(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], 1)


def sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.detach().double().numpy()
    return a[np.lexsort(a.T[::-1])]


# --------------------------------------------------------------------------- stage fixtures
def stage_inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[Proposals], Targets]:
    """FPN-like features (16 channels, strides 4..32 of a 128x160 image), proposals jittered around three
    GT boxes (IoUs spread over 0.2..1) plus random ones, and the GT (labels 0, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE
    feats = {f"p{i}": torch.randn(1, 16, h // 2 ** i, w // 2 ** i, generator=g, requires_grad=True)
             for i in range(2, 6)}
    gt = torch.tensor([[20.0, 30.0, 70.0, 100.0], [80.0, 10.0, 150.0, 60.0], [60.0, 70.0, 110.0, 120.0]])
    size = (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
    jitter = gt[:, None] + 0.15 * size[:, None] * torch.randn(3, 30, 4, generator=g)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([w - 30.0, h - 30.0])
    rand = torch.cat([xy, xy + 10 + 20 * torch.rand(20, 2, generator=g)], 1)
    boxes = clip(torch.cat([jitter.reshape(-1, 4), rand]), h, w).float()
    keep = ((boxes[:, 2:] - boxes[:, :2]) > 2).all(1)
    proposals = [Proposals(boxes=boxes[keep], objectness=torch.zeros(int(keep.sum())))]
    return feats, proposals, Targets(boxes=gt, labels=torch.tensor([0, 1, 2]))


def capture(heads: CascadeROIHeads) -> tuple[list, list, list]:
    """Hooks recording each stage's pooled boxes (as passed) and (logits, deltas)."""
    pooled, outputs = [], []
    hooks = [heads.box_pooler.register_forward_hook(lambda m, args, out: pooled.append(list(args[1])))]
    for p in heads.box_predictor:
        hooks.append(p.register_forward_hook(lambda m, args, out: outputs.append(out)))
    return pooled, outputs, hooks


def expected_stage_losses(boxes: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, target: Targets,
                          stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_cls, loss_box_reg, labels) of one stage computed here: IoU >= IOUS[stage] with the best GT is
    positive (nothing else), targets encoded with WEIGHTS[stage], L1 summed over positives / all RoIs."""
    best, arg = iou(target.boxes, boxes).max(0)
    pos = best >= IOUS[stage]
    labels = torch.where(pos, target.labels[arg], torch.full_like(arg, K))
    loss_cls = F.cross_entropy(logits.double(), labels)
    targets = encode(target.boxes[arg[pos]], boxes[pos], WEIGHTS[stage])
    loss_box = (deltas[pos].double() - targets).abs().sum() / boxes.shape[0]
    return loss_cls, loss_box, labels


# --------------------------------------------------------------------------- stage by stage
def test_training_stages_match_an_independent_computation() -> None:
    heads = tiny_cascade("faster_rcnn", "model.roi_heads.batch_size_per_image=512").roi_heads.train()
    assert isinstance(heads, CascadeROIHeads) and heads.num_stages == 3
    with torch.no_grad():  # larger deltas: the refined boxes move, and IoUs cross the thresholds
        for p in heads.box_predictor:
            p.bbox_pred.weight.normal_(0, 0.05)
    feats, proposals, target = stage_inputs()
    pooled, outputs, hooks = capture(heads)
    _, losses = heads(feats, proposals, [IMAGE], [target])
    for hk in hooks:
        hk.remove()
    assert sorted(losses) == sorted(f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3))
    assert len(pooled) == len(outputs) == 3

    labels = []
    for k in range(3):
        boxes = pooled[k][0]
        logits, deltas = outputs[k]
        if k > 0:  # the previous stage's regression of its own boxes, clipped, empty ones dropped, detached
            assert not boxes.requires_grad
            prev = clip(decode(outputs[k - 1][1].detach(), pooled[k - 1][0], WEIGHTS[k - 1]), *IMAGE)
            prev = prev[((prev[:, 2:] - prev[:, :2]) > 0).all(1)]
            np.testing.assert_allclose(sorted_rows(boxes), sorted_rows(prev), atol=1e-3)
        else:  # all proposals and the 3 GT boxes (the sampling budget holds them all)
            np.testing.assert_allclose(sorted_rows(boxes),
                                       sorted_rows(torch.cat([proposals[0].boxes, target.boxes])), atol=0)
        loss_cls, loss_box, lab = expected_stage_losses(boxes, logits, deltas, target, k)
        labels.append(lab)
        assert float(losses[f"loss_cls_stage{k}"].detach()) == pytest.approx(float(loss_cls.detach()), rel=1e-5)
        assert float(losses[f"loss_box_reg_stage{k}"].detach()) == pytest.approx(float(loss_box.detach()), rel=1e-4, abs=1e-7)
        assert float(loss_box.detach()) > 0
        if k > 0:  # the data exercises the stage's threshold: boxes in [0.5, IOUS[k]) are background here
            best = iou(target.boxes, boxes).max(0).values
            assert bool(((best >= 0.5) & (best < IOUS[k])).any()), k
    assert (labels[0] < K).sum() > (labels[2] < K).sum() > 0


def test_gradient_scale_and_detached_stages() -> None:
    """Cascade gradients on the features are 1/3 of the unscaled stages' (independently computed losses on
    the same boxes, which enter as constants); every head's parameters get their full gradient."""
    heads = tiny_cascade("faster_rcnn").roi_heads.train()
    feats, proposals, target = stage_inputs(1)
    pooled, _, hooks = capture(heads)
    _, losses = heads(feats, proposals, [IMAGE], [target])
    for hk in hooks:
        hk.remove()
    sum(losses.values()).backward()
    params = {n: p for n, p in heads.named_parameters()}
    # (a level no RoI is assigned to gets no gradient)
    cascade_feat_grads = {k: torch.zeros_like(v) if v.grad is None else v.grad.clone() for k, v in feats.items()}
    cascade_param_grads = {n: p.grad.clone() for n, p in params.items()}
    for t in list(feats.values()) + list(params.values()):
        t.grad = None

    total = 0.0
    for k in range(3):
        boxes = [b.detach() for b in pooled[k]]
        logits, deltas = heads.box_predictor[k](heads.box_head[k](heads.box_pooler(list(feats.values()), boxes)))
        loss_cls, loss_box, _ = expected_stage_losses(boxes[0], logits, deltas, target, k)
        total = total + loss_cls + loss_box
    total.backward()
    assert any(t.grad is not None and bool(t.grad.abs().max() > 0) for t in feats.values())
    for name, t in feats.items():
        manual = torch.zeros_like(t) if t.grad is None else t.grad.float()
        torch.testing.assert_close(cascade_feat_grads[name], manual / 3, rtol=1e-4, atol=1e-8)
    for name, p in params.items():  # box_predictor.0.bbox_pred too: no gradient reaches it from later stages
        torch.testing.assert_close(cascade_param_grads[name], p.grad, rtol=1e-4, atol=1e-8)

    x = torch.randn(5, requires_grad=True)
    ScaleGradient.apply(x, 0.25).backward(torch.arange(5.0))
    assert torch.equal(x.grad, torch.arange(5.0) * 0.25)


def test_no_low_quality_matches() -> None:
    heads = tiny_cascade("faster_rcnn").roi_heads
    gt = Targets(boxes=torch.tensor([[0.0, 0.0, 100.0, 100.0]]), labels=torch.tensor([2]))
    shifted = torch.tensor([[0.0, 0.0, 100.0, 100.0 * 0.65]])  # IoU 0.65, the best (only) box of the GT
    labels = [int(heads.label_boxes(shifted, gt, k)[0][0]) for k in range(3)]
    assert labels == [2, 2, K]  # positive at 0.5 and 0.6, background at 0.7 although it is the GT's best


def test_inference_averages_stage_scores_and_takes_last_stage_boxes() -> None:
    heads = tiny_cascade("faster_rcnn", "model.roi_heads.detections_per_image=25").roi_heads.eval()
    with torch.no_grad():
        for p in heads.box_predictor:
            p.bbox_pred.weight.normal_(0, 0.05)
            p.cls_score.weight.normal_(0, 0.3)
    feats, proposals, _ = stage_inputs(2)
    pooled, outputs, hooks = capture(heads)
    with torch.no_grad():
        dets, extra = heads(feats, proposals, [IMAGE], None)
    for hk in hooks:
        hk.remove()
    assert extra == {} and len(dets) == 1 and isinstance(dets[0], Detections)
    boxes = proposals[0].boxes
    for k in range(1, 3):  # aligned rows: nothing dropped at test time
        boxes = clip(decode(outputs[k - 1][1], boxes, WEIGHTS[k - 1]), *IMAGE)
        np.testing.assert_allclose(pooled[k][0].numpy(), boxes.numpy(), atol=1e-3)
    probs = [F.softmax(o[0].double(), 1) for o in outputs]
    scores = (sum(probs) / 3)[:, :K]
    assert (scores - probs[-1][:, :K]).abs().max() > 0.01  # averaging is visible in these scores
    final = clip(decode(outputs[2][1], pooled[2][0], WEIGHTS[2]), *IMAGE)

    rows, cls = torch.nonzero(scores > heads.score_thresh, as_tuple=True)
    cand_boxes, cand_scores = final[rows], scores[rows, cls]
    keep = batched_nms(cand_boxes.float(), cand_scores.float(), cls, heads.nms_thresh)[:heads.detections_per_image]
    det = dets[0]
    assert len(det) == len(keep) == 25
    torch.testing.assert_close(det.scores.double(), cand_scores[keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(det.boxes.double(), cand_boxes[keep], rtol=0, atol=1e-3)
    assert torch.equal(det.labels, cls[keep])


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, says", [
    ("model.roi_heads.box_head.cls_agnostic_bbox_reg=false", "model.roi_heads.box_head.cls_agnostic_bbox_reg"),
    ("model.roi_heads.cascade.iou_thresholds=[0.5,0.6]", "'model.roi_heads.cascade'"),
    ("model.roi_heads.cascade.bbox_reg_weights=[[10,10,5,5]]", "'model.roi_heads.cascade'"),
    ("model.roi_heads.iou_threshold=0.4", "cascade.iou_thresholds[0]"),
    ("model.roi_heads.name=Cascade", "'model.roi_heads.name'"),
])
def test_bad_cascade_config_fails_at_load_in_one_line(override: str, says: str) -> None:
    path = ROOT / "configs" / "coco" / "cascade_mask_rcnn_R_50_FPN_1x.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    msg = str(e.value)
    assert "\n" not in msg and says in msg and str(path) in msg


def test_shipped_cascade_configs() -> None:
    for folder in ("coco", "detectron2"):
        for sched, iters in (("1x", 90000), ("3x", 270000)):
            cfg = load_config(ROOT / "configs" / folder / f"cascade_mask_rcnn_R_50_FPN_{sched}.yaml")
            rh = cfg.model.roi_heads
            assert (cfg.model.meta_architecture, rh.name, rh.box_head.cls_agnostic_bbox_reg) == ("mask_rcnn", "cascade",
                                                                                                True)
            assert tuple(rh.cascade.iou_thresholds) == IOUS and tuple(map(tuple, rh.cascade.bbox_reg_weights)) == WEIGHTS
            assert cfg.train.max_iters == iters and cfg.model.rpn.post_nms_topk_train == 2000
    heads = tiny_cascade().roi_heads
    assert [type(h).__name__ for h in heads.box_head] == ["FastRCNNConvFCHead"] * 3
    assert [tuple(p.bbox_pred.weight.shape) for p in heads.box_predictor] == [(4, 32)] * 3
    assert [tuple(p.cls_score.weight.shape) for p in heads.box_predictor] == [(K + 1, 32)] * 3


# --------------------------------------------------------------------------- the whole model
def test_losses_in_training_detections_in_eval() -> None:
    model = tiny_cascade()
    img = torch.randint(0, 255, (3, *IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _, _, target = stage_inputs()
    target.masks = torch.zeros(3, *IMAGE, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(target.boxes.int().tolist()):
        target.masks[i, y1:y2, x1:x2] = 1
    model.train()
    losses = model([img], [target])
    stage_keys = {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)}
    assert set(losses) == stage_keys | {"loss_rpn_cls", "loss_rpn_loc", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    (det,) = model.predict([img], paste_masks=False)
    assert isinstance(det, Detections) and det.masks is not None and det.masks.shape[1:] == (1, 28, 28)
    assert det.boxes.dtype == torch.float32 and det.labels.dtype == torch.int64


def test_trains_on_shapes_with_bf16_autocast_ema_and_eval(tmp_path: Path) -> None:
    paths = make_shapes_coco(tmp_path / "shapes", num_train=8, num_val=2, image_size=128, seed=0)
    amp = "bf16" if bf16_supported("cpu") else "none"
    ov = CASCADE + [o for o in TINY if not o.startswith("model.num_classes")] + [
        "data.synthetic=null", f"data.train.annotations={paths['train_annotations']}",
        f"data.train.images={paths['train_images']}", f"data.val.annotations={paths['val_annotations']}",
        f"data.val.images={paths['val_images']}", "input.min_size_train=[128]", "input.max_size_train=160",
        "train.batch_size=2", "train.max_iters=6", "train.warmup_iters=1", "train.base_lr=0.01", "train.log_period=1",
        "train.checkpoint_period=100", f"train.amp={amp}", "train.ema=true", "train.num_vis_images=0",
    ]
    metrics = train_detection(load_config(DEMO, ov), tmp_path / "run")
    assert "bbox/AP" in metrics and "segm/AP" in metrics
    import json

    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "total_loss" in r]
    assert [r["iter"] for r in steps] == list(range(1, 7))
    assert all(math.isfinite(r["total_loss"]) and "loss_cls_stage2" in r for r in steps)


def _calibrate(model: torch.nn.Module) -> torch.nn.Module:
    """Class logits of every stage: positive projections of its box-head features, background bias +4 (a blank
    image, whose features are all 0, then has no detection); Kaiming mask predictor."""
    heads = model.roi_heads
    feats: dict[int, torch.Tensor] = {}
    hooks = [h.register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o)) for k, h in enumerate(heads.box_head)]
    model.eval().predict([scene(IMAGE[0], IMAGE[1], 1)])
    for hk in hooks:
        hk.remove()
    with torch.no_grad():
        for k, pred in enumerate(heads.box_predictor):
            u = torch.rand(K, feats[k].shape[1], generator=torch.Generator().manual_seed(k))
            pred.cls_score.weight.zero_()
            pred.cls_score.weight[:K] = u * (7.0 / (feats[k] @ u.T).max())
            pred.cls_score.bias.zero_()
            pred.cls_score.bias[K] = 4.0
        torch.nn.init.kaiming_normal_(heads.mask_head.predictor.weight, mode="fan_out",
                                      generator=torch.Generator().manual_seed(5))
    return model


def scene(h: int, w: int, seed: int) -> torch.Tensor:
    """Gray float [3, h, w] image with four random colored rectangles."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, h, w), 90.0)
    for _ in range(4):
        y0, x0 = int(torch.randint(0, h - 20, (1,), generator=g)), int(torch.randint(0, w - 20, (1,), generator=g))
        hh, ww = int(torch.randint(16, h // 2, (1,), generator=g)), int(torch.randint(16, w // 2, (1,), generator=g))
        img[:, y0 : y0 + hh, x0 : x0 + ww] = torch.rand(3, 1, 1, generator=g) * 255
    return img


@pytest.fixture(scope="module")
def calibrated() -> torch.nn.Module:
    return _calibrate(tiny_cascade())


def test_predictor_fp32_and_bf16_with_the_fast_path_on_every_stage(calibrated, tmp_path: Path) -> None:
    cfg = load_config(DEMO, [*CASCADE, *TINY])
    cfg_path, weights = tmp_path / "cfg.yaml", tmp_path / "w.pth"
    data = cfg.model_dump(mode="json")
    data["data"] = {"class_names": ["a", "b", "c"]}
    cfg_path.write_text(yaml.safe_dump(data))
    torch.save(calibrated.state_dict(), weights)
    image = scene(150, 200, 3).permute(1, 2, 0).to(torch.uint8).numpy()

    plain = Predictor(cfg_path, weights=weights, optimize=False)(image)
    fast = Predictor(cfg_path, weights=weights)
    heads = fast.model.roi_heads
    assert [type(h) for h in heads.box_head] == [FusedFCHead] * 3
    assert all(isinstance(p.cls_score, PackedLinear) and isinstance(p.bbox_pred, PackedLinear)
               for p in heads.box_predictor)
    res = fast(image)
    assert len(res) > 0 and res.masks.shape == (len(res), 150, 200)
    np.testing.assert_allclose(res.scores, plain.scores, atol=1e-4)
    np.testing.assert_allclose(res.boxes, plain.boxes, atol=1e-2)
    np.testing.assert_array_equal(res.labels, plain.labels)

    bf16 = Predictor(cfg_path, weights=weights, precision="bf16")
    out = bf16(image)
    assert out.boxes.dtype == np.float32 and np.isfinite(out.boxes).all() and len(out) > 0
    if bf16.precision == "bf16":  # the machine has native bf16: same detections up to bf16 noise
        assert abs(len(out) - len(res)) <= max(2, len(res) // 5)
        assert abs(float(out.scores[0]) - float(res.scores[0])) < 0.05


def test_export_torchscript_and_onnx_verified_with_a_blank_image(calibrated, tmp_path: Path) -> None:
    sample = scene(144, 168, 0)
    assert len(calibrated.predict([sample])[0]) > 0
    ts = export_torchscript(calibrated, tmp_path / "m.ts", sample)
    onnx_path = export_onnx(calibrated, tmp_path / "m.onnx", sample)
    blank = calibrated.pixel_mean.view(3, 1, 1).expand(3, 120, 136).clone()
    report = verify_exports(calibrated, [scene(128, 160, 1), scene(176, 128, 2), blank], torchscript=ts, onnx=onnx_path)
    assert report.ok, report.summary()
    counts = [c.num_ref for c in report.checks[::2]]
    assert counts[0] > 0 and counts[1] > 0 and counts[2] == 0, counts
