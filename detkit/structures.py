"""Typed containers that pass between detkit's stages, plus small box helpers.

Every layer of detkit (``data``, ``models``, ``evaluation``, ``engine``) speaks
in these types; nothing here imports from the rest of the package.

Conventions:
    * boxes are ``float32 [N, 4]`` in ``(x1, y1, x2, y2)`` absolute pixels of the
      image they belong to;
    * labels are ``int64 [N]`` contiguous in ``[0, K)`` (no background slot);
    * images are ``[3, H, W]`` tensors, RGB, values in ``[0, 255]`` (uint8 or float).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou, clip_boxes_to_image

__all__ = [
    "FeatureSpec",
    "Targets",
    "Proposals",
    "Detections",
    "Batch",
    "box_area",
    "box_iou",
    "clip_boxes_to_image",
    "nonempty_boxes",
    "scale_boxes",
]


@dataclass(frozen=True)
class FeatureSpec:
    """Channels and stride (relative to the input image) of one feature map."""

    channels: int
    stride: int


def _apply(obj, fn):
    """Apply ``fn`` to every tensor field of a dataclass, returning a new instance."""
    changes = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            changes[f.name] = fn(v)
    return replace(obj, **changes)


@dataclass
class Targets:
    """Ground truth for one image.

    Attributes:
        boxes: float32 [N, 4] xyxy pixels.
        labels: int64 [N] contiguous class indices in [0, K).
        masks: uint8 [N, H, W] binary masks at image resolution, or None.
        ignore_boxes: float32 [M, 4] crowd regions; anchors/proposals that
            overlap them are neither positive nor negative. Empty when unused.
    """

    boxes: Tensor
    labels: Tensor
    masks: Optional[Tensor] = None
    ignore_boxes: Tensor = field(default_factory=lambda: torch.zeros((0, 4)))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "Targets":
        return _apply(self, lambda t: t.to(device, non_blocking=True))


@dataclass
class Proposals:
    """Region proposals for one image: float32 boxes [N, 4] and objectness logits [N]."""

    boxes: Tensor
    objectness: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class Detections:
    """Detections for one image, in the coordinates of the image given to the model.

    Attributes:
        boxes: float32 [N, 4] xyxy.
        scores: float32 [N].
        labels: int64 [N] contiguous class indices.
        masks: for Mask R-CNN, float [N, 1, M, M] mask probabilities before
            pasting, or bool [N, H, W] after pasting; None for Faster R-CNN.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "Detections":
        return _apply(self, lambda t: t.to(device))

    def select(self, keep: Tensor) -> "Detections":
        """Index every field with ``keep`` (bool mask or indices)."""
        return _apply(self, lambda t: t[keep])


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        images: list of [3, H_i, W_i] RGB tensors (uint8 or float in [0, 255]),
            already resized by the data pipeline; sizes may differ.
        targets: per-image ground truth (None at inference).
        image_ids: dataset ids of the images.
        orig_sizes: (height, width) of each image as stored on disk.
        skipped: files the data pipeline could not read for this batch
            (corrupt/missing); the engine counts and reports them.
    """

    images: list[Tensor]
    targets: Optional[list[Targets]] = None
    image_ids: list[int] = field(default_factory=list)
    orig_sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device | str) -> "Batch":
        images = [im.to(device, non_blocking=True) for im in self.images]
        targets = None if self.targets is None else [t.to(device) for t in self.targets]
        return replace(self, images=images, targets=targets)


def nonempty_boxes(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """Bool [N]: boxes whose width and height are finite and > ``min_size``."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return torch.isfinite(boxes).all(dim=1) & (wh > min_size).all(dim=1)


def scale_boxes(boxes: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Scale xyxy boxes by per-axis factors (e.g. to map back to original image size)."""
    factors = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    return boxes * factors
