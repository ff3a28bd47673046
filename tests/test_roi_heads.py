"""Box head, Fast R-CNN losses/post-processing (parity with torchvision) and StandardROIHeads."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from detkit.models.box_coder import BoxCoder
from detkit.models.matcher import Matcher
from detkit.models.poolers import MultiScaleRoIAlign
from detkit.models.roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    MaskRCNNHead,
    StandardROIHeads,
    fast_rcnn_inference,
    fast_rcnn_losses,
)
from detkit.structures import Detections, Proposals, Targets

WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
NAMES = ("p2", "p3", "p4", "p5")


def _boxes(n: int, h: int, w: int, g: torch.Generator, min_wh: float = 2.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = min_wh + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
    b = torch.cat([xy, xy + wh], dim=1)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2].clamp(max=w), b[:, 3].clamp(max=h)], dim=1)


def _tv_postprocess(logits, deltas, proposals, sizes, score_thresh, nms_thresh, topk):
    """torchvision's RoIHeads.postprocess_detections on detkit-layout outputs (labels shifted)."""
    tv = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, WEIGHTS, score_thresh, nms_thresh, topk)
    # background last -> first; bbox_pred gets a (ignored) background slot in front
    tv_logits = torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)
    tv_deltas = torch.cat([torch.zeros_like(deltas[:, :4]), deltas], dim=1)
    return tv.postprocess_detections(tv_logits, tv_deltas, proposals, sizes)


@pytest.mark.parametrize("score_thresh,topk", [(0.05, 100), (0.05, 7), (0.0, 50)])
def test_postprocess_matches_torchvision(score_thresh: float, topk: int) -> None:
    g = torch.Generator().manual_seed(0)
    k = 6
    sizes = [(200, 300), (250, 180), (120, 100)]
    counts = [150, 90, 40]
    proposals = [_boxes(n, h, w, g) for n, (h, w) in zip(counts, sizes)]
    proposals[0][:5] = torch.tensor([10.0, 10.0, 10.3, 40.0])  # tiny boxes: removed by min_size
    r = sum(counts)
    logits = torch.randn(r, k + 1, generator=g) * 2
    logits[counts[0] : counts[0] + counts[1], -1] += 30.0  # image 1: everything is background
    deltas = torch.randn(r, 4 * k, generator=g) * 2
    if score_thresh == 0.0:  # no thresholding at all: > 4000 candidates, torchvision's other NMS path
        assert r * k * 4 > 4000

    ours = fast_rcnn_inference(
        logits, deltas, proposals, sizes, BoxCoder(WEIGHTS), score_thresh, 0.5, topk, 1e-2
    )
    ref_boxes, ref_scores, ref_labels = _tv_postprocess(logits, deltas, proposals, sizes, score_thresh, 0.5, topk)
    assert len(ours) == 3
    for (b, s, lab), rb, rs, rl in zip(ours, ref_boxes, ref_scores, ref_labels):
        assert b.shape == rb.shape and s.shape == rs.shape and lab.dtype == torch.int64
        torch.testing.assert_close(b, rb, rtol=0, atol=1e-4)
        torch.testing.assert_close(s, rs, rtol=0, atol=1e-6)  # softmax column order differs
        assert torch.equal(lab, rl - 1)
    if score_thresh > 0:
        assert ours[1][0].shape == (0, 4), "image whose RoIs are all background should have no detections"
    assert len(ours[0][0]) == min(topk, len(ref_boxes[0])) and len(ours[0][0]) > 0
    assert (ours[0][2] >= 0).all() and (ours[0][2] < k).all()


