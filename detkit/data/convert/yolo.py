"""YOLO (Ultralytics / darknet) txt reader.

Layouts:

* ``DIR/images/...`` and ``DIR/labels/...`` mirrored, split subfolders included
  (``images/train/a.jpg`` -> ``labels/train/a.txt``): the Ultralytics layout;
* one folder with each ``a.txt`` beside its ``a.jpg`` (darknet).

The images converted are those under ``--images`` (default ``DIR/images``, or ``DIR`` for the flat
layout), so ``--images DIR/images/val`` converts the val split alone. An image without a label
file, or with an empty one, is a negative (kept without annotations); a label file without an
image is a ``missing image`` problem.

Each label line is ``class cx cy w h`` (a box) or ``class x1 y1 x2 y2 x3 y3 ...`` (a polygon,
>= 3 points), coordinates normalized to [0, 1] by the image width and height; a polygon's box is
its bounds. Class indices are 0-based into the class names of ``DIR/data.yaml`` (``names:`` as a
list or as a ``{index: name}`` mapping), else ``DIR/classes.txt`` (one per line), else
``--classes``. The image size comes from the image header (EXIF orientation applied).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import yaml

from ...errors import UsageError
from ..coco import DatasetError
from ..images import IMAGE_EXTENSIONS
from . import common as C

__all__ = ["read_yolo", "yolo_class_names", "yolo_layout"]

_HINT = "YOLO coordinates are normalized to [0, 1] by the image width and height: check them"


def yolo_layout(input_dir: Path) -> tuple[Path, Path]:
    """(images base folder, labels base folder): ``DIR/images`` and ``DIR/labels``, or ``DIR`` twice."""
    images, labels = input_dir / "images", input_dir / "labels"
    if images.is_dir() and labels.is_dir():
        return images, labels
    if images.is_dir():
        raise DatasetError(f"{input_dir} has images/ but no labels/; YOLO label files go in {labels} "
                           "(images/train/a.jpg -> labels/train/a.txt)")
    return input_dir, input_dir


def _names_from_yaml(path: Path) -> Optional[list[str]]:
    """The ``names:`` of a data.yaml (list, or mapping of contiguous 0-based indices); None without ``names``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())
        raise DatasetError(f"{path}: cannot read it ({detail}); fix the YAML or pass --classes FILE") from None
    names = data.get("names") if isinstance(data, dict) else None
    if names is None:
        return None
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = []
        if keys != list(range(len(names))):
            raise DatasetError(f"{path}: names: keys {list(names)} must be the class indices 0..{len(names) - 1}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, list):
        raise DatasetError(f"{path}: names: must be a list of class names or a mapping index -> name")
    out = C.check_class_names(names, f"{path} names:")
    nc = data.get("nc")
    if nc is not None and nc != len(out):
        raise DatasetError(f"{path}: nc: {nc} but names: lists {len(out)} classes; make them agree")
    return out


def yolo_class_names(input_dir: Path) -> list[str]:
    """Class names from ``DIR/data.yaml`` (``names:``), else ``DIR/classes.txt``; DatasetError when neither has them."""
    for name in ("data.yaml", "data.yml"):
        if (input_dir / name).is_file():
            names = _names_from_yaml(input_dir / name)
            if names is not None:
                return names
    if (input_dir / "classes.txt").is_file():
        return C.read_class_file(input_dir / "classes.txt")
    raise DatasetError(f"{input_dir}: no data.yaml with names: and no classes.txt, so the YOLO class indices have no "
                       "names; add one of them or pass --classes FILE (one name per line, in index order)")


def _scan_root(image_base: Path, images_root: Path) -> Path:
    """The folder whose images are converted: the deeper of the layout's images folder and ``--images``."""
    base, root = Path(os.path.abspath(image_base)), Path(os.path.abspath(images_root))
    if root == base or base in root.parents:
        return image_base / root.relative_to(base)
    if root in base.parents:
        return image_base
    raise UsageError(f"--images {images_root}: for this YOLO dataset it must be {image_base}, a folder inside it "
                     "(e.g. a split) or a folder above it")


def _parse_line(label: Path, lineno: int, line: str, names: list[str], width: int, height: int,
                problems: C.Problems) -> Optional[C.SourceObject]:
    """One label line as a :class:`SourceObject`; None for a blank line or a recorded problem."""
    tokens = line.split()
    if not tokens:
        return None
    where = f"{label}:{lineno}"
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        problems.add(C.MALFORMED_ENTRY, where, f"non-numeric value in {line.strip()!r}; "
                     "expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...' (normalized)")
        return None
    cls, coords = values[0], values[1:]
    if not all(math.isfinite(v) for v in values) or not cls.is_integer() or not (len(coords) == 4 or (
            len(coords) >= 6 and len(coords) % 2 == 0)):
        problems.add(C.MALFORMED_ENTRY, where, f"expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...' with an "
                     f"integer class and normalized coordinates, got {line.strip()!r}")
        return None
    if not 0 <= cls < len(names):
        problems.add(C.UNKNOWN_CLASS, where, f"class index {int(cls)} is not in the class list (0..{len(names) - 1}: "
                     f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); fix the label or the class names")
        return None
    name = names[int(cls)]
    if len(coords) == 4:
        cx, cy, w, h = coords[0] * width, coords[1] * height, coords[2] * width, coords[3] * height
        box = C.check_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), width, height, where, problems, _HINT)
        return None if box is None else C.SourceObject(name, box, [], False, where)
    pixels = [v * (width if i % 2 == 0 else height) for i, v in enumerate(coords)]
    poly = C.check_polygon(pixels, width, height, where, problems, _HINT)
    return None if poly is None else C.SourceObject(name, C.polygons_box([poly]), [poly], False, where)


