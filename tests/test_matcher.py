"""Matcher and subsample_labels edge cases."""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from detkit.models.matcher import Matcher, subsample_labels


def _rpn_matcher() -> Matcher:
    return Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)


def test_bands() -> None:
    m = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=False)
    iou = torch.tensor([[0.1, 0.3, 0.5, 0.7, 0.9], [0.2, 0.0, 0.6, 0.0, 0.95]])
    idx, lab = m(iou)
    assert lab.dtype == torch.int8 and idx.dtype == torch.int64
    assert lab.tolist() == [0, -1, -1, 1, 1]
    assert idx.tolist() == [1, 0, 1, 0, 1]


def test_no_gt_gives_all_negative() -> None:
    idx, lab = _rpn_matcher()(torch.zeros(0, 7))
    assert idx.shape == (7,) and lab.shape == (7,)
    assert (lab == 0).all()


def test_low_quality_matches_like_torchvision() -> None:
    gen = torch.Generator().manual_seed(0)
    iou = torch.rand(5, 40, generator=gen) * 0.6  # nothing above 0.7
    iou[2, 7] = iou[2].max()  # keep ties meaningful
    iou[2, 9] = iou[2, 7]  # an exact tie: both become positive
    idx, lab = _rpn_matcher()(iou)
    tv = TVMatcher(0.7, 0.3, allow_low_quality_matches=True)(iou.clone())
    # torchvision encodes positives as idx >= 0, negatives -1, between -2
    expected = torch.where(tv >= 0, 1, torch.where(tv == -1, 0, -1)).to(torch.int8)
    assert torch.equal(lab, expected)
    pos = lab == 1
    assert torch.equal(idx[pos], tv[pos])
    assert lab[7] == 1 and lab[9] == 1
    assert int(pos.sum()) >= 5 - 0  # every GT got at least one positive


def test_more_gt_than_anchors() -> None:
    iou = torch.rand(10, 3, generator=torch.Generator().manual_seed(3))
    idx, lab = _rpn_matcher()(iou)
    assert idx.shape == (3,)
    # every anchor is the best of some GT -> all positive, matched to its own argmax GT
    assert (lab == 1).all()
    assert torch.equal(idx, iou.argmax(dim=0))


def test_gt_without_overlap_does_not_make_everything_positive() -> None:
    iou = torch.zeros(2, 6)
    iou[0, 1] = 0.2
    idx, lab = _rpn_matcher()(iou)
    assert lab.tolist() == [0, 1, 0, 0, 0, 0]


def test_subsample_fractions() -> None:
    torch.manual_seed(0)
    labels = torch.full((1000,), -1, dtype=torch.int64)
    labels[:50] = 3  # positives (class 3)
    labels[50:900] = 10  # background label
    pos, neg = subsample_labels(labels, 256, 0.25, bg_label=10)
    assert pos.numel() == 50 and neg.numel() == 206  # positives scarce: negatives fill the budget
    assert (labels[pos] == 3).all() and (labels[neg] == 10).all()
    assert neg.unique().numel() == neg.numel()

    labels[:500] = 1
    labels[500:] = 0
    pos, neg = subsample_labels(labels, 256, 0.25, bg_label=0)
    assert pos.numel() == 64 and neg.numel() == 192

    # nothing to sample
    pos, neg = subsample_labels(torch.full((5,), -1), 256, 0.5, bg_label=0)
    assert pos.numel() == 0 and neg.numel() == 0


def test_subsample_is_random() -> None:
    labels = torch.zeros(1000, dtype=torch.int64)
    torch.manual_seed(0)
    _, a = subsample_labels(labels, 100, 0.5, bg_label=0)
    _, b = subsample_labels(labels, 100, 0.5, bg_label=0)
    assert not torch.equal(a.sort().values, b.sort().values)
