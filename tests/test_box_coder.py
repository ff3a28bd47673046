"""BoxCoder: round trip, clamping, multi-box decode, and equality with torchvision's BoxCoder."""

from __future__ import annotations

import math

import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from detkit.models.box_coder import BoxCoder


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 500
    wh = torch.rand(n, 2, generator=gen) * 200 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchors = _random_boxes(50, gen)
    gt = _random_boxes(50, gen)
    deltas = coder.encode(gt, anchors)
    assert deltas.shape == (50, 4)
    decoded = coder.decode(deltas, anchors)
    torch.testing.assert_close(decoded, gt, atol=1e-3, rtol=1e-5)


def test_identity_and_clamp() -> None:
    coder = BoxCoder()
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    torch.testing.assert_close(coder.encode(boxes, boxes), torch.zeros(1, 4))
    big = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), boxes)
    w = big[0, 2] - big[0, 0]
    # dw clamped at log(1000/16): width at most 40 * 62.5
    assert torch.isfinite(big).all()
    assert math.isclose(float(w), 40 * 1000 / 16, rel_tol=1e-5)


def test_matches_torchvision() -> None:
    gen = torch.Generator().manual_seed(1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        ours, tv = BoxCoder(weights), TVBoxCoder(weights)
        anchors = _random_boxes(64, gen)
        gt = _random_boxes(64, gen)
        torch.testing.assert_close(ours.encode(gt, anchors), tv.encode_single(gt, anchors), rtol=0, atol=0)
        # decode with k = 3 boxes per reference box, including deltas that hit the clamp
        deltas = torch.randn(64, 12, generator=gen) * 3
        ref = tv.decode_single(deltas, anchors)
        out = ours.decode(deltas, anchors)
        assert out.shape == (64, 12)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_low_precision_inputs_decode_in_float32() -> None:
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    boxes = torch.tensor([[1000.0, 700.0, 1200.0, 790.0]])
    deltas = torch.tensor([[0.1, -0.2, 0.05, 0.1]])
    ref = coder.decode(deltas, boxes)
    out = coder.decode(deltas.bfloat16(), boxes)
    assert out.dtype == torch.float32
    # bfloat16 coordinates near 1000 would be off by up to 4 px; deltas themselves lose < 1%
    torch.testing.assert_close(out, ref, atol=0.5, rtol=0)
