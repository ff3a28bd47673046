"""Building blocks of detection training and evaluation runs (``tools/train_det.py``, ``tools/eval_det.py``).

Each function turns a validated :class:`~detkit.config.DetectionConfig` into one
piece of a run (data, model, evaluator, hooks), so the tools stay short and the
same pieces serve training and stand-alone evaluation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_initial_weights
from ..config import DetectionConfig
from ..data.coco import CocoData, DatasetError, load_coco
from ..data.coco_dataset import CocoDetection
from ..data.samplers import build_detection_test_loader, build_detection_train_loader, repeat_factors
from ..data.transforms import build_detection_transform
from ..evaluation.coco_eval import COCOEvaluator
from ..fileio import write_json_atomic
from ..models.build import build_detector
from .distributed import barrier, batch_size_per_process, broadcast_buffers, get_world_size, is_main_process, unwrap_model
from .evaluate import inference_on_dataset

__all__ = [
    "resolve_data_paths",
    "load_split",
    "check_same_categories",
    "train_repeat_factors",
    "batch_size_per_process",
    "build_train_loader",
    "build_test_dataset",
    "build_test_loader",
    "build_model",
    "build_evaluator",
    "make_eval_fn",
    "visualization_samples",
    "write_metrics_json",
    "DetectionData",
    "eval_model",
]

logger = logging.getLogger("detkit.engine")


def resolve_data_paths(cfg: DetectionConfig) -> DetectionConfig:
    """Fill unset ``data.{train,val}.{annotations,images}`` from ``data.synthetic`` (generated once,
    by rank 0; later calls reuse it). Explicitly set paths are kept."""
    s = cfg.data.synthetic
    if s is None:
        return cfg
    from ..data.synthetic import make_shapes_coco

    kwargs = dict(num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed)
    if is_main_process():
        make_shapes_coco(s.root, **kwargs)
    barrier()
    paths = make_shapes_coco(s.root, **kwargs)
    cfg = cfg.model_copy(deep=True)
    for split in ("train", "val"):
        sc = getattr(cfg.data, split)
        if sc.annotations is None and sc.images is None:
            sc.annotations, sc.images = paths[f"{split}_annotations"], paths[f"{split}_images"]
    return cfg


def load_split(cfg: DetectionConfig, split: str, is_train: bool) -> CocoData:
    """Read and validate ``data.<split>``; a clear :class:`DatasetError` when it is not set.

    Several training files (lists in ``data.train``) are merged by class name, in the label space of
    ``data.class_names`` when it is set (see :func:`~detkit.data.coco.load_coco`)."""
    sc = getattr(cfg.data, split)
    for key in ("annotations", "images"):
        if not getattr(sc, key):
            raise DatasetError(
                f"data.{split}.{key} is not set: pass data.{split}.annotations=FILE.json and "
                f"data.{split}.images=FOLDER (or use a config with data.synthetic)"
            )
    several = isinstance(sc.annotations, list) and len(sc.annotations) > 1
    return load_coco(sc.annotations, sc.images, filter_empty=cfg.data.filter_empty, is_train=is_train,
                     class_names=cfg.data.class_names if several else None)


def check_same_categories(train: CocoData, val: CocoData) -> None:
    """Labels are shared between splits: the category ids must be identical (the class names, in the same
    order, when the training set merges several files)."""
    if len(train.sets) > 1:
        if list(train.class_names) != list(val.class_names):
            only_t = [n for n in train.class_names if n not in val.class_names]
            only_v = [n for n in val.class_names if n not in train.class_names]
            raise DatasetError(
                f"{val.annotations_path}: its classes differ from the training files' (only in training: {only_t}, "
                f"only in val: {only_v}); evaluate on a file with the training classes")
        return
    if list(train.category_ids) != list(val.category_ids):
        only_t = sorted(set(train.category_ids) - set(val.category_ids))
        only_v = sorted(set(val.category_ids) - set(train.category_ids))
        raise DatasetError(
            f"categories differ between {train.annotations_path} and {val.annotations_path} "
            f"(ids only in train: {only_t}, only in val: {only_v}); both files need the same 'categories'"
        )


def train_repeat_factors(cfg: DetectionConfig, data: CocoData) -> Optional[np.ndarray]:
    """float64 [N] repeat factors of the training images for ``dataloader.sampler=repeat_factor``, else None."""
    if cfg.dataloader.sampler != "repeat_factor":
        return None
    inst = data.records.instances
    return repeat_factors(inst.labels, inst.offsets, data.num_classes, cfg.dataloader.repeat_threshold)


def build_train_loader(cfg: DetectionConfig, data: CocoData, start_iter: int) -> Any:
    """Infinite, resumable training loader (batch ``i`` is the same after a resume at ``start_iter``)."""
    with_masks = cfg.model.meta_architecture == "mask_rcnn"
    dataset = CocoDetection(data, build_detection_transform(cfg.input, True, seed=cfg.train.seed), with_masks)
    factors = train_repeat_factors(cfg, data)
    if factors is not None:
        logger.info("repeat-factor sampling (threshold %g): %d images, %.0f per epoch on average (x%.2f), "
                    "%d repeated, factors up to %.2f", cfg.dataloader.repeat_threshold, len(factors), factors.sum(),
                    factors.mean(), int((factors > 1).sum()), factors.max())
    return build_detection_train_loader(
        dataset, data.aspect_ratios, batch_size_per_process(cfg.train.batch_size), cfg.dataloader.num_workers,
        seed=cfg.train.seed, start_iter=start_iter, aspect_ratio_grouping=cfg.dataloader.aspect_ratio_grouping,
        repeat_factors=factors,
    )


def build_test_dataset(cfg: DetectionConfig, data: CocoData, with_masks: bool = False) -> CocoDetection:
    """The evaluation dataset: test-time resize, no augmentation."""
    return CocoDetection(data, build_detection_transform(cfg.input, False), with_masks)


def build_test_loader(cfg: DetectionConfig, data: CocoData) -> Any:
    """Finite loader over this process's shard of ``data`` (every image once over all processes)."""
    return build_detection_test_loader(build_test_dataset(cfg, data), batch_size=cfg.test.batch_size,
                                       num_workers=cfg.dataloader.num_workers)


