"""Detections -> COCO result records: the one conversion behind every COCO results file.

:func:`detections_to_coco` is used by :class:`~detkit.evaluation.COCOEvaluator` (what COCOeval
scores, ``results.json`` of ``eval_det.py``) and by ``tools/infer.py --save-json``. A record is::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float,
     ...extras..., "segmentation": {"size": [H, W], "counts": str}}

which pycocotools' ``COCO.loadRes`` reads as is.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch

__all__ = ["detections_to_coco", "encode_masks"]


def _numpy(x: Any, dtype: type) -> np.ndarray:
    """A torch tensor (any device / dtype) or array-like -> numpy array of ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float() if x.dtype == torch.bfloat16 else x  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x).astype(dtype, copy=False)


def encode_masks(masks: Any) -> list[dict[str, Any]]:
    """Instance masks (bool or 0/1, [N, H, W], torch or numpy) -> N compressed RLEs.

    Each RLE is ``{"size": [H, W], "counts": str}`` (counts decoded to ASCII, so JSON-ready).
    """
    m = _numpy(masks, bool)
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(m.shape)}")
    # (N, H, W) -> (H, W, N) Fortran-ordered uint8, the layout pycocotools encodes
    rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(
    image_id: int,
    boxes: Any,
    scores: Any,
    labels: Any,
    category_ids: Optional[Sequence[int]] = None,
    masks: Any = None,
    *,
    extras: Optional[Sequence[Mapping[str, Any]]] = None,
    bbox_decimals: Optional[int] = None,
    score_decimals: Optional[int] = None,
) -> list[dict[str, Any]]:
    """COCO result records of one image's detections, in detection order.

    Args:
        image_id: the image's COCO id.
        boxes: float [N, 4] xyxy pixels of the ORIGINAL image (torch or numpy; read as float32).
        scores: float [N].
        labels: int [N] contiguous labels in ``[0, K)``.
        category_ids: COCO category id of each label (``category_ids[label]``); None writes
            ``label + 1``.
        masks: bool [N, H, W] pasted at the original image size, or None (no ``segmentation``).
        extras: one mapping per detection whose items are added after ``score`` (before
            ``segmentation``), e.g. ``file_name``.
        bbox_decimals / score_decimals: round ``bbox`` / ``score`` to this many decimals; None
            keeps the float32 values of the detections.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", *extras, "segmentation"}]``;
        ``w = x2 - x1`` and ``h = y2 - y1`` are computed exactly (float64) and then rounded to
        float32 (equal to float32 arithmetic) or to ``bbox_decimals``.

    Raises:
        ValueError: shapes that disagree, or labels outside ``[0, len(category_ids))``.
    """
    score = _numpy(scores, np.float32).reshape(-1)
    n = score.shape[0]
    xyxy = _numpy(boxes, np.float32)
    if xyxy.shape != (n, 4):
        raise ValueError(f"image {image_id}: boxes have shape {tuple(xyxy.shape)}, expected ({n}, 4) xyxy")
    label = _numpy(labels, np.int64).reshape(-1)
    if label.shape[0] != n:
        raise ValueError(f"image {image_id}: {label.shape[0]} labels for {n} detections")
    if category_ids is not None and n and (int(label.min()) < 0 or int(label.max()) >= len(category_ids)):
        k = len(category_ids)
        raise ValueError(
            f"image {image_id}: detection labels span [{int(label.min())}, {int(label.max())}] but "
            f"category_ids has {k} entries: labels must be contiguous in [0, {k})"
        )
    if extras is not None and len(extras) != n:
        raise ValueError(f"image {image_id}: {len(extras)} extras for {n} detections")
    exact = xyxy.astype(np.float64)  # float32 coordinates: their differences are exact in float64
    xywh = np.concatenate([exact[:, :2], exact[:, 2:] - exact[:, :2]], axis=1)  # (N, 4) xyxy -> (N, 4) xywh
    if bbox_decimals is None:
        bbox = xywh.astype(np.float32).tolist()
    else:
        bbox = [[round(v, bbox_decimals) for v in row] for row in xywh.tolist()]
    score_list = score.tolist() if score_decimals is None else [round(s, score_decimals) for s in score.tolist()]
    cats = [int(category_ids[i]) for i in label.tolist()] if category_ids is not None else (label + 1).tolist()
    rles = encode_masks(masks) if masks is not None and n else None
    if rles is not None and len(rles) != n:
        raise ValueError(f"image {image_id}: {len(rles)} masks for {n} detections")
    records = []
    for i in range(n):
        rec: dict[str, Any] = {"image_id": int(image_id), "category_id": cats[i], "bbox": bbox[i], "score": score_list[i]}
        if extras is not None:
            rec.update(extras[i])
        if rles is not None:
            rec["segmentation"] = rles[i]
        records.append(rec)
    return records
