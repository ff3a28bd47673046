"""COCO-style detection and instance segmentation evaluation.

:class:`COCOEvaluator` turns per-image :class:`~detkit.structures.Detections` (already in
original image pixels, contiguous labels in ``[0, K)``) into COCO result dicts
(:func:`~detkit.evaluation.results.detections_to_coco`), gathers them
across processes under ``torch.distributed`` and runs ``COCOeval`` from pycocotools (or the
API-compatible ``faster-coco-eval`` package) on rank 0.

Metric keys (all in percent, floats)::

    bbox/AP bbox/AP50 bbox/AP75 bbox/APs bbox/APm bbox/APl
    bbox/AR1 bbox/AR10 bbox/AR100 bbox/ARs bbox/ARm bbox/ARl
    bbox/AP-<class name>          (one per class)

and the same with the ``segm/`` prefix. A summary number that COCOeval reports as ``-1``
(nothing to measure, e.g. no small ground truth among the evaluated images) and the AP of a
class without ground truth among the evaluated images are reported as ``nan``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.structures import Detections

from ..fileio import write_json_atomic
from .results import detections_to_coco

__all__ = ["COCOEvaluator", "format_coco_table", "format_per_class_table", "SUMMARY_KEYS"]

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")

# The 12 numbers of COCOeval.summarize(), in order: (key, AP or AR, IoU label, area, maxDets).
_SUMMARY = (
    ("AP", "AP", "0.50:0.95", "all", 100),
    ("AP50", "AP", "0.50", "all", 100),
    ("AP75", "AP", "0.75", "all", 100),
    ("APs", "AP", "0.50:0.95", "small", 100),
    ("APm", "AP", "0.50:0.95", "medium", 100),
    ("APl", "AP", "0.50:0.95", "large", 100),
    ("AR1", "AR", "0.50:0.95", "all", 1),
    ("AR10", "AR", "0.50:0.95", "all", 10),
    ("AR100", "AR", "0.50:0.95", "all", 100),
    ("ARs", "AR", "0.50:0.95", "small", 100),
    ("ARm", "AR", "0.50:0.95", "medium", 100),
    ("ARl", "AR", "0.50:0.95", "large", 100),
)
SUMMARY_KEYS: tuple[str, ...] = tuple(s[0] for s in _SUMMARY)

CocoLike = Union[str, os.PathLike, COCO, Any]


def _backend_classes(backend: str) -> tuple[type, type]:
    """(COCO class, COCOeval class) of an evaluation backend."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as e:
            raise ImportError(
                "COCO evaluation backend 'faster_coco_eval' (test.eval_backend) is selected but the "
                "package is not importable: `pip install faster-coco-eval` or set "
                "test.eval_backend=pycocotools"
            ) from e
        return FasterCOCO, COCOeval_faster
    raise ValueError(f"unknown COCO evaluation backend {backend!r} (test.eval_backend): use one of {BACKENDS}")


