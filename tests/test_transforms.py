"""Augmentation keeps image, boxes, labels, masks and crowd boxes consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detkit.config.schema import ClsInputConfig, InputConfig
from detkit.data.transforms import (
    DetectionTransform,
    LargeScaleJitter,
    ResizeShortestEdge,
    build_classification_transform,
    build_detection_transform,
    resize_shortest_edge,
)


def _scene(h: int = 90, w: int = 140) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image, boxes, labels, masks with an ellipse, a rectangle and a small blob near the bottom-right."""
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((3, h, w), np.uint8)
    masks[0] = ((xx - 30) / 20.0) ** 2 + ((yy - 30) / 12.0) ** 2 <= 1
    masks[1, 50:80, 60:110] = 1
    masks[2, 80:88, 128:138] = 1
    boxes = np.array([_mask_box(m) for m in masks], np.float32)
    return img, boxes, np.array([5, 6, 7]), masks


def _mask_box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _assert_consistent(out, tol: float = 2.0) -> None:
    n = len(out.boxes)
    assert out.labels.shape == (n,) and out.masks.shape == (n,) + out.image.shape[:2]
    for b, m in zip(out.boxes, out.masks):
        assert m.sum() > 0
        np.testing.assert_allclose(_mask_box(m), b, atol=tol)


def test_resize_shortest_edge_sizes() -> None:
    assert resize_shortest_edge(480, 640, 800, 1333) == (800, 1067)
    assert resize_shortest_edge(100, 1000, 800, 1333) == (133, 1333)  # capped by the long side
    assert resize_shortest_edge(640, 480, 800, 0) == (1067, 800)  # no cap
    with pytest.raises(ValueError):
        resize_shortest_edge(0, 10, 800, 1333)


def test_floor_rounding_matches_torchvision() -> None:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    tv = GeneralizedRCNNTransform(800, 1333, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]).eval()
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (427, 640), (333, 500), (612, 612), (100, 1000)] + [
        tuple(int(v) for v in rng.integers(20, 140, 2)) for _ in range(25)
    ]
    for h, w in sizes:
        images, _ = tv([torch.zeros(3, h, w)])
        assert resize_shortest_edge(h, w, 800, 1333, rounding="floor") == images.image_sizes[0], (h, w)


def test_resize_and_flip_keep_masks_and_boxes_consistent() -> None:
    img, boxes, labels, masks = _scene()
    crowd = np.array([[100.0, 5.0, 130.0, 25.0]], np.float32)
    tf = build_detection_transform(InputConfig(min_size_train=[180], max_size_train=1000, hflip_prob=1.0), True, seed=0)
    out = tf(img, boxes, labels, masks, crowd)
    assert out.image.shape == (180, 280, 3)
    _assert_consistent(out, tol=1.5)
    assert out.labels.tolist() == [5, 6, 7]
    # flipped: x -> W - x, then scaled by 2
    exp = boxes.copy()
    exp[:, [0, 2]] = 140 - boxes[:, [2, 0]]
    np.testing.assert_allclose(out.boxes, exp * 2, atol=1e-3)
    np.testing.assert_allclose(out.ignore_boxes, [[20.0, 10.0, 80.0, 50.0]], atol=1e-3)
    # the image really moved with them: a resized+flipped pixel matches the original
    np.testing.assert_array_equal(out.image[0, 0], img[0, -1])


def test_multiscale_choices_and_test_transform() -> None:
    img, boxes, labels, masks = _scene()
    tf = build_detection_transform(InputConfig(min_size_train=[45, 90, 180], max_size_train=1000, hflip_prob=0.5), True, seed=1)
    shorts = {tf(img, boxes, labels, masks).image.shape[0] for _ in range(30)}
    assert shorts == {45, 90, 180}
    test = build_detection_transform(InputConfig(min_size_test=60, max_size_test=80), False)
    a, b = test(img, boxes, labels, masks), test(img, boxes, labels, masks)
    assert a.image.shape == (51, 80, 3)  # capped by max_size: scale 80/140
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert test(img).boxes is None and test(img).image.shape == (51, 80, 3)


def test_same_seed_same_augmentation() -> None:
    img, boxes, labels, masks = _scene()
    cfg = InputConfig(min_size_train=[60, 90, 120], max_size_train=1000, hflip_prob=0.5, color_jitter=0.4)
    t1, t2 = build_detection_transform(cfg, True, seed=3), build_detection_transform(cfg, True, seed=3)
    for _ in range(5):
        a, b = t1(img, boxes, labels, masks), t2(img, boxes, labels, masks)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)


