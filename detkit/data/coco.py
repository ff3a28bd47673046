"""COCO-format datasets: reading, validation at start-up, and the detection Dataset.

:func:`load_coco` reads and checks an annotation file once and returns a light
:class:`CocoData` index (boxes and labels as small arrays; segmentations kept in their
JSON form and decoded lazily per sample). :class:`CocoDetection` turns it into a torch
``Dataset`` of :class:`~detkit.data.collate.DetectionSample`.

Validation rules (one warning per rule with the count and the first annotation ids, then
ONE summary line on logger ``"detkit"``):

* box with zero/negative/NaN/inf width or height: dropped;
* box entirely outside its image: dropped (boxes partly outside are clipped);
* polygon with fewer than 3 points (or an odd number of coordinates): the polygon is
  dropped, and the annotation too when no polygon remains;
* ``category_id`` or ``image_id`` not defined in the file: :class:`DatasetError`;
* an id that is not an integer (string, null, 1.5), an image without a ``file_name`` or with a
  non-positive ``width``/``height``: :class:`DatasetError` naming the entry and the field;
* malformed JSON, missing file, missing keys: :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from detkit.structures import Targets

from .collate import DetectionSample, SkippedSample, collate_detection
from .images import ImageReadError, read_image

__all__ = [
    "DatasetError",
    "ImageRecord",
    "CocoData",
    "load_coco",
    "CocoDetection",
    "DetectionSample",
    "collate_detection",
    "decode_rle",
    "decode_segmentation",
]

logger = logging.getLogger("detkit")
PathLike = Union[str, os.PathLike]
_MAX_IDS_SHOWN = 5


class DatasetError(ValueError):
    """A dataset file or folder is unusable; the message says which file/key and what to do."""


@dataclass
class ImageRecord:
    """One image of a COCO file after validation.

    Attributes:
        image_id, file_name, path (images_dir / file_name), height, width: from the JSON.
        boxes: float32 [N, 4] xyxy (clipped to the image) of the usable non-crowd instances.
        labels: int64 [N] contiguous labels.
        segmentations: N raw COCO segmentations (polygon lists / RLE dicts) or None when absent.
        ann_ids: N annotation ids.
        crowd_boxes: float32 [M, 4] xyxy of the crowd regions (``iscrowd=1``).
    """

    image_id: int
    file_name: str
    path: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    segmentations: list[Any]
    ann_ids: list[int]
    crowd_boxes: np.ndarray
    crowd_segmentations: list[Any] = field(default_factory=list)

    @property
    def aspect_ratio(self) -> float:
        """width / height from the JSON (no decoding)."""
        return self.width / self.height


@dataclass
class CocoData:
    """A validated COCO annotation file.

    Attributes:
        records: the images used (empty ones removed for training when ``filter_empty``).
        class_names: name of each contiguous label.
        category_ids: COCO category id of each contiguous label (sorted ascending).
        coco: the pycocotools ``COCO`` index of the file as read.
    """

    annotations_path: str
    images_dir: str
    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    coco: COCO
    num_dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.category_ids)}

    @property
    def aspect_ratios(self) -> list[float]:
        """Per-record width / height, from the JSON sizes (for aspect-ratio grouping)."""
        return [r.aspect_ratio for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def _fail(path: PathLike, what: str) -> DatasetError:
    return DatasetError(f"{path}: {what}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise _fail(path, "annotation file not found; check data.*.annotations")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise _fail(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(path, f"cannot read annotation file ({e})") from None
    if not isinstance(data, dict):
        raise _fail(path, f"top level must be a JSON object with 'images', 'annotations', 'categories', got {type(data).__name__}")
    return data


def _int_id(value: Any, path: PathLike, where: str, key: str) -> int:
    """``value`` as an int id; a string, null, bool or non-integral number is a one-line DatasetError."""
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok:
        raise _fail(path, f"{where} has {key} {json.dumps(value)}, which is not an integer id; "
                          f"COCO ids are JSON integers")
    return int(value)


def _positive_size(value: Any, path: PathLike, where: str, key: str) -> int:
    """An image width/height: a positive number (int, or a float truncated like before)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) <= 0:
        raise _fail(path, f"{where} has {key} {json.dumps(value)}; image sizes must be positive integers (pixels)")
    return int(value)