def build_model(cfg: DetectionConfig, num_classes: int, device: torch.device) -> nn.Module:
    """``build_detector`` with its initial weights (``model.backbone.weights`` / ``model.weights``,
    :func:`load_initial_weights` with a logged report) on ``device``; SyncBN (``train.sync_bn``) and
    DDP when running under torchrun."""
    model = build_detector(cfg, num_classes)
    load_initial_weights(model, cfg, training=True)
    model = model.to(device)
    if get_world_size() > 1:
        if cfg.train.sync_bn and device.type == "cpu":
            logger.warning("train.sync_bn needs GPUs (torch's SyncBatchNorm has no CPU kernel): "
                           "each process normalizes its own batch")
        elif cfg.train.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=False
        )
    elif cfg.train.sync_bn:
        logger.info("train.sync_bn has no effect with a single process")
    return model


def build_evaluator(cfg: DetectionConfig, data: CocoData) -> COCOEvaluator:
    """COCO evaluator for ``data`` (bbox, plus segm for Mask R-CNN) with ``test.eval_backend``."""
    iou_types = ("bbox", "segm") if cfg.model.meta_architecture == "mask_rcnn" else ("bbox",)
    return COCOEvaluator(data.coco_index(), data.category_ids, data.class_names, iou_types, backend=cfg.test.eval_backend)


def make_eval_fn(cfg: DetectionConfig, val: CocoData, model_fn: Callable[[], nn.Module],
                 device: torch.device) -> Callable[[], dict[str, float]]:
    """``() -> metrics`` evaluating ``model_fn()`` (the model or its EMA) on ``val``."""
    loader = build_test_loader(cfg, val)
    evaluator = build_evaluator(cfg, val)
    if cfg.test.precision == "int8" and cfg.test.int8_quantized:
        # a saved calibration belongs to fixed weights; the weights being trained change between evaluations
        logger.info("test.int8_quantized=%s is not used while training: each int8 evaluation calibrates on "
                    "data.train", cfg.test.int8_quantized)
        cfg = cfg.model_copy(deep=True)
        cfg.test.int8_quantized = None

    def eval_fn() -> dict[str, float]:
        return inference_on_dataset(model_fn(), loader, evaluator, cfg.test.precision, device, optimize=True,
                                    config=cfg)

    return eval_fn


def visualization_samples(cfg: DetectionConfig, val: CocoData, n: int) -> list:
    """The first ``n`` readable validation images (test transform) with their ground truth."""
    if n <= 0 or not is_main_process():
        return []
    ds = build_test_dataset(cfg, val, with_masks=cfg.model.meta_architecture == "mask_rcnn")
    out = []
    for i in range(len(ds)):
        s = ds[i]
        if s is not None:
            out.append((s.image, s.targets))
        if len(out) >= n:
            break
    return out


def write_metrics_json(path: Path, metrics: dict[str, Any]) -> None:
    """Write flat metrics as JSON (NaN -> null), atomically."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    write_json_atomic(path, clean, indent=2)


@dataclass
class DetectionData:
    """The validated splits of a run and the label space they share."""

    train: Optional[CocoData]
    val: Optional[CocoData]
    num_classes: int

    @property
    def class_names(self) -> list[str]:
        return (self.train or self.val).class_names  # type: ignore[union-attr]


def eval_model(model: nn.Module, ema: Optional[Any]) -> nn.Module:
    """The model to evaluate: the EMA copy when EMA is on, else the (unwrapped) trained model, with rank 0's
    buffers on every process (the model the checkpoint holds; see :func:`broadcast_buffers`)."""
    return broadcast_buffers(ema.module if ema is not None else unwrap_model(model))