def test_color_jitter_changes_pixels_not_geometry() -> None:
    img, boxes, labels, masks = _scene()
    cfg = InputConfig(min_size_train=[90], max_size_train=1000, hflip_prob=0.0, color_jitter=0.5)
    tf = build_detection_transform(cfg, True, seed=0)
    outs = [tf(img, boxes, labels, masks) for _ in range(5)]
    assert any(not np.array_equal(o.image, img) for o in outs)
    for o in outs:
        np.testing.assert_allclose(o.boxes, boxes, atol=1e-3)
        np.testing.assert_array_equal(o.masks, masks)


def test_lsj_removes_cropped_away_instances_with_their_masks() -> None:
    img, boxes, labels, masks = _scene()
    tf = DetectionTransform([LargeScaleJitter(96, (1.5, 2.5))], seed=0)
    removed = 0
    for _ in range(40):
        out = tf(img, boxes, labels, masks, np.array([[120.0, 0.0, 140.0, 10.0]]))
        assert out.image.shape == (96, 96, 3)
        _assert_consistent(out, tol=0.0)  # LSJ recomputes boxes from the cropped masks
        assert set(out.labels.tolist()) <= {5, 6, 7} and len(set(out.labels.tolist())) == len(out.labels)
        assert ((out.boxes[:, 2:] - out.boxes[:, :2]) >= 1).all()
        assert (out.boxes >= 0).all() and (out.boxes <= 96).all()
        removed += 3 - len(out.boxes)
    assert removed > 0  # with 2x zoom into a 96 crop, some instances must fall outside


def test_lsj_small_scale_pads() -> None:
    img, boxes, labels, masks = _scene()
    out = DetectionTransform([LargeScaleJitter(200, (0.5, 0.5))], seed=0)(img, boxes, labels, masks)
    # fit into 100x100: scale = 100/140 -> 64 x 100, padded with zeros to 200 x 200
    assert out.image.shape == (200, 200, 3)
    assert out.image[70:, :].max() == 0 and out.image[:, 110:].max() == 0
    assert out.labels.tolist() == [5, 6, 7]
    _assert_consistent(out, tol=1.0)  # boxes recomputed from the resized masks


def test_degenerate_box_after_resize_is_removed() -> None:
    img, boxes, labels, masks = _scene()
    boxes = np.concatenate([boxes, [[10.0, 10.0, 11.5, 40.0]]]).astype(np.float32)  # 1.5 px wide
    masks = np.concatenate([masks, np.zeros((1, 90, 140), np.uint8)])
    masks[3, 10:40, 10:12] = 1
    out = DetectionTransform([ResizeShortestEdge(45, 1000)])(img, boxes, np.array([5, 6, 7, 8]), masks)
    assert out.labels.tolist() == [5, 6, 7] and len(out.masks) == 3  # 0.75 px wide after halving


def test_empty_targets() -> None:
    img = np.zeros((30, 40, 3), np.uint8)
    tf = build_detection_transform(InputConfig(min_size_train=[60], max_size_train=1000, hflip_prob=1.0), True, seed=0)
    out = tf(img, np.zeros((0, 4)), np.zeros((0,), np.int64), np.zeros((0, 30, 40), np.uint8))
    assert out.image.shape == (60, 80, 3) and out.boxes.shape == (0, 4) and out.masks.shape == (0, 60, 80)


def test_classification_transforms() -> None:
    cfg = ClsInputConfig(size=32, resize_ratio=0.5)
    img = np.full((50, 70, 3), 128, np.uint8)
    val = build_classification_transform(cfg, is_train=False)(img)
    assert val.shape == (3, 32, 32) and val.dtype == torch.float32
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    torch.testing.assert_close(val[:, 0, 0], (128 - mean) / std)
    # val: short side to 64 then centre crop 32: the centre of a gradient image stays in the centre
    grad = np.repeat(np.linspace(0, 255, 70, dtype=np.float32)[None, :, None], 50, 0).repeat(3, 2).astype(np.uint8)
    v = build_classification_transform(cfg, is_train=False)(grad)
    centre = (v[0, 16, 16] * std[0] + mean[0]).item()
    assert abs(centre - 127.5) < 8
    train = build_classification_transform(cfg, is_train=True, seed=0)
    outs = [train(grad) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random crops differ
