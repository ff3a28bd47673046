"""RPN: proposal selection equals torchvision's, crowd handling, empty images, losses that train."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork as TVRPN
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from detkit.models.anchors import AnchorGenerator
from detkit.models.box_coder import BoxCoder
from detkit.models.matcher import Matcher
from detkit.models.rpn import RPN, RPNHead
from detkit.structures import Targets

STRIDES = [4, 8, 16, 32, 64]
NAMES = ["p2", "p3", "p4", "p5", "p6"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _rpn(channels: int = 8, tv_style: bool = True, **kw) -> RPN:
    params = dict(
        batch_size_per_image=256, positive_fraction=0.5, pre_nms_topk=(2000, 1000), post_nms_topk=(2000, 1000),
        nms_thresh=0.7, min_size=1e-3, score_thresh=0.0, smooth_l1_beta=1 / 9, loss_weight=1.0,
    )
    params.update(kw)
    return RPN(
        head=RPNHead(channels, 3),
        anchor_generator=AnchorGenerator(
            [[32], [64], [128], [256], [512]], [[0.5, 1.0, 2.0]], STRIDES, round_base=tv_style,
            torchvision_strides=tv_style,
        ),
        box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)),
        matcher=Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True),
        in_features=NAMES,
        **params,
    )


def _features(n: int, h: int, w: int, c: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return {k: torch.randn(n, c, *s, generator=gen) for k, s in zip(NAMES, sizes)}


def test_proposals_equal_torchvision() -> None:
    torch.manual_seed(0)
    ours = _rpn().eval()
    for layer in [ours.head.convs[0], ours.head.objectness, ours.head.anchor_deltas]:
        torch.nn.init.normal_(layer.weight, std=0.3)
        torch.nn.init.normal_(layer.bias, std=0.3)
    tv_head = TVRPNHead(8, 3)
    tv_head.conv[0][0].load_state_dict(ours.head.convs[0].state_dict())
    tv_head.cls_logits.load_state_dict(ours.head.objectness.state_dict())
    tv_head.bbox_pred.load_state_dict(ours.head.anchor_deltas.state_dict())
    tv = TVRPN(
        TVAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5), tv_head,
        0.7, 0.3, 256, 0.5, dict(training=2000, testing=1000), dict(training=2000, testing=1000), 0.7,
    ).eval()
    # padded 288 x 352 (288 / 32 = 9 is odd: p6 stride differs from 64), two images of different valid size
    feats = _features(2, 288, 352)
    sizes = [(288, 340), (250, 352)]
    with torch.no_grad():
        props, losses = ours(sizes, feats)
        ref, _ = tv(ImageList(torch.zeros(2, 3, 288, 352), sizes), OrderedDict(feats))
    assert losses == {}
    for p, r, (h, w) in zip(props, ref, sizes):
        assert len(p) == r.shape[0] and 0 < len(p) <= 1000
        torch.testing.assert_close(p.boxes, r, rtol=0, atol=1e-4)
        assert (p.objectness[:-1] >= p.objectness[1:]).all()  # sorted by score
        assert (p.boxes[:, 2] <= w).all() and (p.boxes[:, 3] <= h).all() and (p.boxes >= 0).all()


def test_topk_train_vs_test() -> None:
    rpn = _rpn(pre_nms_topk=(50, 10), post_nms_topk=(40, 5), nms_thresh=1.0)
    feats = _features(1, 128, 128)
    with torch.no_grad():
        rpn.train()
        (p_train,), _ = rpn([(128, 128)], feats)
        rpn.eval()
        (p_test,), _ = rpn([(128, 128)], feats)
    assert len(p_train) == 40 and len(p_test) == 5


def test_all_crowd_image_has_no_positives_and_ignores_crowd_anchors() -> None:
    rpn = _rpn(tv_style=False)
    feats = _features(1, 128, 128)
    anchors = torch.cat(rpn.anchor_generator([feats[k] for k in NAMES]))
    crowd = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    tgt = Targets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), ignore_boxes=crowd)
    labels, _ = rpn.label_anchors(anchors, [tgt])
    labels = labels[0]
    assert not (labels == 1).any()
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= 64) & (anchors[:, 3] <= 64)
    assert inside.any() and (labels[inside] == -1).all()
    far = anchors[:, 0] >= 64
    assert (labels[far] == 0).all()
    # a crowd box also does not demote positives
    tgt2 = Targets(boxes=torch.tensor([[0.0, 0.0, 32.0, 32.0]]), labels=torch.zeros(1, dtype=torch.int64),
                   ignore_boxes=crowd)
    labels2, gt = rpn.label_anchors(anchors, [tgt2])
    assert (labels2 == 1).any()
    torch.testing.assert_close(gt[labels2 == 1][0], tgt2.boxes[0])


def test_empty_image_loss_is_finite() -> None:
    rpn = _rpn().train()
    feats = _features(2, 128, 128)
    empty = Targets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))
    _, losses = rpn([(128, 128)] * 2, feats, [empty, empty])
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"] > 0
    assert losses["loss_rpn_loc"] == 0
    sum(losses.values()).backward()
    assert rpn.head.objectness.weight.grad is not None


def test_losses_decrease_when_overfitting() -> None:
    torch.manual_seed(0)
    rpn = _rpn(smooth_l1_beta=0.0).train()
    feats = _features(2, 128, 128)
    targets = [
        Targets(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]), labels=torch.zeros(2, dtype=torch.int64)),
        Targets(boxes=torch.tensor([[30.0, 30.0, 100.0, 110.0]]), labels=torch.zeros(1, dtype=torch.int64)),
    ]
    opt = torch.optim.Adam(rpn.parameters(), lr=1e-2)
    history = []
    for _ in range(40):
        _, losses = rpn([(128, 128)] * 2, feats, targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    for k in ("loss_rpn_cls", "loss_rpn_loc"):
        first = sum(h[k] for h in history[:5]) / 5
        last = sum(h[k] for h in history[-5:]) / 5
        assert last < 0.5 * first, (k, first, last)
