"""What the three readers share: the source records, the geometry checks, the problem log, the COCO
writer and the train/val split.

A reader (:mod:`.voc`, :mod:`.yolo`, :mod:`.labelme`) turns its files into a
:class:`SourceDataset`: one :class:`SourceImage` per annotated image, each with its
:class:`SourceObject` list in file order. Every entry it cannot use goes to a :class:`Problems`
log as one line naming the file and the line or element (``labels/a.txt:3``,
``Annotations/a.xml: <object> 2``, ``a.json: shapes[4]``); the entry is skipped and counted, or,
with ``strict``, the first one raises :class:`~detkit.data.coco.DatasetError`.

Coordinates are absolute pixels in COCO's continuous frame: the image spans ``[0, width] x
[0, height]`` and a pixel ``(i, j)`` covers ``[i, i+1] x [j, j+1]``. A box or polygon point may
lie up to :data:`TOLERANCE_PX` outside the image (annotation tools round); it is clipped. Farther
out, the whole object is a ``box outside image`` problem: it usually means a wrong image size or
coordinates in the wrong units.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ...errors import UsageError
from ..coco import DatasetError
from ..images import IMAGE_EXTENSIONS, ImageReadError, image_size

__all__ = [
    "TOLERANCE_PX",
    "Problems",
    "SourceDataset",
    "SourceImage",
    "SourceObject",
    "build_coco",
    "check_box",
    "check_class_names",
    "check_polygon",
    "find_image",
    "iter_files",
    "locate_image",
    "polygon_area",
    "polygons_box",
    "read_class_file",
    "resolve_class_names",
    "split_coco",
]

logger = logging.getLogger("detkit")
PathLike = Union[str, "os.PathLike[str]"]

#: how far (pixels) a box or polygon point may lie outside its image and still be clipped in
TOLERANCE_PX = 1.0

# problem kinds, as printed in the summary
UNKNOWN_CLASS = "unknown class"
BOX_OUTSIDE = "box outside image"
DEGENERATE = "degenerate box or polygon"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
SIZE_MISMATCH = "image size mismatch"
DUPLICATE_IMAGE = "duplicate image"
MALFORMED_FILE = "malformed file"
MALFORMED_ENTRY = "malformed entry"
UNSUPPORTED_SHAPE = "unsupported shape"


@dataclass
class Problems:
    """The skipped entries of one conversion, counted by kind.

    Attributes:
        strict: raise :class:`DatasetError` at the first problem instead of skipping the entry.
        warn: called with each problem's one-line message (default: a ``detkit`` logger warning).
        counts: problem kind (e.g. ``"unknown class"``) -> number of skipped entries.
        messages: every message, in order.
    """

    strict: bool = False
    warn: Optional[Callable[[str], None]] = None
    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def add(self, kind: str, where: str, what: str) -> None:
        """Record one skipped entry: ``where`` names the file (and line/element), ``what`` the fault and the fix."""
        message = f"{where}: {what}"
        if self.strict:
            raise DatasetError(f"{message} (--strict: fix it, or drop --strict to skip such entries)")
        self.counts[kind] += 1
        self.messages.append(message)
        (self.warn or logger.warning)(f"skipped {kind}: {message}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class SourceObject:
    """One object of a source annotation file, already checked against its image.

    Attributes:
        category: class name (str), not yet checked against the class list.
        box: (x1, y1, x2, y2) floats, absolute pixels, inside the image, x2 > x1 and y2 > y1.
        polygons: flat pixel polygons ``[x1, y1, x2, y2, ...]`` (>= 3 points each, inside the
            image) when the source has an outline; empty for box-only objects.
        iscrowd: True for a region the detector should ignore (VOC ``difficult``).
        where: the file and line/element it came from, for messages.
    """

    category: str
    box: tuple[float, float, float, float]
    polygons: list[list[float]]
    iscrowd: bool
    where: str


@dataclass
class SourceImage:
    """One image and its objects.

    Attributes:
        file_name: path of the image relative to the images folder, POSIX separators.
        width, height: image size in pixels (ints > 0), as :func:`~detkit.data.read_image` decodes it.
        objects: its usable objects in file order (empty for a negative image).
        where: the annotation file it came from (or the image itself when it has none).
    """

    file_name: str
    width: int
    height: int
    objects: list[SourceObject]
    where: str


@dataclass
class SourceDataset:
    """What a reader found.

    Attributes:
        images: the usable images, in reading order.
        class_names: the class list the source defines in its own order (YOLO's ``data.yaml`` or
            ``classes.txt``), or None when the classes are just the names found (VOC, LabelMe).
        info: extra counts for the summary (e.g. ``{"difficult dropped": 3}``).
    """

    images: list[SourceImage]
    class_names: Optional[list[str]] = None
    info: dict[str, int] = field(default_factory=dict)


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def _outside(values: Sequence[float], hi: float) -> bool:
    return any(v < -TOLERANCE_PX or v > hi + TOLERANCE_PX for v in values)


def check_box(box: Sequence[float], width: int, height: int, where: str, problems: Problems,
              hint: str = "check the coordinates and the image size") -> Optional[tuple[float, float, float, float]]:
    """``box`` (x1, y1, x2, y2 pixels) clipped to the image, or None (recorded as a problem) when it
    lies more than :data:`TOLERANCE_PX` outside the ``width`` x ``height`` image or is empty.
    ``hint`` ends the message of a box outside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if _outside((x1, x2), width) or _outside((y1, y2), height):
        problems.add(BOX_OUTSIDE, where, f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
                     f"{width}x{height} image; {hint}")
        return None
    x1, x2, y1, y2 = _clip(x1, width), _clip(x2, width), _clip(y1, height), _clip(y2, height)
    if not (x2 > x1 and y2 > y1):
        problems.add(DEGENERATE, where, f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has no area; "
                     "x2 > x1 and y2 > y1 are needed")
        return None
    return x1, y1, x2, y2


