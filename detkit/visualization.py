"""Drawing helpers for detections, ground truth and contact sheets.

All functions take and return ``uint8 [H, W, 3]`` **RGB** numpy images and never
modify their input. Boxes, labels, scores and masks may be numpy arrays or
tensors (CPU or CUDA; they are moved to numpy here). Box coordinates are
``(x1, y1, x2, y2)`` pixels; a box edge is drawn on the pixel rows/columns
``round(x1)``, ``round(y1)``, ``round(x2)``, ``round(y2)`` (kept inside the image)
in the colour of its class (:func:`class_color`), so a caller can find it again.

Only numpy, OpenCV and :mod:`detkit.structures` are used, so the module can be
imported by tools and by the training engine alike.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from detkit.structures import Detections, Targets

__all__ = [
    "class_color",
    "draw_detections",
    "draw_ground_truth",
    "draw_instances",
    "draw_detections_struct",
    "draw_targets",
    "make_contact_sheet",
]

_GOLDEN = 0.618033988749895


def class_color(label: int) -> tuple[int, int, int]:
    """Deterministic, well-separated RGB colour for a class index (same on every run)."""
    hue = (0.05 + int(label) * _GOLDEN) % 1.0
    sat = 0.85 if int(label) % 2 == 0 else 0.65
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _to_numpy(x: Any) -> Optional[np.ndarray]:
    """Tensor / array / list -> numpy array (None stays None). Avoids importing torch here."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch.Tensor on any device
        x = x.detach()
        if hasattr(x, "float") and str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x)


def _check_image(image: Any) -> np.ndarray:
    img = _to_numpy(image)
    if img is None or img.ndim != 3 or img.shape[2] != 3:
        shape = None if img is None else tuple(img.shape)
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got shape {shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img).copy()


def _line_thickness(h: int, w: int) -> int:
    return max(1, int(round((h + w) / 2 * 0.003)))