def test_postprocess_class_agnostic_and_empty() -> None:
    g = torch.Generator().manual_seed(1)
    props = [_boxes(30, 100, 100, g)]
    logits = torch.randn(30, 4, generator=g)
    deltas = torch.randn(30, 4, generator=g)
    (b, s, lab), = fast_rcnn_inference(logits, deltas, props, [(100, 100)], BoxCoder(WEIGHTS), 0.05, 0.5, 100, 0.01)
    # agnostic == class-specific with the same deltas repeated for every class
    (b2, s2, lab2), = fast_rcnn_inference(
        logits, deltas.repeat(1, 3), props, [(100, 100)], BoxCoder(WEIGHTS), 0.05, 0.5, 100, 0.01
    )
    assert torch.equal(b, b2) and torch.equal(s, s2) and torch.equal(lab, lab2) and len(b) > 0
    out = fast_rcnn_inference(
        torch.zeros(0, 4), torch.zeros(0, 12), [torch.zeros(0, 4)] * 2, [(10, 10)] * 2,
        BoxCoder(WEIGHTS), 0.05, 0.5, 100, 0.01,
    )
    assert [tuple(x.shape) for x in out[1]] == [(0, 4), (0,), (0,)]


@pytest.mark.parametrize("beta", [1.0 / 9.0, 0.0])
def test_fast_rcnn_losses_match_torchvision(beta: float) -> None:
    g = torch.Generator().manual_seed(2)
    k, r = 5, 64
    logits = torch.randn(r, k + 1, generator=g)
    deltas = torch.randn(r, 4 * k, generator=g)
    gt = torch.randint(0, k + 1, (r,), generator=g)  # k == background
    targets = torch.randn(r, 4, generator=g)
    ours = fast_rcnn_losses(logits, deltas, gt, targets, smooth_l1_beta=beta)
    if beta > 0:  # torchvision hard-codes beta = 1/9
        tv_logits = torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)
        tv_deltas = torch.cat([torch.zeros(r, 4), deltas], dim=1)
        tv_labels = torch.where(gt == k, 0, gt + 1)
        ref_cls, ref_box = fastrcnn_loss(tv_logits, tv_deltas, [tv_labels], [targets])
        torch.testing.assert_close(ours["loss_cls"], ref_cls)
        torch.testing.assert_close(ours["loss_box_reg"], ref_box)
    else:
        fg = gt < k
        pred = deltas.view(r, k, 4)[fg, gt[fg]]
        torch.testing.assert_close(ours["loss_box_reg"], (pred - targets[fg]).abs().sum() / r)
    # all background: box loss is an exact zero that still backpropagates
    d = deltas.clone().requires_grad_()
    zero = fast_rcnn_losses(logits, d, torch.full((r,), k), targets)["loss_box_reg"]
    zero.backward()
    assert zero.item() == 0.0 and d.grad is not None


def test_gn_4conv1fc_head_builds_and_runs() -> None:
    head = FastRCNNConvFCHead(32, 7, conv_dims=(32, 32, 32, 32), fc_dims=(64,), norm="GN")
    assert [type(c.norm).__name__ for c in head.convs] == ["GroupNorm"] * 4
    assert head.convs[0].conv.bias is None and len(head.fcs) == 1 and head.output_dim == 64
    x = torch.randn(5, 32, 7, 7)
    y = head(x)
    assert y.shape == (5, 64) and (y >= 0).all()
    pred = FastRCNNPredictor(64, 3)
    scores, deltas = pred(y)
    assert scores.shape == (5, 4) and deltas.shape == (5, 12)
    assert set(dict(head.named_parameters())) >= {"convs.0.conv.weight", "convs.3.norm.weight", "fcs.0.weight"}
    two_fc = FastRCNNConvFCHead(8, 7)
    assert [fc.out_features for fc in two_fc.fcs] == [1024, 1024] and len(two_fc.convs) == 0
    agn = FastRCNNPredictor(64, 3, cls_agnostic=True)
    assert agn.bbox_pred.out_features == 4 and agn.cls_score.out_features == 4
    assert pred.bbox_pred.weight.std().item() < pred.cls_score.weight.std().item() < 0.02


# ----------------------------------------------------------------------------- StandardROIHeads
C, K, IMG = 8, 3, 128