def polygon_area(poly: Sequence[float]) -> float:
    """Area (pixels², shoelace formula) of a flat polygon ``[x1, y1, x2, y2, ...]``."""
    xs, ys = poly[0::2], poly[1::2]
    n = len(xs)
    twice = sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))
    return abs(twice) / 2.0


def check_polygon(points: Sequence[float], width: int, height: int, where: str, problems: Problems,
                  hint: str = "check the coordinates and the image size") -> Optional[list[float]]:
    """A flat pixel polygon ``[x1, y1, ...]`` clipped to the image, or None (recorded as a problem)
    when it has fewer than 3 points, no area, or a point more than :data:`TOLERANCE_PX` outside."""
    pts = [float(v) for v in points]
    if len(pts) < 6 or len(pts) % 2:
        problems.add(DEGENERATE, where, f"polygon has {len(pts) / 2:g} points; at least 3 (x, y) pairs are needed")
        return None
    if _outside(pts[0::2], width) or _outside(pts[1::2], height):
        problems.add(BOX_OUTSIDE, where, f"polygon has points outside the {width}x{height} image; {hint}")
        return None
    pts = [_clip(v, width if i % 2 == 0 else height) for i, v in enumerate(pts)]
    if polygon_area(pts) <= 0.0:
        problems.add(DEGENERATE, where, "polygon has no area (all points on a line)")
        return None
    return pts


def polygons_box(polygons: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    """The (x1, y1, x2, y2) bounds of one or more flat polygons."""
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return min(xs), min(ys), max(xs), max(ys)


def find_image(folder: Path, name: str, stem: str) -> Path:
    """The image an annotation names: ``folder/name`` when that file exists, else ``folder/<stem><ext>``
    for the first image extension that exists, else ``folder/name`` (reported missing later)."""
    named = folder / name.replace("\\", "/") if name else None
    if named is not None and named.is_file():
        return named
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return named if named is not None else folder / (stem + ".jpg")


def locate_image(path: Path, images_root: Path, where: str, problems: Problems,
                 size: Optional[tuple[int, int]] = None) -> Optional[tuple[str, int, int]]:
    """(file_name relative to ``images_root``, width, height) of the image file ``path``, or None
    (recorded as a problem) when it is missing, unreadable, outside ``images_root``, or its
    decoded size differs from the annotation's ``size`` (width, height) when one is given.

    Only the image header is read (EXIF orientation applied, as :func:`read_image` decodes it).
    """
    if not path.is_file():
        problems.add(MISSING_IMAGE, where, f"image {path} not found; put it there or fix the annotation's file name")
        return None
    try:  # absolute paths without resolving links: a linked image counts where the link is
        rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(images_root)))
    except ValueError:  # another drive on Windows
        rel = Path("..")
    if rel.parts[:1] == ("..",):
        problems.add(MISSING_IMAGE, where, f"image {path} is not inside the images folder {images_root}; "
                     "pass --images a folder that holds every image")
        return None
    try:
        h, w = image_size(path)
    except ImageReadError as e:
        problems.add(UNREADABLE_IMAGE, where, f"{e}")
        return None
    if size is not None and tuple(size) != (w, h):
        problems.add(SIZE_MISMATCH, where, f"says the image is {size[0]}x{size[1]} (width x height) but {path} "
                     f"is {w}x{h}; fix the size in the annotation file")
        return None
    return rel.as_posix(), w, h


