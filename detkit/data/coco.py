"""COCO-format annotation files: reading and validation at start-up.

:func:`load_coco` reads and checks an annotation file once and returns a light
:class:`CocoData` index (boxes and labels as small arrays; segmentations kept in their
JSON form and decoded lazily per sample). :class:`~detkit.data.coco_dataset.CocoDetection`
turns it into a torch ``Dataset``.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from pycocotools.coco import COCO

from ..errors import DetkitError

__all__ = [
    "DatasetError",
    "ImageRecord",
    "CocoData",
    "load_coco",
]

logger = logging.getLogger("detkit")
PathLike = Union[str, os.PathLike]
_MAX_IDS_SHOWN = 5


class DatasetError(DetkitError, ValueError):
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


def _read_json(path: Path, is_train: bool) -> dict:
    """The JSON object of ``path`` with 'images', 'categories' (non-empty) and 'annotations' lists.

    A file without 'annotations' gets an empty list (in place) when it is not a training file.
    """
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


@dataclass
class _Instance:
    """One usable annotation, on its way into an :class:`ImageRecord`.

    Attributes:
        box: (x1, y1, x2, y2) floats, xyxy in image pixels, clipped to the image.
        label: contiguous label (int) of its category.
        segmentation: the raw COCO segmentation (polygon lists without the bad ones, or an RLE
            dict), or None when the annotation has none.
        ann_id: COCO annotation id (int).
    """

    box: tuple[float, float, float, float]
    label: int
    segmentation: Any
    ann_id: int


@dataclass
class _Annotations:
    """The validated ``annotations`` of a file, grouped per image.

    Attributes:
        instances: image id (int) -> its usable non-crowd instances in file order; every image
            of the file has an entry (an empty list when it has no instance).
        crowds: image id (int) -> its usable crowd regions (``iscrowd`` set) in file order.
        bad_size: ids (int) of annotations dropped for a zero, negative, NaN or inf box size.
        outside: ids (int) of annotations dropped for a box entirely outside the image.
        bad_polygon: ids (int) of annotations that lost polygons (dropped when none was left).
    """

    instances: dict[int, list[_Instance]]
    crowds: dict[int, list[_Instance]]
    bad_size: list[int] = field(default_factory=list)
    outside: list[int] = field(default_factory=list)
    bad_polygon: list[int] = field(default_factory=list)


def _validate_categories(categories: list, path: Path) -> dict[int, str]:
    """COCO category id -> class name, after checking each entry's id (an integer, unique) and name."""
    names: dict[int, str] = {}
    for i, c in enumerate(categories):
        _require(c, ["id", "name"], path, f"categories[{i}]")
        names[_int_id(c["id"], path, f"categories[{i}] (name {json.dumps(c['name'])})", "id")] = str(c["name"])
    if len(names) != len(categories):
        raise _fail(path, "duplicate category ids in 'categories'; ids must be unique")
    return names


def _validate_images(images: list, path: Path) -> dict[int, dict]:
    """Image id -> its JSON entry, in file order, after checking id, file_name, width and height."""
    by_id: dict[int, dict] = {}
    for i, im in enumerate(images):
        where = _image_where(i, im)
        _require(im, ["id", "file_name", "width", "height"], path, where)
        img_id = _int_id(im["id"], path, where, "id")
        if img_id in by_id:
            raise _fail(path, f"duplicate image id {img_id} (images[{i}]); image ids must be unique")
        if not isinstance(im["file_name"], str) or not im["file_name"].strip():
            raise _fail(path, f"{where} has file_name {json.dumps(im['file_name'])}; expected the image's path "
                              "relative to the image folder")
        for key in ("width", "height"):
            _positive_size(im[key], path, where, key)
        by_id[img_id] = im
    return by_id


def _add_annotation(i: int, ann: Any, path: Path, images: dict[int, dict], cat_to_label: dict[int, int],
                    out: _Annotations) -> None:
    """Check ``annotations[i]`` and file it in ``out``: as an instance, a crowd region or a drop.

    ``images``: image id -> JSON entry; ``cat_to_label``: COCO category id -> contiguous label.
    """
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
        out.bad_size.append(aid)
        return
    W, H = float(images[img_id]["width"]), float(images[img_id]["height"])
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
    if x2 <= x1 or y2 <= y1:
        out.outside.append(aid)
        return
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        seg, n_bad = _polygon_filter(seg, aid)
        if n_bad:
            out.bad_polygon.append(aid)
            if not seg:
                return
    elif seg is not None and not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        raise _fail(path, f"annotation id {aid} has a segmentation that is neither polygons nor RLE")
    instance = _Instance(box=(x1, y1, x2, y2), label=cat_to_label[cat_id], segmentation=seg, ann_id=aid)
    (out.crowds if ann.get("iscrowd", 0) else out.instances)[img_id].append(instance)


def _validate_annotations(annotations: list, path: Path, images: dict[int, dict],
                          cat_to_label: dict[int, int]) -> _Annotations:
    """Check every annotation, group the usable ones per image, warn once per drop rule."""
    out = _Annotations(instances={i: [] for i in images}, crowds={i: [] for i in images})
    for i, ann in enumerate(annotations):
        _add_annotation(i, ann, path, images, cat_to_label, out)
    _warn_dropped(path, "zero, negative or NaN box size", out.bad_size)
    _warn_dropped(path, "boxes entirely outside the image", out.outside)
    _warn_dropped(path, "polygons of fewer than 3 points (bad polygons removed; annotation dropped if none left)",
                  out.bad_polygon)
    return out


def _build_records(images: dict[int, dict], anns: _Annotations, images_dir: Path,
                   drop_empty: bool) -> list[ImageRecord]:
    """One :class:`ImageRecord` per image in file order; without instances skipped when ``drop_empty``."""
    records: list[ImageRecord] = []
    for img_id, im in images.items():
        inst, crowd = anns.instances[img_id], anns.crowds[img_id]
        if not inst and drop_empty:
            continue
        records.append(ImageRecord(
            image_id=img_id, file_name=str(im["file_name"]), path=str(images_dir / str(im["file_name"])),
            height=int(im["height"]), width=int(im["width"]),
            boxes=np.array([e.box for e in inst], dtype=np.float32).reshape(-1, 4),
            labels=np.array([e.label for e in inst], dtype=np.int64),
            segmentations=[e.segmentation for e in inst],
            ann_ids=[e.ann_id for e in inst],
            crowd_boxes=np.array([e.box for e in crowd], dtype=np.float32).reshape(-1, 4),
            crowd_segmentations=[e.segmentation for e in crowd],
        ))
    return records


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
    data = _read_json(path, is_train)
    names = _validate_categories(data["categories"], path)
    cat_ids = sorted(names)
    images = _validate_images(data["images"], path)
    anns = _validate_annotations(data["annotations"], path, images, {c: i for i, c in enumerate(cat_ids)})
    drop_empty = is_train and filter_empty
    records = _build_records(images, anns, images_dir, drop_empty)
    num_empty = sum(1 for inst in anns.instances.values() if not inst)
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

    dropped = {"bad_size": len(anns.bad_size), "outside": len(anns.outside), "bad_polygon": len(anns.bad_polygon)}
    logger.info(
        "%s: %d images (%s), %d instances, %d crowd regions, %d classes; dropped annotations: %d bad size, "
        "%d outside image, %d bad polygons",
        path, len(records), f"{num_empty} without instances {'dropped' if drop_empty else 'kept'}",
        sum(len(r.boxes) for r in records), sum(len(r.crowd_boxes) for r in records), len(cat_ids),
        *dropped.values(),
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
