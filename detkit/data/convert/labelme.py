"""LabelMe JSON reader.

Every ``*.json`` under ``DIR`` (recursively) is one LabelMe file: ``imagePath`` (relative to the
JSON file; Windows separators accepted; when it names no file, an image with the JSON file's stem
beside it is used), ``imageWidth``/``imageHeight`` (checked against the image header) and
``shapes``. Each shape has ``label``, ``points`` ``[[x, y], ...]`` in pixels and ``shape_type``:

* ``polygon`` (or no ``shape_type``, as old LabelMe versions write): a polygon of >= 3 points,
  its box the polygon's bounds;
* ``rectangle``: a box from its two corners, written without a segmentation;
* anything else (``circle``, ``line``, ``linestrip``, ``point``, ``points``, ``mask``): skipped and
  counted as an ``unsupported shape``.

Polygons with the same ``label`` and a non-null ``group_id`` are one instance of several parts
(LabelMe's way to mark an occluded object split in two): one annotation with several polygons.
``imageData`` (an embedded copy of the image) is not used: the image file must exist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ..coco import DatasetError
from . import common as C

__all__ = ["read_labelme"]

_POLYGON, _RECTANGLE = "polygon", "rectangle"


def _load(path: Path, problems: C.Problems) -> Optional[dict[str, Any]]:
    """The JSON object of a LabelMe file, or None (a ``malformed file`` problem)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        problems.add(C.MALFORMED_FILE, f"{path}:{e.lineno}", f"malformed JSON at line {e.lineno} column {e.colno} "
                     f"({e.msg}); fix or remove the file")
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.add(C.MALFORMED_FILE, str(path), f"cannot read the file ({e})")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or not isinstance(data.get("imagePath"), str):
        problems.add(C.MALFORMED_FILE, str(path), "not a LabelMe file: needs a 'shapes' list and an 'imagePath' string")
        return None
    return data


def _size(data: dict[str, Any]) -> Optional[tuple[int, int]]:
    """(imageWidth, imageHeight) when both are positive numbers, else None (read from the image)."""
    w, h = data.get("imageWidth"), data.get("imageHeight")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (w, h))
    return (int(w), int(h)) if ok else None


def _points(shape: dict[str, Any]) -> Optional[list[float]]:
    """``points`` flattened to ``[x1, y1, x2, y2, ...]``; None when not a list of finite (x, y) pairs."""
    pts = shape.get("points")
    if not isinstance(pts, list):
        return None
    flat: list[float] = []
    for p in pts:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
            return None
        flat.extend(float(v) for v in p)
    return flat


def _shape(path: Path, i: int, shape: Any, width: int, height: int, problems: C.Problems) -> Optional[C.SourceObject]:
    """``shapes[i]`` as a :class:`SourceObject` (one polygon or a box), or None (a problem)."""
    if not isinstance(shape, dict):
        problems.add(C.MALFORMED_ENTRY, f"{path}: shapes[{i}]", "must be an object with label, points and shape_type")
        return None
    label = str(shape.get("label") or "").strip()
    where = f"{path}: shapes[{i}]" + (f" ({label!r})" if label else "")
    kind = shape.get("shape_type") or _POLYGON
    if kind not in (_POLYGON, _RECTANGLE):
        problems.add(C.UNSUPPORTED_SHAPE, where, f"shape_type {kind!r} is not converted (polygon and rectangle are); "
                     "redraw it as a polygon or a rectangle")
        return None
    if not label:
        problems.add(C.MALFORMED_ENTRY, where, "has no label; give every shape its class name")
        return None
    pts = _points(shape)
    if pts is None or (kind == _RECTANGLE and len(pts) < 4):
        problems.add(C.MALFORMED_ENTRY, where, "points must be a list of [x, y] pairs (two corners for a rectangle)")
        return None
    if kind == _RECTANGLE:
        xs, ys = pts[0::2], pts[1::2]
        box = C.check_box((min(xs), min(ys), max(xs), max(ys)), width, height, where, problems)
        return None if box is None else C.SourceObject(label, box, [], False, where)
    poly = C.check_polygon(pts, width, height, where, problems)
    return None if poly is None else C.SourceObject(label, C.polygons_box([poly]), [poly], False, where)


def _objects(path: Path, shapes: list, width: int, height: int, problems: C.Problems) -> list[C.SourceObject]:
    """The objects of one file in shape order, polygon parts sharing (label, group_id) merged into the first."""
    objects: list[C.SourceObject] = []
    groups: dict[tuple[str, Any], C.SourceObject] = {}
    for i, shape in enumerate(shapes):
        obj = _shape(path, i, shape, width, height, problems)
        if obj is None:
            continue
        group = shape.get("group_id")
        key = (obj.category, json.dumps(group))
        first = groups.get(key) if group is not None and obj.polygons else None
        if first is not None:
            first.polygons.extend(obj.polygons)
            first.box = C.polygons_box(first.polygons)
            continue
        if group is not None and obj.polygons:
            groups[key] = obj
        objects.append(obj)
    return objects


def read_labelme(input_dir: Path, images_root: Optional[Path], problems: C.Problems,
                 exclude: tuple[Path, ...] = ()) -> C.SourceDataset:
    """Read every LabelMe JSON file under ``input_dir`` (format: see the module doc).

    Args:
        input_dir: the folder of LabelMe files (searched recursively).
        images_root: folder the COCO ``file_name`` are relative to (None: ``input_dir``).
        problems: where unusable files and shapes are recorded.
        exclude: files to leave out (the converter's own outputs, when written inside ``input_dir``).
    """
    images_root = images_root or input_dir
    skip = {p.absolute() for p in exclude}
    files = [p for p in C.iter_files(input_dir, [".json"]) if p.absolute() not in skip]
    if not files:
        raise DatasetError(f"{input_dir}: no LabelMe .json files found")
    out = C.SourceDataset(images=[])
    for path in files:
        data = _load(path, problems)
        if data is None:
            continue
        image = C.find_image(path.parent, data["imagePath"], path.stem)
        located = C.locate_image(image, images_root, str(path), problems, _size(data))
        if located is None:
            continue
        file_name, width, height = located
        out.images.append(C.SourceImage(file_name, width, height, _objects(path, data["shapes"], width, height, problems),
                                        str(path)))
    return out