def _heads(mask: bool = True, box_head: torch.nn.Module | None = None, **kw) -> StandardROIHeads:
    head = box_head or FastRCNNConvFCHead(C, 7, conv_dims=(), fc_dims=(64, 64))
    args = dict(
        box_pooler=MultiScaleRoIAlign(7, SCALES, 2, True),
        box_head=head,
        box_predictor=FastRCNNPredictor(head.output_dim, K),
        box_coder=BoxCoder(WEIGHTS),
        proposal_matcher=Matcher([0.5], [0, 1], False),
        batch_size_per_image=64,
        positive_fraction=0.25,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_image=20,
        min_box_size=1e-2,
        in_features=NAMES,
    )
    if mask:
        args.update(mask_pooler=MultiScaleRoIAlign(7, SCALES, 2, True), mask_head=MaskRCNNHead(C, K, (8, 8)))
    args.update(kw)
    return StandardROIHeads(**args)


def _features(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, C, IMG // s, IMG // s, generator=g) for n, s in zip(NAMES, (4, 8, 16, 32))}


def _target(g: torch.Generator, n: int = 3, crowd: torch.Tensor | None = None) -> Targets:
    boxes = _boxes(n, IMG, IMG, g, min_wh=16.0)
    masks = torch.zeros(n, IMG, IMG, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
        masks[i, y1 : (y1 + y2) // 2 + 1, x1:x2] = 1  # top half of the box
    t = Targets(boxes=boxes, labels=torch.randint(0, K, (n,), generator=g), masks=masks)
    if crowd is not None:
        t.ignore_boxes = crowd
    return t


def _proposals(targets: list[Targets], g: torch.Generator, n_rand: int = 40) -> list[Proposals]:
    out = []
    for t in targets:
        jitter = t.boxes.repeat(4, 1) + torch.randn(4 * len(t), 4, generator=g) * 3
        b = torch.cat([jitter, _boxes(n_rand, IMG, IMG, g)]).clamp(0, IMG)
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 1)
        out.append(Proposals(boxes=b, objectness=torch.zeros(len(b))))
    return out


def _empty_target() -> Targets:
    return Targets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                   masks=torch.zeros(0, IMG, IMG, dtype=torch.uint8))


def test_training_losses_finite_and_all_parameters_get_gradients() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    heads = _heads().train()
    targets = [_target(g), _target(g, n=5)]
    dets, losses = heads(_features(2), _proposals(targets, g), [(IMG, IMG)] * 2, targets)
    assert dets == [] and set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # sampling: positives first, at most 25 % of 64, GT boxes appended as proposals
    samples = heads.sample_proposals(_proposals(targets, g), targets)
    for s, t in zip(samples, targets):
        assert 0 < s.num_pos <= 16 and len(s.boxes) <= 64
        assert (s.gt_classes[: s.num_pos] < K).all() and (s.gt_classes[s.num_pos :] == K).all()
        assert torch.equal(t.labels[s.matched_idx[: s.num_pos]], s.gt_classes[: s.num_pos])


def test_image_without_gt_trains_as_background() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    heads = _heads().train()
    targets = [_empty_target(), _empty_target()]
    props = [Proposals(_boxes(30, IMG, IMG, g), torch.zeros(30)) for _ in range(2)]
    _, losses = heads(_features(2), props, [(IMG, IMG)] * 2, targets)
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    assert losses["loss_cls"].item() > 0 and torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()
    assert heads.box_predictor.bbox_pred.weight.grad is not None
    assert heads.mask_head.predictor.weight.grad is not None
    # mixed batch: one empty image, one with GT
    targets = [_empty_target(), _target(g)]
    _, losses = heads(_features(2), _proposals(targets, g), [(IMG, IMG)] * 2, targets)
    assert losses["loss_box_reg"].item() > 0 and losses["loss_mask"].item() > 0


def test_crowd_regions_are_ignored() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    heads = _heads().train()
    whole = torch.tensor([[0.0, 0.0, IMG, IMG]])
    crowd_only = Targets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                         masks=torch.zeros(0, IMG, IMG, dtype=torch.uint8), ignore_boxes=whole)
    props = [Proposals(_boxes(30, IMG, IMG, g), torch.zeros(30)) for _ in range(2)]
    samples = heads.sample_proposals(props, [crowd_only, _empty_target()])
    assert len(samples[0].boxes) == 0, "every proposal lies in the crowd region: nothing is sampled"
    assert len(samples[1].boxes) == 30 and samples[1].num_pos == 0
    # whole batch crowd-only: no RoIs at all, losses are finite zeros that keep the graph
    _, losses = heads(_features(2), props, [(IMG, IMG)] * 2, [crowd_only, crowd_only])
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in losses.values())
    sum(losses.values()).backward()
    # half-image crowd: proposals inside are ignored, GT-matched ones stay positive
    left = torch.tensor([[0.0, 0.0, IMG / 2, IMG]])
    t = _target(g, crowd=left)
    p = Proposals(torch.tensor([[2.0, 2.0, 40.0, 40.0], [80.0, 80.0, 120.0, 120.0]]), torch.zeros(2))
    (s,) = heads.sample_proposals([p], [t])
    kept = s.boxes[s.num_pos :]
    assert not any(torch.equal(b, p.boxes[0]) for b in kept), "proposal inside the crowd must not be a negative"
    assert any(torch.equal(b, p.boxes[1]) for b in s.boxes), "proposal outside the crowd is still sampled"
    assert s.num_pos == len(t), "appended GT boxes are positives even inside a crowd region"


