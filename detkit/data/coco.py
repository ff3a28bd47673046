"""COCO-format annotation files: reading and validation at start-up.

:func:`load_coco` reads and checks an annotation file (or several, merged by class name) once and
returns a :class:`CocoData` whose records live in flat numpy buffers (:mod:`detkit.data.records`:
boxes, labels, polygon coordinates, file names), which the data-loading workers share without
copying; neither the JSON nor a pycocotools index is kept (:meth:`CocoData.coco_index` builds one
for evaluation). :class:`~detkit.data.coco_dataset.CocoDetection` turns it into a torch ``Dataset``.

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
import gc
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import orjson
from pycocotools.coco import COCO

from ..errors import DetkitError
from ..machine import release_freed_memory
from .coco_annotations import Fields, build_instances, column_lists, int_id, read_fields, require, validate_annotations
from .coco_parallel import MIN_PARALLEL_BYTES, parse_in_parts
from .records import ImageRecord, RecordTable, StringColumn
from .records_cache import CachedFile, cache_path, read_cached, write_cached

__all__ = [
    "DatasetError",
    "ImageRecord",
    "CocoData",
    "CocoSet",
    "load_coco",
    "merge_classes",
]

logger = logging.getLogger("detkit")
PathLike = Union[str, os.PathLike]


class DatasetError(DetkitError, ValueError):
    """A dataset file or folder is unusable; the message says which file/key and what to do."""


@dataclass
class CocoData:
    """Validated COCO annotations: one file, or several training files merged into one label space.

    Attributes:
        annotations_path: the annotation file (several: joined with " + ").
        images_dir: the folder of the (first file's) images.
        records: the images used (empty ones removed for training when ``filter_empty``), in flat
            buffers that the data-loading workers share (see :mod:`detkit.data.records`);
            ``records[i]`` is an :class:`ImageRecord`.
        class_names: name of each contiguous label.
        category_ids: COCO category id of each contiguous label (one file: sorted ascending).
        num_dropped: rule -> annotations dropped at validation (all files).
        sets: one :class:`CocoSet` per annotation file, in order.
    """

    annotations_path: str
    images_dir: str
    records: RecordTable
    class_names: list[str]
    category_ids: list[int]
    num_dropped: dict[str, int] = field(default_factory=dict)
    sets: list["CocoSet"] = field(default_factory=list)
    is_train: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def category_id_to_label(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.category_ids)}

    @property
    def aspect_ratios(self) -> np.ndarray:
        """float64 [N]: per-record width / height, from the JSON sizes (for aspect-ratio grouping)."""
        return self.records.widths / self.records.heights

    def coco_index(self) -> COCO:
        """A pycocotools ``COCO`` index of the file as read, built now (evaluation needs one; training
        does not keep one). One file only."""
        if len(self.sets) > 1:
            raise DatasetError(f"{self.annotations_path}: an evaluation index is built for one annotation file; "
                               "evaluate on a single data.val file")
        coco = COCO()
        path = Path(self.annotations_path)
        coco.dataset = _check_top_level(_decode(_read_bytes(path), path), path, self.is_train)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class CocoSet:
    """One annotation file of a :class:`CocoData`: its path, images folder, and the images and
    (non-crowd) instances it contributes after validation."""

    annotations: str
    images_dir: str
    num_images: int
    num_instances: int


def _fail(path: PathLike, what: str) -> DatasetError:
    return DatasetError(f"{path}: {what}")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused (restored after, as it was)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise _fail(path, "annotation file not found; check data.*.annotations")
    try:
        return path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot read annotation file ({e})") from None


def _decode(raw: bytes, path: Path) -> Any:
    try:
        try:
            return orjson.loads(raw)  # 2x json's speed on COCO files (docs/data.md)
        except orjson.JSONDecodeError:  # NaN literals (json.dump writes them), or a real error to report
            return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise _fail(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise _fail(path, f"cannot read annotation file ({e})") from None


def _check_top_level(data: Any, path: Path, is_train: bool) -> dict:
    """``data`` once it is an object with 'images', 'categories' (non-empty) and 'annotations' lists.

    A file without 'annotations' gets an empty list (in place) when it is not a training file.
    """
    if not isinstance(data, dict):
        raise _fail(path, f"top level must be a JSON object with 'images', 'annotations', 'categories', got {type(data).__name__}")
    require(data, ["images", "categories"], path, "the top-level object")
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


def _read_file(path: Path, is_train: bool) -> tuple[dict, Fields]:
    """The checked top-level object of ``path`` and the fields of its annotations.

    A large file's annotations are read by several processes (:mod:`detkit.data.coco_parallel`)."""
    raw = _read_bytes(path)
    parsed = parse_in_parts(raw, _parse_processes()) if len(raw) >= MIN_PARALLEL_BYTES else None
    if parsed is not None:
        return _check_top_level(parsed.data, path, is_train), parsed.fields
    data = _check_top_level(_decode(raw, path), path, is_train)
    del raw
    fields = read_fields(data["annotations"], path)
    data["annotations"] = []
    return data, fields


def _parse_processes() -> int:
    """Processes for one file: the CPUs this process may run on, shared with the other ranks that torchrun
    started on this machine (``LOCAL_WORLD_SIZE``: they load the same file at the same time), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    except ValueError:
        ranks_here = 1
    return min(cpus // ranks_here, 8)


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


def _validate_categories(categories: list, path: Path) -> dict[int, str]:
    """COCO category id -> class name, after checking each entry's id (an integer, unique) and name."""
    names: dict[int, str] = {}
    for i, c in enumerate(categories):
        require(c, ["id", "name"], path, f"categories[{i}]")
        names[int_id(c["id"], path, f"categories[{i}] (name {json.dumps(c['name'])})", "id")] = str(c["name"])
    if len(names) != len(categories):
        raise _fail(path, "duplicate category ids in 'categories'; ids must be unique")
    return names


@dataclass
class _Images:
    """The ``images`` of a file, checked, in file order: int64 [N] ids, int32 [N] widths and heights
    (pixels), the N file names."""

    ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    file_names: list[str]


def _fast_images(images: list) -> Optional[_Images]:
    """The images by whole columns, or None when an entry needs the one-by-one check."""
    cols = column_lists(images, ["id", "file_name", "width", "height"])
    if cols is None:
        return None
    ids, names, widths, heights = cols
    if not all(type(v) is int for v in ids + widths + heights) or (images and min(widths + heights) <= 0):
        return None
    if not all(type(n) is str and n.strip() for n in names) or len(set(ids)) != len(ids):
        return None
    return _Images(np.array(ids, np.int64), np.array(widths, np.int32), np.array(heights, np.int32), names)


def _checked_images(images: list, path: Path) -> _Images:
    """The images entry by entry; the first bad entry is a one-line DatasetError naming it."""
    seen: set[int] = set()
    ids, widths, heights, names = [], [], [], []
    for i, im in enumerate(images):
        where = _image_where(i, im)
        require(im, ["id", "file_name", "width", "height"], path, where)
        img_id = int_id(im["id"], path, where, "id")
        if img_id in seen:
            raise _fail(path, f"duplicate image id {img_id} (images[{i}]); image ids must be unique")
        seen.add(img_id)
        if not isinstance(im["file_name"], str) or not im["file_name"].strip():
            raise _fail(path, f"{where} has file_name {json.dumps(im['file_name'])}; expected the image's path "
                              "relative to the image folder")
        ids.append(img_id)
        names.append(im["file_name"])
        widths.append(_positive_size(im["width"], path, where, "width"))
        heights.append(_positive_size(im["height"], path, where, "height"))
    return _Images(np.array(ids, np.int64), np.array(widths, np.int32), np.array(heights, np.int32), names)


def _load_file(path: Path, images_dir: Path, filter_empty: bool, is_train: bool) -> CocoData:
    """One annotation file read, validated and turned into a :class:`RecordTable` (logs one summary line);
    a large file's table comes from its cache while the file is unchanged (:mod:`detkit.data.records_cache`)."""
    cached = read_cached(path, images_dir, filter_empty, is_train)
    how = f" (from the cache {cache_path(path, filter_empty, is_train)})" if cached is not None else ""
    if cached is None:
        cached = _parse_file(path, images_dir, filter_empty, is_train)
        write_cached(path, filter_empty, is_train, cached)
    table, cat_ids, dropped = cached.table, cached.category_ids, cached.num_dropped
    num_instances = len(table.instances.labels)
    drop_empty = is_train and filter_empty
    logger.info(
        "%s: %d images (%s), %d instances, %d crowd regions, %d classes; dropped annotations: %d bad size, "
        "%d outside image, %d bad polygons%s",
        path, len(table), f"{cached.num_empty} without instances {'dropped' if drop_empty else 'kept'}",
        num_instances, len(table.crowds.labels), len(cat_ids), *dropped.values(), how,
    )
    return CocoData(annotations_path=str(path), images_dir=str(images_dir), records=table,
                    class_names=cached.class_names, category_ids=cat_ids, num_dropped=dropped,
                    sets=[CocoSet(str(path), str(images_dir), len(table), num_instances)], is_train=is_train)


def _parse_file(path: Path, images_dir: Path, filter_empty: bool, is_train: bool) -> CachedFile:
    """Parse and validate ``path`` into its table (the warnings name each dropped annotation)."""
    with _no_gc():  # a large file's millions of fresh objects, acyclic: collecting as they come doubles the time
        return _parse_file_objects(path, images_dir, filter_empty, is_train)


def _parse_file_objects(path: Path, images_dir: Path, filter_empty: bool, is_train: bool) -> CachedFile:
    data, fields = _read_file(path, is_train)
    names = _validate_categories(data["categories"], path)
    cat_ids = sorted(names)
    images = _fast_images(data["images"]) or _checked_images(data["images"], path)
    del data
    num_annotations = len(fields.ids)
    cols = validate_annotations(fields, path, images.ids, images.widths, images.heights,
                                {c: i for i, c in enumerate(cat_ids)})
    del fields
    release_freed_memory()  # the file's Python objects: gone from the heap before the workers fork
    n = len(images.ids)
    has_instances = np.bincount(cols.image_index[~cols.crowd], minlength=n) > 0
    drop_empty = is_train and filter_empty
    kept = np.flatnonzero(has_instances) if drop_empty else np.arange(n)
    num_empty = int(n - has_instances.sum())
    if is_train and not len(kept):
        raise _fail(
            path,
            f"no training image left ({n} images, {num_annotations} annotations, "
            f"{num_empty} without usable instances); check the boxes/categories or set data.filter_empty=false",
        )
    image_rows = np.full(n, -1, np.int64)
    image_rows[kept] = np.arange(len(kept))
    table = RecordTable(
        image_ids=images.ids[kept], heights=images.heights[kept], widths=images.widths[kept],
        file_names=StringColumn.from_strings([images.file_names[i] for i in kept]),
        set_index=np.zeros(len(kept), np.int16),
        instances=build_instances(cols, ~cols.crowd, image_rows, len(kept)),
        crowds=build_instances(cols, cols.crowd, image_rows, len(kept)),
        sources=[str(path)], images_dirs=[str(images_dir)])
    dropped = {"bad_size": len(cols.bad_size), "outside": len(cols.outside), "bad_polygon": len(cols.bad_polygon)}
    return CachedFile(table, [names[c] for c in cat_ids], cat_ids, dropped, num_empty)


def merge_classes(files: Sequence[tuple[str, list[str], list[int]]], class_names: Optional[Sequence[str]] = None
                  ) -> tuple[list[str], list[int]]:
    """The label space of several annotation files, matched by class name.

    Args:
        files: (path, class names in label order, category id of each) per file.
        class_names: the classes to train on (``data.class_names``), which must hold every file's
            classes; None: every file must have the first file's classes (in any order and with any ids).

    Returns:
        The class names in label order, and a category id for each: its id in the first file that has
        it (a class no file has: the next free id), or ``1..K`` when those ids collide.

    Raises:
        DatasetError: naming the file whose classes do not fit, and those classes.
    """
    for path, names, _ in files:
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup and len(files) > 1:
            raise DatasetError(f"{path}: class name(s) {dup} name several categories; classes are matched by name "
                               "across the training files, so each name must be unique")
    first_path, first_names, _ = files[0]
    if class_names is None:
        target = list(first_names)
        for path, names, _ in files[1:]:
            extra, missing = sorted(set(names) - set(target)), sorted(set(target) - set(names))
            if extra or missing:
                raise DatasetError(
                    f"{path}: its classes differ from those of {first_path} (only in {path}: {extra}; missing: "
                    f"{missing}); set data.class_names to the classes to train on (the union) to merge them")
    else:
        target = list(class_names)
        for path, names, _ in files:
            missing = [n for n in names if n not in target]
            if missing:
                raise DatasetError(f"{path}: classes {missing} are not in data.class_names; add them to "
                                   "data.class_names (the classes to train on)")
    first_id: dict[str, int] = {}
    for _, names, ids in files:
        for n, c in zip(names, ids):
            first_id.setdefault(n, int(c))
    top = max(first_id.values(), default=0)
    absent = [n for n in target if n not in first_id]  # in class_names only: fresh ids after the others
    first_id.update({n: top + 1 + i for i, n in enumerate(absent)})
    ids = [first_id[n] for n in target]
    return target, ids if len(set(ids)) == len(ids) else list(range(1, len(target) + 1))


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def load_coco(annotations_path: Union[PathLike, Sequence[PathLike]], images_dir: Union[PathLike, Sequence[PathLike]],
              *, filter_empty: bool, is_train: bool, class_names: Optional[Sequence[str]] = None) -> CocoData:
    """Read, validate and index a COCO annotation file, or several (a list of files with one images
    folder each, as Detectron2's ``DATASETS.TRAIN``), one after the other.

    Args:
        annotations_path: the COCO JSON, or a list of them.
        images_dir: folder that ``images[*].file_name`` are relative to (a list: one per file).
        filter_empty: with ``is_train``, drop images that have no usable non-crowd instance.
        is_train: evaluation sets always keep every image (``filter_empty`` is ignored).
        class_names: the label space for several files (or a file whose labels must follow another
            set's order); see :func:`merge_classes`. One file without it: its categories in id order.

    Raises:
        DatasetError: missing/malformed file, missing keys, undefined category or image id,
            duplicate image ids, files whose classes do not fit together.
    """
    paths, dirs = _as_list(annotations_path), _as_list(images_dir)
    if len(paths) != len(dirs) or not paths:
        raise DatasetError(f"{len(paths)} annotation file(s) {[str(p) for p in paths]} but {len(dirs)} images "
                           "folder(s); give one images folder per annotation file, in the same order")
    parts = [_load_file(Path(p), Path(d), filter_empty, is_train) for p, d in zip(paths, dirs)]
    if len(parts) == 1 and class_names is None:
        return parts[0]
    names, ids = merge_classes([(p.annotations_path, p.class_names, p.category_ids) for p in parts], class_names)
    index = {n: i for i, n in enumerate(names)}
    maps = [np.array([index[n] for n in p.class_names], np.int64) for p in parts]
    table = RecordTable.concatenate([p.records for p in parts], maps)
    dropped = {k: sum(p.num_dropped[k] for p in parts) for k in parts[0].num_dropped}
    sets = [s for p in parts for s in p.sets]
    if len(sets) > 1:
        logger.info("%d annotation files, %d images, %d instances, %d classes: %s", len(sets), len(table),
                    len(table.instances.labels), len(names),
                    "; ".join(f"{s.annotations} ({s.num_images} images, {s.num_instances} instances)" for s in sets))
    return CocoData(annotations_path=" + ".join(s.annotations for s in sets), images_dir=str(dirs[0]), records=table,
                    class_names=names, category_ids=ids, num_dropped=dropped, sets=sets, is_train=is_train)