def read_class_file(path: PathLike) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored); the order fixes the ids."""
    p = Path(path)
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the class list {p} ({e}); give a UTF-8 text file, one class name per line") from None
    return check_class_names(names, str(p))


def check_class_names(names: Sequence[Any], source: str) -> list[str]:
    """``names`` as a list of unique non-empty strings, else a one-line :class:`DatasetError`."""
    out = [str(n).strip() for n in names]
    if not out:
        raise DatasetError(f"{source} lists no class names; give one name per class")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup or "" in out:
        raise DatasetError(f"{source} has {'duplicate' if dup else 'empty'} class names {dup or ['']}; "
                           "every class needs its own name")
    return out


def resolve_class_names(dataset: SourceDataset, fixed: Optional[list[str]]) -> list[str]:
    """The class list: ``fixed`` (``--classes``) if given, else the source's own list, else the
    sorted set of names found; DatasetError when nothing names a class."""
    if fixed is not None:
        return list(fixed)
    if dataset.class_names is not None:
        return list(dataset.class_names)
    found = sorted({o.category for im in dataset.images for o in im.objects})
    if not found:
        raise DatasetError("no labelled object was found, so the class list is unknown; "
                           "pass --classes FILE (one class name per line)")
    return found


def build_coco(dataset: SourceDataset, class_names: Sequence[str], problems: Problems,
               description: str = "") -> dict[str, Any]:
    """The COCO dict of ``dataset``: categories 1..K in ``class_names`` order, images sorted by
    file name (ids 1..N), annotations in image then file order (ids 1..M).

    An object whose category is not in ``class_names`` is an ``unknown class`` problem; a second
    annotation file for the same image is a ``duplicate image`` problem (the first one wins).
    """
    cat_id = {name: i + 1 for i, name in enumerate(class_names)}
    shown = ", ".join(class_names[:8]) + (", ..." if len(class_names) > 8 else "")
    by_name: dict[str, SourceImage] = {}
    for im in dataset.images:
        first = by_name.get(im.file_name)
        if first is not None:
            problems.add(DUPLICATE_IMAGE, im.where, f"annotates {im.file_name}, which {first.where} annotates "
                         "already; keep one annotation file per image")
            continue
        by_name[im.file_name] = im
    images, annotations = [], []
    for image_id, name in enumerate(sorted(by_name), start=1):
        im = by_name[name]
        images.append({"id": image_id, "file_name": im.file_name, "width": int(im.width), "height": int(im.height)})
        for obj in im.objects:
            if obj.category not in cat_id:
                problems.add(UNKNOWN_CLASS, obj.where, f"class {obj.category!r} is not in the class list ({shown}); "
                             "add it to the class list or fix the label")
                continue
            x1, y1, x2, y2 = obj.box
            ann: dict[str, Any] = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[obj.category],
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "area": round(sum(polygon_area(p) for p in obj.polygons) if obj.polygons else (x2 - x1) * (y2 - y1), 3),
                "iscrowd": int(obj.iscrowd),
            }
            if obj.polygons:
                ann["segmentation"] = [[round(v, 3) for v in p] for p in obj.polygons]
            annotations.append(ann)
    categories = [{"id": cat_id[n], "name": n, "supercategory": "none"} for n in class_names]
    return {"info": {"description": description or "converted by detkit"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}


def split_coco(coco: dict[str, Any], val_fraction: float, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a COCO dict by image into (train, val), deterministically for a given ``seed``.

    The images (sorted by file name first, so the reading order does not matter) are shuffled
    with ``random.Random(seed)``; the first ``round(N * val_fraction)`` (at least 1, at most N-1)
    go to val. Both parts keep every category and the original image and annotation ids.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction {val_fraction}: give a fraction of the images strictly between 0 and 1, e.g. 0.2")
    images = sorted(coco["images"], key=lambda im: im["file_name"])
    if len(images) < 2:
        raise UsageError(f"--val-fraction needs at least 2 images to split, found {len(images)}")
    random.Random(seed).shuffle(images)
    n_val = min(max(int(round(len(images) * val_fraction)), 1), len(images) - 1)
    parts = []
    for part in (sorted(images[n_val:], key=lambda im: im["id"]), sorted(images[:n_val], key=lambda im: im["id"])):
        ids = {im["id"] for im in part}
        parts.append({**coco, "images": part, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]})
    return parts[0], parts[1]


def iter_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``root`` (recursively) whose lower-case suffix is in ``suffixes``, sorted; hidden ones skipped."""
    wanted = {s.lower() for s in suffixes}
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in wanted and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))