def test_overfits_fixed_inputs() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    heads = _heads().train()
    targets = [_target(g, n=2)]
    props = _proposals(targets, g, n_rand=20)
    feats = _features(1, seed=7)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        _, losses = heads(feats, props, [(IMG, IMG)], targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.5 * sum(first.values()), (first, last)
    for key in ("loss_cls", "loss_box_reg", "loss_mask"):
        assert last[key] < first[key], (key, first, last)


def test_inference_outputs_and_empty_detections() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    heads = _heads(score_thresh=0.0).eval()
    props = [Proposals(_boxes(25, IMG, IMG, g), torch.zeros(25)) for _ in range(2)]
    sizes = [(IMG, IMG), (100, 90)]
    with torch.no_grad():
        dets, losses = heads(_features(2), props, sizes)
    assert losses == {} and len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    for d, (h, w) in zip(dets, sizes):
        n = len(d)
        assert 0 < n <= 20
        assert d.masks is not None and d.masks.shape == (n, 1, 14, 14) and d.masks.dtype == torch.float32
        assert (d.masks >= 0).all() and (d.masks <= 1).all()
        assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert torch.all(d.scores[:-1] >= d.scores[1:])
    # nothing passes the threshold -> correctly shaped empty outputs
    heads.score_thresh = 1.0
    with torch.no_grad():
        dets, _ = heads(_features(2), props, sizes)
    for d in dets:
        assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.labels.shape == (0,)
        assert d.masks.shape == (0, 1, 14, 14)
    # Faster R-CNN (no mask head): masks None
    faster = _heads(mask=False).eval()
    with torch.no_grad():
        dets, _ = faster(_features(2), props, sizes)
    assert all(d.masks is None for d in dets)


def test_gn_box_head_in_roi_heads_and_errors() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(9)
    gn = FastRCNNConvFCHead(C, 7, conv_dims=(32, 32, 32, 32), fc_dims=(32,), norm="GN")
    heads = _heads(mask=False, box_head=gn).train()
    targets = [_target(g)]
    _, losses = heads(_features(1), _proposals(targets, g), [(IMG, IMG)], targets)
    assert torch.isfinite(sum(losses.values()))
    with pytest.raises(KeyError, match="p6"):
        _heads(in_features=("p2", "p6"))(_features(1), _proposals(targets, g), [(IMG, IMG)], targets)
    no_masks = Targets(boxes=targets[0].boxes, labels=targets[0].labels)
    with pytest.raises(ValueError, match="no GT masks"):
        _heads()(_features(1), _proposals(targets, g), [(IMG, IMG)], [no_masks])
    with pytest.raises(ValueError, match="cls_agnostic"):
        _heads(cls_agnostic_bbox_reg=True)


def test_bf16_autocast_gives_fp32_losses_and_detections() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    heads = _heads().train()
    targets = [_target(g)]
    props = _proposals(targets, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = heads(_features(1), props, [(IMG, IMG)], targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    heads.eval()
    heads.score_thresh = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (det,), _ = heads(_features(1), props, [(IMG, IMG)])
    assert len(det) > 0
    assert det.boxes.dtype == det.scores.dtype == det.masks.dtype == torch.float32
