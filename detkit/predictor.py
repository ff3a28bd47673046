"""High-level inference: ``Predictor(config, weights)(image) -> Prediction``.

Example::

    from detkit import Predictor
    predictor = Predictor("configs/torchvision/mask_rcnn_R_50_FPN.yaml", weights="maskrcnn.pth")
    result = predictor(image_rgb_uint8)          # numpy HxWx3, RGB
    for box, score, label in zip(result.boxes, result.scores, result.labels):
        print(predictor.class_names[label], score, box)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import cv2
import numpy as np
import torch

from .config import DetectionConfig, load_config
from .models.build import build_detector
from .models.detector import rescale_detections
from .speed import optimize_for_inference, resolve_precision

__all__ = ["Predictor", "Prediction"]

logger = logging.getLogger("detkit")

PRECISIONS = ("fp32", "bf16")


@dataclass
class Prediction:
    """Detections for one image, in that image's pixels, as CPU numpy arrays.

    Attributes:
        boxes: float32 [N, 4] xyxy.
        scores: float32 [N], sorted in decreasing order.
        labels: int64 [N], indices into ``Predictor.class_names``.
        masks: bool [N, H, W] instance masks for Mask R-CNN, else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def resize_shortest_edge(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Resize (bilinear) so the short side is ``min_size`` and the long side at most ``max_size``."""
    h, w = image.shape[:2]
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    new_h, new_w = max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)
    if (new_h, new_w) == (h, w):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def _class_names_from_annotations(path: Optional[str]) -> Optional[list[str]]:
    """Category names in sorted-id order (detkit's contiguous labels) from a COCO-format file."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cats = json.load(f).get("categories") or []
        return [str(c["name"]) for c in sorted(cats, key=lambda c: int(c["id"]))] or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_image(image: Any, index: Optional[int] = None) -> np.ndarray:
    where = "image" if index is None else f"image {index}"
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = (
            f"dtype={image.dtype} shape={tuple(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        )
        raise ValueError(
            f"Predictor: {where} must be a uint8 HxWx3 RGB numpy array, got {desc}; convert it first "
            "(e.g. cv2.cvtColor(img, cv2.COLOR_BGR2RGB), or (img * 255).astype(np.uint8))"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Predictor: {where} is empty (shape {tuple(image.shape)})")
    return image


class Predictor:
    """Load a detector from a config (and weights) and run it on RGB numpy images.

    Images are resized (short side ``input.min_size_test``, long side at most
    ``input.max_size_test``, bilinear), detected, and the results are mapped back to
    the input image: boxes scaled, masks pasted at full resolution.

    Args:
        config: path of a YAML config, or a loaded :class:`DetectionConfig`.
        weights: any :func:`detkit.load_weights` source (path, state dict); default
            ``model.weights`` of the config.
        device: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        precision: ``"fp32"`` or ``"bf16"``; default ``test.precision`` of the config. bf16 stores
            weights and activations in bfloat16 with fp32 islands (RoIAlign coordinates, box
            decoding, NMS, predictors) where :func:`detkit.speed.bf16_supported` says the device
            runs it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs); float32 otherwise, with a warning.
        fold_bn: fold frozen / eval-mode BatchNorms into the preceding convolutions after loading
            (same results up to float rounding); the state dict then no longer matches a training
            checkpoint.
        optimize: run :func:`detkit.speed.optimize_for_inference` (folded BNs, channels_last, oneDNN
            linear layers and a multi-threaded RoIAlign on CPU, bf16 weights for ``precision="bf16"``;
            fp32 results equal up to float rounding). False keeps the plain modules (bf16 then uses
            autocast).

    Attributes:
        cfg: the config; model: the :class:`TwoStageDetector` (eval mode);
        class_names: name of each label.
    """

    def __init__(
        self,
        config: Union[str, os.PathLike, DetectionConfig],
        weights: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
        device: Union[str, torch.device] = "cpu",
        precision: Optional[str] = None,
        fold_bn: bool = True,
        optimize: bool = True,
    ) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"Predictor: precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(config, DetectionConfig):
            cfg = config.model_copy(deep=True)
        elif isinstance(config, (str, os.PathLike)):
            cfg = load_config(config)
            if not isinstance(cfg, DetectionConfig):
                raise ValueError(f"Predictor: {config} is a {cfg.task} config; a detection config is needed")
        else:
            raise TypeError(f"Predictor: config must be a path or a DetectionConfig, got {type(config).__name__}")

        names = cfg.data.class_names or _class_names_from_annotations(cfg.data.train.annotations) \
            or _class_names_from_annotations(cfg.data.val.annotations)
        num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else (len(names) if names else None)
        if num_classes is None:
            raise ValueError(
                "Predictor: the number of classes is unknown; set model.num_classes or data.class_names in the config"
            )
        if names is not None and len(names) != num_classes:
            raise ValueError(
                f"Predictor: model.num_classes={num_classes} but data.class_names has {len(names)} names; make them agree"
            )
        self.class_names: list[str] = list(names) if names else [f"class_{i}" for i in range(num_classes)]

        source = weights if weights is not None else cfg.model.weights
        cfg.model.weights = None
        if source is not None:
            cfg.model.backbone.weights = None  # the detector weights cover the backbone
        self.cfg = cfg
        self.device = torch.device(device)
        model = build_detector(cfg, num_classes)
        if source is not None:
            from .checkpoint import load_weights

            report = load_weights(model, source)
            logger.info("Predictor weights: %s", report.summary())
            if report.missing or report.mismatched:
                logger.warning(
                    "Predictor: %d model tensors were not in the weights (missing/mismatched); "
                    "they keep their random initialization", len(report.missing) + len(report.mismatched)
                )
        elif cfg.model.backbone.weights is None:
            logger.warning("Predictor: no weights given (weights=None and model.weights unset): random model")
        model.eval()
        self.model = model.to(self.device)
        self.precision = resolve_precision(precision or cfg.test.precision, self.device)
        if optimize:
            optimize_for_inference(self.model, self.precision, fold_bn=fold_bn)
        elif fold_bn:
            from .layers import fold_frozen_bn

            fold_frozen_bn(self.model)
        self._autocast = self.precision == "bf16" and not optimize

    def _context(self) -> contextlib.AbstractContextManager:
        if self._autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, image: np.ndarray) -> Prediction:
        """Detect objects in one uint8 HxWx3 RGB image."""
        return self.predict([_check_image(image)])[0]

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Detect objects in a list of uint8 HxWx3 RGB images (run ``test.batch_size`` at a time)."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise ValueError("Predictor.predict: expects a list of images; use predictor(image) for one image")
        images = [_check_image(im, i) for i, im in enumerate(images)]
        min_size, max_size = self.cfg.input.min_size_test, self.cfg.input.max_size_test
        batch = max(int(self.cfg.test.batch_size), 1)
        results: list[Prediction] = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            resized = [resize_shortest_edge(im, min_size, max_size) for im in chunk]
            tensors = [torch.from_numpy(np.ascontiguousarray(r)).permute(2, 0, 1).to(self.device) for r in resized]
            with torch.inference_mode(), self._context():
                dets = self.model.predict(tensors, paste_masks=False)
                for im, r, det in zip(chunk, resized, dets):
                    det = rescale_detections(det, r.shape[:2], im.shape[:2], self.model.mask_threshold)
                    results.append(
                        Prediction(
                            boxes=det.boxes.float().cpu().numpy(),
                            scores=det.scores.float().cpu().numpy(),
                            labels=det.labels.cpu().numpy().astype(np.int64),
                            masks=None if det.masks is None else det.masks.cpu().numpy().astype(bool),
                        )
                    )
        return results
