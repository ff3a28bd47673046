"""AnchorGenerator: hand-computed values, caching, and equality with torchvision's AnchorGenerator."""

from __future__ import annotations

import math

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detkit.models.anchors import AnchorGenerator


def _expected_cell(size: float, ratios: list[float], rounded: bool) -> list[list[float]]:
    out = []
    for r in ratios:  # ratio = h / w, area = size^2
        w = size / math.sqrt(r)
        h = size * math.sqrt(r)
        box = [-w / 2, -h / 2, w / 2, h / 2]
        out.append([float(round(v)) if rounded else v for v in box])
    return out


def test_hand_computed_2x2_stride16() -> None:
    ratios = [0.5, 1.0, 2.0]
    for rounded in (False, True):
        gen = AnchorGenerator(sizes=[[32]], aspect_ratios=[ratios], strides=[16], round_base=rounded)
        assert gen.num_anchors == [3]
        (anchors,) = gen([torch.zeros(1, 8, 2, 2)])
        assert anchors.shape == (2 * 2 * 3, 4) and anchors.dtype == torch.float32
        cell = _expected_cell(32, ratios, rounded)
        expected = []
        for y in (0, 16):  # location-major (row by row), anchor-minor
            for x in (0, 16):
                for c in cell:
                    expected.append([c[0] + x, c[1] + y, c[2] + x, c[3] + y])
        torch.testing.assert_close(anchors, torch.tensor(expected), atol=1e-5, rtol=0)
    # the unrounded ratio-0.5 anchor is 45.25 x 22.63; rounding gives -23,-11,23,11 at the origin
    assert _expected_cell(32, [0.5], True)[0] == [-23.0, -11.0, 23.0, 11.0]


def test_offset_and_cache() -> None:
    gen = AnchorGenerator(sizes=[[16]], aspect_ratios=[[1.0]], strides=[8], offset=0.5)
    feat = torch.zeros(2, 4, 3, 5)
    (a,) = gen([feat])
    torch.testing.assert_close(a[0], torch.tensor([-4.0, -4.0, 12.0, 12.0]))
    (b,) = gen([feat])
    assert a is b  # cached per (size, stride, device, dtype)
    (c,) = gen([torch.zeros(1, 4, 4, 5)])
    assert c.shape == (20, 4)


def test_bad_config_is_a_clear_error() -> None:
    try:
        AnchorGenerator(sizes=[[32], [64]], aspect_ratios=[[1.0]], strides=[4, 8, 16])
    except ValueError as e:
        assert "sizes" in str(e) and "3 levels" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_equals_torchvision_fpn_anchors() -> None:
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * 5
    tv = TVAnchorGenerator(sizes, ratios)
    ours = AnchorGenerator(
        [list(s) for s in sizes], [list(r) for r in ratios], [4, 8, 16, 32, 64], round_base=True,
        torchvision_strides=True,
    )
    # padded 800 x 1088 input: p6 is 13 x 17 (800 / 32 = 25 is odd), torchvision's p6 stride is (61, 64)
    h, w = 800, 1088
    feats = [torch.zeros(1, 1, h // s, w // s) for s in (4, 8, 16, 32)]
    feats.append(torch.zeros(1, 1, math.ceil(h / 64), math.ceil(w / 64)))
    image_list = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    ref = tv(image_list, feats)[0]
    got = torch.cat(ours(feats))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # with fixed strides only the p6 level differs
    fixed = AnchorGenerator([list(s) for s in sizes], [list(r) for r in ratios], [4, 8, 16, 32, 64], round_base=True)
    got_fixed = fixed(feats)
    n = sum(x.shape[0] for x in got_fixed[:4])
    torch.testing.assert_close(torch.cat(got_fixed[:4]), ref[:n], rtol=0, atol=0)
    assert not torch.equal(got_fixed[4], ref[n:])