def _image_where(i: int, im: Any) -> str:
    """``images[i]`` plus its id / file name when present, to find the entry in the file."""
    if not isinstance(im, dict):
        return f"images[{i}]"
    named = [f"{k} {json.dumps(im[k])}" for k in ("id", "file_name") if k in im]
    return f"images[{i}]" + (f" ({', '.join(named)})" if named else "")


def _require(obj: dict, keys: Sequence[str], path: PathLike, where: str) -> None:
    if not isinstance(obj, dict):
        raise _fail(path, f"{where} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _fail(path, f"{where} lacks required key(s) {missing}; every entry needs {list(keys)}")


def _polygon_filter(seg: list, ann_id: int) -> tuple[list, int]:
    """Keep polygons with >= 3 points and an even number of finite coordinates; return (kept, n_bad)."""
    kept, bad = [], 0
    for poly in seg:
        ok = (
            isinstance(poly, (list, tuple))
            and len(poly) >= 6
            and len(poly) % 2 == 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)
        )
        if ok:
            kept.append(poly)
        else:
            bad += 1
    return kept, bad


def _warn_dropped(path: PathLike, what: str, ids: list[int]) -> None:
    if ids:
        shown = ", ".join(str(i) for i in ids[:_MAX_IDS_SHOWN]) + (", ..." if len(ids) > _MAX_IDS_SHOWN else "")
        logger.warning("%s: dropped %d annotation(s) with %s (ids %s)", path, len(ids), what, shown)