def _edge_pixels(box: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel columns/rows of a box's edges: rounded, and kept inside the image so that boxes
    touching the border (x2 == width after clipping) stay visible."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return (min(max(x1, 0), w - 1), min(max(y1, 0), h - 1), min(max(x2, 0), w - 1), min(max(y2, 0), h - 1))


def _caption_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on ``color``."""
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _draw_caption(
    img: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int], below: bool = False,
    scale: Optional[float] = None,
) -> None:
    """Filled caption box in ``color`` whose bottom-left corner sits at (x, y), or whose top-left
    corner does when ``below`` or when there is no room above (kept inside the image)."""
    h, w = img.shape[:2]
    scale = scale if scale is not None else max(0.35, min(h, w) / 900.0)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    box_h = th + base + 2
    top = y - box_h
    if top < 0 or below:  # no room above the box: put the caption just inside it
        top = min(max(y, 0), max(h - box_h, 0))
    left = min(max(x, 0), max(w - tw - 2, 0))
    cv2.rectangle(img, (left, top), (left + tw + 2, top + box_h), color, thickness=-1)
    cv2.putText(
        img, text, (left + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
        _caption_color(color), 1, cv2.LINE_AA,
    )


def draw_instances(
    image: Any,
    boxes: Any,
    labels: Any,
    scores: Any = None,
    masks: Any = None,
    class_names: Optional[Sequence[str]] = None,
    alpha: float = 0.5,
    captions: bool = True,
) -> np.ndarray:
    """Draw boxes, captions and translucent masks on a copy of ``image``.

    Args:
        image: uint8 [H, W, 3] RGB.
        boxes: [N, 4] xyxy pixels.
        labels: [N] contiguous class indices.
        scores: [N] or None (captions then show only the class name).
        masks: [N, H, W] bool/uint8/float (> 0.5 is inside), or None.
        class_names: names indexed by label; the label number is shown when missing.
        alpha: mask opacity.
        captions: draw "name score" captions.

    Returns:
        a new uint8 [H, W, 3] RGB image. Instances are drawn in increasing score
        order so the most confident one ends on top.
    """
    img = _check_image(image)
    h, w = img.shape[:2]
    b = _to_numpy(boxes)
    b = np.zeros((0, 4), np.float32) if b is None else b.reshape(-1, 4).astype(np.float64)
    lab = _to_numpy(labels)
    lab = np.zeros((0,), np.int64) if lab is None else lab.reshape(-1).astype(np.int64)
    sc = _to_numpy(scores)
    sc = None if sc is None else sc.reshape(-1).astype(np.float64)
    m = _to_numpy(masks)
    n = b.shape[0]
    if lab.shape[0] != n or (sc is not None and sc.shape[0] != n):
        raise ValueError(
            f"boxes ({n}), labels ({lab.shape[0]}) and scores ({None if sc is None else sc.shape[0]}) "
            "must have the same length"
        )
    if m is not None:
        if m.ndim == 4 and m.shape[1] == 1:  # (N, 1, H, W) -> (N, H, W)
            m = m[:, 0]
        if m.ndim != 3 or m.shape[0] != n or m.shape[1:] != (h, w):
            raise ValueError(
                f"masks must be [N, H, W] = [{n}, {h}, {w}] pasted at image resolution, got {tuple(m.shape)}"
            )
        if m.dtype != np.bool_:
            m = m > 0.5
    order = np.argsort(sc, kind="stable") if sc is not None else np.arange(n)

    # masks first (blended), then box outlines and captions at full colour on top
    if m is not None and n > 0:
        overlay = img.astype(np.float32)
        for i in order:
            color = np.asarray(class_color(int(lab[i])), np.float32)
            overlay[m[i]] = (1.0 - alpha) * overlay[m[i]] + alpha * color
        img = np.clip(np.rint(overlay), 0, 255).astype(np.uint8)

    thickness = _line_thickness(h, w)
    for i in order:
        color = class_color(int(lab[i]))
        if not np.isfinite(b[i]).all():
            continue
        x1, y1, x2, y2 = _edge_pixels(b[i], h, w)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thickness, lineType=cv2.LINE_8)
    if captions:
        for i in order:
            if not np.isfinite(b[i]).all():
                continue
            k = int(lab[i])
            name = class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)
            text = name if sc is None else f"{name} {sc[i]:.2f}"
            _draw_caption(img, text, int(round(b[i, 0])), int(round(b[i, 1])), class_color(k))
    return img


def draw_detections(
    image: Any,
    boxes: Any,
    labels: Any,
    scores: Any,
    masks: Any = None,
    class_names: Optional[Sequence[str]] = None,
    score_thresh: float = 0.5,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw the detections scoring at least ``score_thresh`` on a copy of an RGB image.

    Boxes get a "name score" caption and the class colour; masks (bool [N, H, W],
    pasted) are blended with opacity ``alpha``. See :func:`draw_instances`.
    """
    sc = _to_numpy(scores)
    sc = np.zeros((0,), np.float64) if sc is None else sc.reshape(-1).astype(np.float64)
    keep = sc >= score_thresh
    b = _to_numpy(boxes)
    lab = _to_numpy(labels)
    m = _to_numpy(masks)
    b = np.zeros((0, 4)) if b is None else b.reshape(-1, 4)
    lab = np.zeros((0,), np.int64) if lab is None else lab.reshape(-1)
    if b.shape[0] != sc.shape[0] or lab.shape[0] != sc.shape[0]:
        raise ValueError(f"boxes ({b.shape[0]}), labels ({lab.shape[0]}) and scores ({sc.shape[0]}) differ in length")
    return draw_instances(
        image, b[keep], lab[keep], sc[keep], None if m is None else m[keep], class_names, alpha=alpha
    )


def draw_ground_truth(
    image: Any,
    boxes: Any,
    labels: Any,
    masks: Any = None,
    class_names: Optional[Sequence[str]] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw ground-truth boxes (captioned with the class name) and masks on a copy of an RGB image."""
    return draw_instances(image, boxes, labels, None, masks, class_names, alpha=alpha)


def draw_detections_struct(
    image: Any, det: Detections, class_names: Optional[Sequence[str]] = None, score_thresh: float = 0.5
) -> np.ndarray:
    """:func:`draw_detections` for a :class:`~detkit.structures.Detections` (or any object with
    ``.boxes .labels .scores .masks``); masks must be pasted (bool [N, H, W]) to be drawn."""
    masks = det.masks
    if masks is not None and masks.ndim == 4:  # unpasted [N, 1, M, M] probabilities: skip them
        masks = None
    return draw_detections(image, det.boxes, det.labels, det.scores, masks, class_names, score_thresh)


def draw_targets(image: Any, targets: Targets, class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """:func:`draw_ground_truth` for a :class:`~detkit.structures.Targets`; crowd regions are
    drawn as thin grey boxes."""
    img = draw_ground_truth(image, targets.boxes, targets.labels, targets.masks, class_names)
    ign = _to_numpy(targets.ignore_boxes)
    if ign is not None and ign.size:
        for x1, y1, x2, y2 in ign.reshape(-1, 4):
            cv2.rectangle(img, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), (128, 128, 128), 1)
    return img


def make_contact_sheet(
    images: Sequence[Any],
    cols: int = 4,
    cell_size: int = 256,
    titles: Optional[Sequence[str]] = None,
    gap: int = 4,
    background: tuple[int, int, int] = (32, 32, 32),
) -> np.ndarray:
    """Tile RGB images into one grid image.

    Each image is resized to fit a ``cell_size`` x ``cell_size`` cell keeping its
    aspect ratio, centred, with ``gap`` pixels between cells.

    Args:
        images: uint8 [H, W, 3] RGB images (at least one).
        cols: number of columns (fewer if there are fewer images).
        cell_size: side of each square cell in pixels.
        titles: optional caption drawn at the top-left of each cell.

    Returns:
        uint8 [rows * (cell + gap) + gap, cols * (cell + gap) + gap, 3] RGB.
    """
    if len(images) == 0:
        raise ValueError("make_contact_sheet needs at least one image")
    if cols < 1 or cell_size < 8:
        raise ValueError(f"cols must be >= 1 and cell_size >= 8, got cols={cols}, cell_size={cell_size}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    step = cell_size + gap
    sheet = np.empty((rows * step + gap, cols * step + gap, 3), np.uint8)
    sheet[:] = background
    for i, im in enumerate(images):
        img = _check_image(im)
        h, w = img.shape[:2]
        s = cell_size / max(h, w)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        r, c = divmod(i, cols)
        top = gap + r * step + (cell_size - nh) // 2
        left = gap + c * step + (cell_size - nw) // 2
        sheet[top : top + nh, left : left + nw] = img
        if titles is not None and titles[i]:
            _draw_caption(sheet, str(titles[i]), gap + c * step, gap + r * step, (255, 255, 255), below=True,
                          scale=max(0.35, cell_size / 900.0))
    return sheet
