"""Detectron2's inference conventions that the configs/detectron2 zoo configs select: its resize and its mask paste.

Detectron2 is not installed for the tests; the references are written out here from its documented
geometry (pixel-centre sampling, its two-step size rounding) and checked against PIL / direct sampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detkit.config import load_config
from detkit.data.transforms import ResizeShortestEdge, build_detection_transform, resize_shortest_edge
from detkit.models.roi_heads.mask_head import paste_masks_detectron2, paste_masks_in_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_detectron2_size_rounding() -> None:
    # the short side is set first; the cap rescales both afterwards: 302 x 604 -> 666 x 1333 (one-step: 667)
    assert resize_shortest_edge(302, 604, 800, 1333, "detectron2") == (666, 1333)
    assert resize_shortest_edge(302, 604, 800, 1333, "round") == (667, 1333)
    for h, w in [(480, 640), (640, 480), (427, 640), (1000, 300), (800, 800), (7, 3000)]:
        assert resize_shortest_edge(h, w, 800, 1333, "detectron2") == resize_shortest_edge(h, w, 800, 1333), (h, w)
    assert resize_shortest_edge(480, 640, 800, 0, "detectron2") == (800, 1067)  # no cap


def test_detectron2_resize_is_pils_bilinear() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    out = ResizeShortestEdge(160, 1333, style="detectron2")(image=img)["image"]
    ref = np.asarray(Image.fromarray(img).resize((267, 160), Image.BILINEAR))
    assert out.shape == (160, 267, 3) and np.array_equal(out, ref)
    cv = ResizeShortestEdge(160, 1333)(image=img)["image"]
    assert np.abs(cv.astype(int) - ref.astype(int)).max() > 10  # shrinking: PIL averages, cv2 samples

    cfg = load_config("configs/detectron2/mask_rcnn_R_50_FPN_3x.yaml")
    assert cfg.input.resize_style == "detectron2" and cfg.model.mask_paste == "detectron2"
    t = build_detection_transform(cfg.input, is_train=False)
    assert t(img).image.shape == (800, 1333, 3)


def _sample_at_pixel_centres(mask: np.ndarray, box: tuple[float, float, float, float], h: int, w: int) -> np.ndarray:
    """Direct reference: every output pixel centre mapped into the M x M mask, bilinear, zero outside."""
    m = mask.shape[0]
    x1, y1, x2, y2 = box
    out = np.zeros((h, w), dtype=np.float64)
    padded = np.pad(mask.astype(np.float64), 1)
    for y in range(h):
        for x in range(w):
            # mask coordinates of the pixel centre (align_corners=False): -0.5 .. m - 0.5 covers the mask
            mx = ((x + 0.5) - x1) / (x2 - x1) * m - 0.5
            my = ((y + 0.5) - y1) / (y2 - y1) * m - 0.5
            if not (-1 < mx < m and -1 < my < m):
                continue
            x0, y0 = int(np.floor(mx)), int(np.floor(my))
            fx, fy = mx - x0, my - y0
            p = padded[y0 + 1 : y0 + 3, x0 + 1 : x0 + 3]
            out[y, x] = (p[0, 0] * (1 - fx) * (1 - fy) + p[0, 1] * fx * (1 - fy)
                         + p[1, 0] * (1 - fx) * fy + p[1, 1] * fx * fy)
    return out


def test_detectron2_mask_paste_samples_at_pixel_centres() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 28, 28, generator=g)
    boxes = torch.tensor([[3.3, 4.7, 17.9, 15.2], [0.0, 0.0, 40.0, 30.0], [25.5, 20.25, 39.5, 29.75]])
    out = paste_masks_detectron2(masks, boxes, (30, 40), 0.5)
    assert out.shape == (3, 30, 40) and out.dtype == torch.bool
    for i in range(3):
        ref = _sample_at_pixel_centres(masks[i].numpy(), tuple(boxes[i].tolist()), 30, 40)
        near = np.abs(ref - 0.5) < 1e-5  # float ties at the threshold may fall either way
        assert np.array_equal(out[i].numpy()[~near], (ref >= 0.5)[~near]), i
    # on large boxes the two conventions agree almost everywhere; they are not the same function
    big = torch.zeros(1, 28, 28)
    big[0, 6:22, 4:24] = 1.0
    box = torch.tensor([[100.3, 80.6, 420.2, 390.9]])
    d2, tv = paste_masks_detectron2(big, box, (480, 640)), paste_masks_in_image(big, box, (480, 640))
    iou = (d2 & tv).sum() / (d2 | tv).sum()
    assert 0.97 < float(iou) < 1.0