def load_coco(annotations_path: PathLike, images_dir: PathLike, *, filter_empty: bool, is_train: bool) -> CocoData:
    """Read, validate and index a COCO annotation file.

    Args:
        annotations_path: the COCO JSON.
        images_dir: folder that ``images[*].file_name`` are relative to.
        filter_empty: with ``is_train``, drop images that have no usable non-crowd instance.
        is_train: evaluation sets always keep every image (``filter_empty`` is ignored).

    Raises:
        DatasetError: missing/malformed file, missing keys, undefined category or image id,
            duplicate image ids.
    """
    path = Path(annotations_path)
    images_dir = Path(images_dir)
    data = _read_json(path)
    _require(data, ["images", "categories"], path, "the top-level object")
    if "annotations" not in data:
        if is_train:
            raise _fail(path, "the top-level object lacks 'annotations'; a training file needs them")
        data["annotations"] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise _fail(path, f"'{key}' must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise _fail(path, "'categories' is empty; define at least one category")

    names: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        _require(c, ["id", "name"], path, f"categories[{i}]")
        names[_int_id(c["id"], path, f"categories[{i}] (name {json.dumps(c['name'])})", "id")] = str(c["name"])
    cat_ids = sorted(names)
    if len(cat_ids) != len(data["categories"]):
        raise _fail(path, "duplicate category ids in 'categories'; ids must be unique")
    cat_to_label = {c: i for i, c in enumerate(cat_ids)}

    images: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        where = _image_where(i, im)
        _require(im, ["id", "file_name", "width", "height"], path, where)
        img_id = _int_id(im["id"], path, where, "id")
        if img_id in images:
            raise _fail(path, f"duplicate image id {img_id} (images[{i}]); image ids must be unique")
        if not isinstance(im["file_name"], str) or not im["file_name"].strip():
            raise _fail(path, f"{where} has file_name {json.dumps(im['file_name'])}; expected the image's path "
                              "relative to the image folder")
        for key in ("width", "height"):
            _positive_size(im[key], path, where, key)
        images[img_id] = im

    bad_size: list[int] = []
    outside: list[int] = []
    bad_poly: list[int] = []
    per_image: dict[int, list[tuple]] = {i: [] for i in images}
    crowd_per_image: dict[int, list[tuple]] = {i: [] for i in images}
    for i, ann in enumerate(data["annotations"]):
        _require(ann, ["id", "image_id", "category_id", "bbox"], path, f"annotations[{i}]")
        aid = _int_id(ann["id"], path, f"annotations[{i}]", "id")
        cat_id = _int_id(ann["category_id"], path, f"annotation id {aid} (annotations[{i}])", "category_id")
        if cat_id not in cat_to_label:
            raise _fail(path, f"annotation id {aid} has category_id {ann['category_id']}, which is not defined in 'categories'")
        img_id = _int_id(ann["image_id"], path, f"annotation id {aid} (annotations[{i}])", "image_id")
        if img_id not in images:
            raise _fail(path, f"annotation id {aid} has image_id {ann['image_id']}, which is not defined in 'images'")
        bbox = ann["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise _fail(path, f"annotation id {aid} has bbox {bbox!r}; expected [x, y, width, height]")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise _fail(path, f"annotation id {aid} has non-numeric bbox {bbox!r}") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            bad_size.append(aid)
            continue
        W, H = float(images[img_id]["width"]), float(images[img_id]["height"])
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
        if x2 <= x1 or y2 <= y1:
            outside.append(aid)
            continue
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            seg, n_bad = _polygon_filter(seg, aid)
            if n_bad:
                bad_poly.append(aid)
                if not seg:
                    continue
        elif seg is not None and not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            raise _fail(path, f"annotation id {aid} has a segmentation that is neither polygons nor RLE")
        entry = ((x1, y1, x2, y2), cat_to_label[cat_id], seg, aid)
        (crowd_per_image if ann.get("iscrowd", 0) else per_image)[img_id].append(entry)

    _warn_dropped(path, "zero, negative or NaN box size", bad_size)
    _warn_dropped(path, "boxes entirely outside the image", outside)
    _warn_dropped(path, "polygons of fewer than 3 points (bad polygons removed; annotation dropped if none left)", bad_poly)

    records: list[ImageRecord] = []
    num_empty = 0
    for img_id, im in images.items():
        inst, crowd = per_image[img_id], crowd_per_image[img_id]
        if not inst:
            num_empty += 1
            if is_train and filter_empty:
                continue
        records.append(
            ImageRecord(
                image_id=img_id,
                file_name=str(im["file_name"]),
                path=str(images_dir / str(im["file_name"])),
                height=int(im["height"]),
                width=int(im["width"]),
                boxes=np.array([e[0] for e in inst], dtype=np.float32).reshape(-1, 4),
                labels=np.array([e[1] for e in inst], dtype=np.int64),
                segmentations=[e[2] for e in inst],
                ann_ids=[e[3] for e in inst],
                crowd_boxes=np.array([e[0] for e in crowd], dtype=np.float32).reshape(-1, 4),
                crowd_segmentations=[e[2] for e in crowd],
            )
        )

    if is_train and not records:
        raise _fail(
            path,
            f"no training image left ({len(images)} images, {len(data['annotations'])} annotations, "
            f"{num_empty} without usable instances); check the boxes/categories or set data.filter_empty=false",
        )

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()

    num_inst = sum(len(r.boxes) for r in records)
    num_crowd = sum(len(r.crowd_boxes) for r in records)
    dropped = {"bad_size": len(bad_size), "outside": len(outside), "bad_polygon": len(bad_poly)}
    empty_note = (
        f"{num_empty} without instances dropped" if is_train and filter_empty else f"{num_empty} without instances kept"
    )
    logger.info(
        "%s: %d images (%s), %d instances, %d crowd regions, %d classes; dropped annotations: %d bad size, "
        "%d outside image, %d bad polygons",
        path, len(records), empty_note, num_inst, num_crowd, len(cat_ids), *dropped.values(),
    )
    return CocoData(
        annotations_path=str(path),
        images_dir=str(images_dir),
        records=records,
        class_names=[names[c] for c in cat_ids],
        category_ids=cat_ids,
        coco=coco,
        num_dropped=dropped,
    )


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
            for r in coco_data.records:
                for seg, aid in zip(r.segmentations, r.ann_ids):
                    if seg is None:
                        raise DatasetError(
                            f"{coco_data.annotations_path}: annotation id {aid} has no segmentation but masks are "
                            "needed (Mask R-CNN); add masks or train a Faster R-CNN config"
                        )

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def category_ids(self) -> list[int]:
        return self.data.category_ids

    @property
    def aspect_ratios(self) -> list[float]:
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
            logger.warning("skipping image %s: %s (fix width/height in %s)", rec.path, reason, self.data.annotations_path)
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
