"""The COCO detection ``Dataset``: :class:`CocoDetection` over a validated :class:`CocoData`, and the
segmentation decoders it uses (polygons, uncompressed and compressed RLE)."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch.utils.data import Dataset

from detkit.structures import Targets

from .coco import CocoData, DatasetError
from .records import SEG_NONE
from .collate import DetectionSample, SkippedSample
from .images import ImageReadError, read_image

__all__ = ["CocoDetection", "decode_rle", "decode_segmentation"]

logger = logging.getLogger("detkit")


def decode_rle(rle: dict) -> np.ndarray:
    """pycocotools ``decode`` without its numpy-2 DeprecationWarning noise (uint8 [H, W])."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 [height, width] mask."""
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:  # compressed RLE
        rle = seg
    mask = decode_rle(rle)
    if mask.shape != (height, width):
        raise DatasetError(f"RLE mask of size {mask.shape} does not match its image ({height}, {width})")
    return mask


class CocoDetection(Dataset):
    """A torch Dataset over a :class:`CocoData`.

    ``dataset[i]`` is a :class:`DetectionSample` (image uint8 [3,H,W] after ``transform``,
    ``Targets`` with boxes/labels/masks/ignore_boxes) or ``None`` when the image cannot be read
    (a warning names the file). In a DataLoader, batched fetching goes through
    :meth:`__getitems__`, which yields :class:`SkippedSample` for those, so
    :func:`collate_detection` can list the skipped files in ``Batch.skipped``.

    Args:
        coco_data: from :func:`load_coco`.
        transform: a :class:`~detkit.data.transforms.DetectionTransform` (or any callable with
            its signature), or None for no transform.
        with_masks: decode instance masks (Mask R-CNN). Requires a segmentation on every
            instance.
    """

    def __init__(self, coco_data: CocoData, transform: Optional[Callable[..., Any]] = None, with_masks: bool = False):
        self.data = coco_data
        self.transform = transform
        self.with_masks = with_masks
        if with_masks:
            table = coco_data.records
            missing = np.flatnonzero(table.instances.seg_kind == SEG_NONE)
            if len(missing):
                k = int(missing[0])
                image = int(np.searchsorted(table.instances.offsets, k, side="right")) - 1
                raise DatasetError(
                    f"{table.sources[table.set_index[image]]}: annotation id {table.instances.ann_ids[k]} has no "
                    "segmentation but masks are needed (Mask R-CNN); add masks or train a Faster R-CNN config"
                )

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def category_ids(self) -> list[int]:
        return self.data.category_ids

    @property
    def aspect_ratios(self) -> np.ndarray:
        return self.data.aspect_ratios

    def __len__(self) -> int:
        return len(self.data.records)

    def load(self, index: int) -> Union[DetectionSample, SkippedSample]:
        """The sample at ``index`` or a :class:`SkippedSample` naming the unreadable file."""
        rec = self.data.records[index]
        try:
            img = read_image(rec.path)
        except ImageReadError as e:
            logger.warning("skipping image: %s", e)
            return SkippedSample(rec.path, e.reason)
        h, w = img.shape[:2]
        if (h, w) != (rec.height, rec.width):
            reason = f"decoded size {h}x{w} differs from the annotation's {rec.height}x{rec.width}"
            logger.warning("skipping image %s: %s (fix width/height in %s)", rec.path, reason, rec.source)
            return SkippedSample(rec.path, reason)
        masks = None
        if self.with_masks:
            masks = np.zeros((len(rec.boxes), h, w), dtype=np.uint8)
            for k, seg in enumerate(rec.segmentations):
                masks[k] = decode_segmentation(seg, h, w)
        boxes, labels, crowd = rec.boxes, rec.labels, rec.crowd_boxes
        if self.transform is not None:
            out = self.transform(img, boxes, labels, masks, crowd)
            img, boxes, labels, masks, crowd = out.image, out.boxes, out.labels, out.masks, out.ignore_boxes
        # (H, W, 3) -> (3, H, W)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        targets = Targets(
            boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            masks=None if masks is None else torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
            ignore_boxes=torch.as_tensor(crowd, dtype=torch.float32).reshape(-1, 4),
        )
        return DetectionSample(image=image, targets=targets, image_id=rec.image_id, orig_size=(h, w), file_name=rec.path)

    def __getitem__(self, index: int) -> Optional[DetectionSample]:
        s = self.load(index)
        return s if isinstance(s, DetectionSample) else None

    def __getitems__(self, indices: Sequence[int]) -> list[Union[DetectionSample, SkippedSample]]:
        return [self.load(i) for i in indices]