def _read_labels(label: Path, names: list[str], width: int, height: int,
                 problems: C.Problems) -> list[C.SourceObject]:
    """The usable objects of one label file (an absent file: none)."""
    if not label.is_file():
        return []
    try:
        text = label.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.add(C.MALFORMED_FILE, str(label), f"cannot read the label file ({e})")
        return []
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        obj = _parse_line(label, lineno, line, names, width, height, problems)
        if obj is not None:
            objects.append(obj)
    return objects


def read_yolo(input_dir: Path, images_root: Optional[Path], problems: C.Problems,
              class_names: Optional[list[str]] = None) -> C.SourceDataset:
    """Read a YOLO dataset (layouts, label lines and class names: see the module doc).

    Args:
        input_dir: the dataset folder.
        images_root: folder the COCO ``file_name`` are relative to; also limits the images
            converted (None: the layout's images folder).
        problems: where unusable files and lines are recorded.
        class_names: ``--classes`` (overrides the dataset's own names), or None.
    """
    image_base, label_base = yolo_layout(input_dir)
    names = class_names if class_names is not None else yolo_class_names(input_dir)
    images_root = images_root or image_base
    scan = _scan_root(image_base, images_root)
    images = C.iter_files(scan, IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(f"{scan}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    out = C.SourceDataset(images=[], class_names=list(names))
    expected_labels = set()
    for image in images:
        label = label_base / image.relative_to(image_base).with_suffix(".txt")
        expected_labels.add(label)
        located = C.locate_image(image, images_root, str(label if label.is_file() else image), problems)
        if located is None:
            continue
        file_name, width, height = located
        objects = _read_labels(label, names, width, height, problems)
        out.images.append(C.SourceImage(file_name, width, height, objects, str(label if label.is_file() else image)))
    label_scan = label_base / scan.relative_to(image_base)
    for label in C.iter_files(label_scan, [".txt"]) if label_scan.is_dir() else []:
        if label not in expected_labels and label != input_dir / "classes.txt":
            looked = image_base / label.relative_to(label_base).with_suffix(".*")
            problems.add(C.MISSING_IMAGE, str(label), f"no image for this label file (looked for {looked}); "
                         "add the image or remove the label file")
    return out