def _load_gt(coco_gt: CocoLike, coco_cls: type) -> tuple[Any, str]:
    """Ground truth as an instance of ``coco_cls`` plus a name for error messages."""
    if isinstance(coco_gt, (str, os.PathLike)):
        path = Path(coco_gt)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotations file {str(path)!r} does not exist: check data.val.annotations")
        try:
            with open(path, encoding="utf-8") as f:
                dataset = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"COCO annotations file {str(path)!r} is not valid JSON ({e}): fix or regenerate it"
            ) from e
        source = str(path)
    elif isinstance(coco_gt, coco_cls):
        return coco_gt, "<COCO object>"
    elif isinstance(getattr(coco_gt, "dataset", None), dict):
        # a COCO object of the other backend: rebuild from a copy of its dataset dict
        dataset, source = copy.deepcopy(coco_gt.dataset), "<COCO object>"
    else:
        raise TypeError(f"coco_gt must be a path to a COCO json file or a COCO object, got {type(coco_gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"COCO annotations {source!r} lack the list {key!r}: not a COCO instances file")
    gt = coco_cls()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, source


def _empty_results(gt: Any) -> Any:
    """A result COCO object with no detections (``loadRes([])`` crashes in pycocotools)."""
    res = type(gt)()
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _percent(v: float) -> float:
    """COCOeval number (fraction, -1 for "nothing to measure") -> percent or nan."""
    v = float(v)
    return v * 100.0 if v >= 0 else math.nan


class COCOEvaluator:
    """Accumulates detections image by image and computes COCO metrics.

    Args:
        coco_gt: path to a COCO instances json file, or a loaded COCO object (pycocotools or
            faster-coco-eval; the other kind is converted from a copy of its ``dataset``).
        category_ids: COCO category id of each contiguous label: label ``i`` is written as
            ``category_ids[i]``. Every id must exist in the annotations. Only these categories
            are evaluated.
        class_names: display name of each label (same length as ``category_ids``, unique),
            used in the per-class keys ``<iou_type>/AP-<name>``.
        iou_types: subset of ``("bbox", "segm")``. ``segm`` needs pasted masks.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"`` (same numbers, faster).
        distributed: ``None`` gathers across ranks when ``torch.distributed`` is initialized
            with more than one process; ``False`` never gathers (every rank evaluates its
            own images); ``True`` requires an initialized process group.
    """

    def __init__(
        self,
        coco_gt: CocoLike,
        category_ids: Sequence[int],
        class_names: Sequence[str],
        iou_types: Sequence[str] = ("bbox", "segm"),
        backend: str = "pycocotools",
        distributed: Optional[bool] = None,
    ) -> None:
        self._coco_cls, self._eval_cls = _backend_classes(backend)
        self.backend = backend
        self._gt, self._source = _load_gt(coco_gt, self._coco_cls)
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(f"iou_types={tuple(iou_types)!r}: use a non-empty subset of {IOU_TYPES}")
        self.iou_types: tuple[str, ...] = tuple(dict.fromkeys(iou_types))
        self.category_ids: list[int] = [int(c) for c in category_ids]
        self.class_names: list[str] = [str(n) for n in class_names]
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(
                f"COCOEvaluator got {len(self.category_ids)} category_ids but {len(self.class_names)} "
                "class_names: pass the dataset's category_ids and class_names together"
            )
        if not self.category_ids:
            raise ValueError("COCOEvaluator needs at least one category id")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"duplicate ids in category_ids={self.category_ids}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"duplicate names in class_names={self.class_names}")
        missing = sorted(set(self.category_ids) - set(self._gt.getCatIds()))
        if missing:
            raise ValueError(
                f"category ids {missing} are not in the categories of {self._source!r}: "
                "category_ids must come from the same annotations file"
            )
        self.distributed = distributed
        self._predictions: dict[int, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ accumulate
    def reset(self) -> None:
        """Forget every processed image."""
        self._predictions = {}

    @property
    def processed_image_ids(self) -> list[int]:
        """Ids of the images processed on this process (since the last reset)."""
        return list(self._predictions)

    @property
    def results(self) -> list[dict[str, Any]]:
        """COCO result dicts (``image_id, category_id, bbox`` xywh, ``score``, ``segmentation``
        RLE when masks were given) of this process; on rank 0 after a distributed
        :meth:`evaluate`, those of all processes. Do not mutate them."""
        return [r for rs in self._predictions.values() for r in rs]

    def process(self, image_ids: Sequence[int], detections: Sequence[Detections]) -> None:
        """Convert the detections of a batch of images to COCO results and keep them.

        Args:
            image_ids: dataset image id of each image.
            detections: per-image detections in ORIGINAL image pixels; boxes xyxy, labels in
                ``[0, K)``; masks (needed for ``segm``) bool ``[N, H, W]`` at the original size.
                Processing an image id again replaces its earlier results.
        """
        if len(image_ids) != len(detections):
            raise ValueError(f"process() got {len(image_ids)} image ids but {len(detections)} detections")
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            self._predictions[image_id] = self._to_coco_results(image_id, det)

    def _to_coco_results(self, image_id: int, det: Detections) -> list[dict[str, Any]]:
        img = self._gt.imgs.get(image_id)
        if img is None:
            raise ValueError(
                f"image id {image_id} is not in {self._source!r}: pass the dataset's image ids to process()"
            )
        n = len(det)
        if n == 0:
            return []
        masks = self._checked_masks(image_id, img, det.masks, n) if "segm" in self.iou_types else None
        return detections_to_coco(image_id, det.boxes, det.scores, det.labels, self.category_ids, masks)

    @staticmethod
    def _checked_masks(image_id: int, img: dict, masks: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """The bool [N, H, W] masks pasted at the image's size; a clear error for anything else."""
        if masks is None:
            raise ValueError(
                f"image {image_id}: detections have no masks but iou_types includes 'segm': "
                "evaluate Faster R-CNN with iou_types=('bbox',)"
            )
        h, w = img.get("height"), img.get("width")
        if masks.dim() != 3 or masks.shape[0] != n or (h is not None and tuple(masks.shape[1:]) != (h, w)):
            raise ValueError(
                f"image {image_id}: masks have shape {tuple(masks.shape)}, expected bool ({n}, {h}, {w}) "
                "pasted at the original image size (paste mask probabilities before evaluation)"
            )
        return masks

    # ------------------------------------------------------------------ evaluate
    def _use_distributed(self) -> bool:
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed is True and not ready:
            raise RuntimeError(
                "COCOEvaluator(distributed=True) but torch.distributed is not initialized: "
                "initialize the process group first or pass distributed=None"
            )
        return ready and self.distributed is not False and dist.get_world_size() > 1

    def _gather(self) -> Optional[dict[int, list[dict[str, Any]]]]:
        """All processes' results on rank 0 (deduplicated by image id); None on other ranks."""
        if not self._use_distributed():
            return self._predictions
        parts: list[Optional[dict[int, list[dict[str, Any]]]]] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._predictions)
        if dist.get_rank() != 0:
            return None
        merged: dict[int, list[dict[str, Any]]] = {}
        for part in parts:
            for image_id, res in (part or {}).items():
                merged.setdefault(image_id, res)  # padded samplers repeat images: keep one copy
        return merged

    def evaluate(self) -> dict[str, float]:
        """Run COCOeval on the processed images; returns the metrics on rank 0, ``{}`` elsewhere.

        Must be called on every rank when distributed (it gathers). Only the processed images
        are evaluated; an image without ground truth still counts its false positives.
        An iou type without any detection scores 0 (where ground truth exists).
        """
        merged = self._gather()
        if merged is None:
            return {}
        self._predictions = dict(sorted(merged.items()))
        image_ids = list(self._predictions)
        if not image_ids:
            logger.warning("COCOEvaluator.evaluate(): no images were processed; returning no metrics")
            return {}
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            results = self._results_for(iou_type)
            coco_eval = self._run_cocoeval(iou_type, results, image_ids)
            for key, value in zip(SUMMARY_KEYS, coco_eval.stats):
                metrics[f"{iou_type}/{key}"] = _percent(value)
            metrics.update(self._per_class_ap(coco_eval, iou_type))
        return metrics

    def _results_for(self, iou_type: str) -> list[dict[str, Any]]:
        """Fresh result dicts for one iou type (COCO.loadRes adds keys to what it is given).

        For ``segm`` the box is left out so that COCOeval sizes the instance (small/medium/
        large) by its mask area, not its box area (as Detectron2 does).
        """
        field = "bbox" if iou_type == "bbox" else "segmentation"
        return [
            {"image_id": r["image_id"], "category_id": r["category_id"], field: r[field], "score": r["score"]}
            for r in self.results
        ]

    def _run_cocoeval(self, iou_type: str, results: list[dict[str, Any]], image_ids: list[int]) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self._gt.loadRes(results) if results else _empty_results(self._gt)
            coco_eval = self._eval_cls(self._gt, coco_dt, iou_type)
            coco_eval.params.imgIds = image_ids
            coco_eval.params.catIds = sorted(self.category_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval

    def _per_class_ap(self, coco_eval: Any, iou_type: str) -> dict[str, float]:
        """AP per class over IoU 0.50:0.95, area all, maxDets 100; nan without ground truth."""
        params = coco_eval.params
        precision = np.asarray(coco_eval.eval["precision"])  # (T IoUs, R recalls, K cats, A areas, M maxDets)
        area = list(params.areaRngLbl).index("all")
        max_dets = list(params.maxDets)
        m = max_dets.index(100) if 100 in max_dets else len(max_dets) - 1
        cat_index = {int(c): k for k, c in enumerate(params.catIds)}
        out = {}
        for name, cat in zip(self.class_names, self.category_ids):
            p = precision[:, :, cat_index[cat], area, m]
            p = p[p > -1]
            out[f"{iou_type}/AP-{name}"] = float(np.mean(p)) * 100.0 if p.size else math.nan
        return out

    def write_results(self, path: Union[str, os.PathLike]) -> None:
        """Write :attr:`results` as a COCO results JSON file (atomically)."""
        write_json_atomic(path, self.results)


# ---------------------------------------------------------------------- tables
def _iou_types_in(metrics: dict[str, float]) -> list[str]:
    types = []
    for key in metrics:
        prefix, _, name = key.partition("/")
        if name == "AP" and prefix not in types:
            types.append(prefix)
    return types


def format_coco_table(metrics: dict[str, float]) -> str:
    """The 12-line COCOeval summary (pycocotools' layout) for every iou type in ``metrics``.

    Values are printed as fractions with 3 decimals like pycocotools; nan prints as -1.000.
    """
    line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    blocks = []
    for iou_type in _iou_types_in(metrics):
        lines = [f"{iou_type}:"]
        for key, kind, iou, area, max_dets in _SUMMARY:
            v = metrics.get(f"{iou_type}/{key}", math.nan)
            v = -1.0 if math.isnan(v) else v / 100.0
            title = "Average Precision" if kind == "AP" else "Average Recall"
            lines.append(line.format(title, f"({kind})", iou, area, max_dets, v))
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def format_per_class_table(metrics: dict[str, float], iou_type: Optional[str] = None, columns: int = 3) -> str:
    """Per-class AP as a markdown table with ``columns`` (class, AP) pairs per row.

    Args:
        metrics: output of :meth:`COCOEvaluator.evaluate`.
        iou_type: ``"bbox"`` or ``"segm"``; None formats every iou type present.
        columns: number of (class, AP) pairs per row.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    types = [iou_type] if iou_type is not None else _iou_types_in(metrics)
    blocks = []
    for t in types:
        prefix = f"{t}/AP-"
        items = [
            (k[len(prefix) :], "nan" if math.isnan(v) else f"{v:.3f}")
            for k, v in metrics.items()
            if k.startswith(prefix)
        ]
        if not items:
            continue
        cols = min(columns, len(items))
        name_w = max(len("category"), *(len(n) for n, _ in items))
        ap_w = max(len("AP"), *(len(a) for _, a in items))
        header = "|" + "".join(f" {'category':<{name_w}} | {'AP':<{ap_w}} |" for _ in range(cols))
        rule = "|" + "".join(f":{'-' * (name_w + 1)}|:{'-' * (ap_w + 1)}|" for _ in range(cols))
        rows = [f"Per-category {t} AP:", header, rule]
        for start in range(0, len(items), cols):
            chunk = items[start : start + cols] + [("", "")] * (cols - len(items[start : start + cols]))
            rows.append("|" + "".join(f" {n:<{name_w}} | {a:<{ap_w}} |" for n, a in chunk))
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)
