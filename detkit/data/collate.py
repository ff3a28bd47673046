"""Per-sample containers of the data layer and the collate functions that batch them.

A dataset that cannot read an image returns ``None`` from ``__getitem__``. Through a
DataLoader it returns a :class:`SkippedSample` instead (via ``__getitems__``, which
torch's fetcher prefers), so that the collate functions can report *which* files were
skipped; a bare ``None`` is reported as ``"<unknown>"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from detkit.structures import Batch, Targets

__all__ = ["DetectionSample", "SkippedSample", "collate_detection", "collate_classification"]


@dataclass
class DetectionSample:
    """One image and its ground truth after the data pipeline.

    Attributes:
        image: uint8 [3, H, W] RGB, after the transform (resized / augmented).
        targets: ground truth in the coordinates of ``image``.
        image_id: the COCO image id.
        orig_size: (height, width) of the image as stored on disk (after EXIF rotation).
        file_name: path of the image file.
    """

    image: Tensor
    targets: Targets
    image_id: int
    orig_size: tuple[int, int]
    file_name: str


@dataclass
class ClassificationSample:
    """One classification image: float [3, S, S] normalized tensor and its class index."""

    image: Tensor
    label: int
    file_name: str


@dataclass
class SkippedSample:
    """Stands in for a sample whose image could not be read (only inside a DataLoader)."""

    file_name: str
    reason: str = ""


AnySample = Union[DetectionSample, ClassificationSample, SkippedSample, None]


def _skipped_name(s: AnySample) -> Optional[str]:
    if s is None:
        return "<unknown>"
    if isinstance(s, SkippedSample):
        return s.file_name
    return None


def collate_detection(samples: Sequence[Union[DetectionSample, SkippedSample, None]]) -> Batch:
    """Build a :class:`~detkit.structures.Batch`, dropping unreadable samples.

    Dropped samples (``None`` / :class:`SkippedSample`) are listed in ``Batch.skipped``; the
    batch may therefore be smaller than requested, or empty.
    """
    images: list[Tensor] = []
    targets: list[Targets] = []
    image_ids: list[int] = []
    orig_sizes: list[tuple[int, int]] = []
    skipped: list[str] = []
    for s in samples:
        name = _skipped_name(s)
        if name is not None:
            skipped.append(name)
            continue
        assert isinstance(s, DetectionSample), f"collate_detection got {type(s).__name__}"
        images.append(s.image)
        targets.append(s.targets)
        image_ids.append(s.image_id)
        orig_sizes.append(s.orig_size)
    return Batch(images=images, targets=targets, image_ids=image_ids, orig_sizes=orig_sizes, skipped=skipped)


def collate_classification(
    samples: Sequence[Union[ClassificationSample, SkippedSample, None]],
) -> tuple[Tensor, Tensor, list[str]]:
    """Stack classification samples: ``(images [N,3,S,S] float32, labels [N] int64, skipped files)``.

    With no readable sample, ``images`` is ``[0, 3, 0, 0]``.
    """
    kept = [s for s in samples if isinstance(s, ClassificationSample)]
    skipped = [n for n in (_skipped_name(s) for s in samples) if n is not None]
    if not kept:
        return torch.zeros((0, 3, 0, 0)), torch.zeros((0,), dtype=torch.int64), skipped
    images = torch.stack([s.image for s in kept])
    labels = torch.tensor([s.label for s in kept], dtype=torch.int64)
    return images, labels, skipped
