"""Pascal VOC XML reader.

Layouts:

* ``DIR/Annotations/*.xml`` with the images in ``DIR/JPEGImages/`` (the default images folder):
  each file's ``<filename>`` is looked up in the images folder;
* a flat folder of ``*.xml`` files (searched recursively) whose ``<filename>`` sits beside them
  (LabelImg): the images folder defaults to ``DIR``.

When ``<filename>`` is absent or names no file there, an image with the XML file's stem and an
image extension in the same place is used. ``<size>`` is checked against the image header (read
from the image when absent).

Coordinates: VOC boxes are 1-based inclusive pixel indices. As Detectron2's and torchvision's
VOC loaders do, ``xmin - 1, ymin - 1`` become x1, y1 and ``xmax, ymax`` stay x2, y2, so a box over
pixels 1..W is ``[0, W]`` in COCO's continuous frame. ``<difficult>1</difficult>`` objects become
``iscrowd: 1`` regions (ignored in training, as the detkit loader treats crowds), or are dropped
with ``drop_difficult``. XML is parsed with defusedxml: DTDs with entities (entity-expansion
"billion laughs" files) and external references are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..coco import DatasetError
from . import common as C

__all__ = ["read_voc", "voc_layout"]


def voc_layout(input_dir: Path) -> tuple[Path, Path, bool]:
    """(folder of the XML files, default images folder, whether images sit beside the XML files)."""
    if (input_dir / "Annotations").is_dir():
        return input_dir / "Annotations", input_dir / "JPEGImages", False
    return input_dir, input_dir, True


def _parse(xml: Path, problems: C.Problems) -> Optional[Element]:
    """The ``<annotation>`` root of ``xml``, or None (a ``malformed file`` problem)."""
    try:
        root = SafeET.parse(xml).getroot()
    except DefusedXmlException as e:
        problems.add(C.MALFORMED_FILE, str(xml), f"refused: the XML declares entities or a DTD ({type(e).__name__}), which "
                     "is blocked to prevent entity-expansion ('billion laughs') and external-entity attacks; "
                     "remove the <!DOCTYPE ...> block")
        return None
    except ParseError as e:
        line, col = getattr(e, "position", (0, 0))
        reason = str(e).rsplit(": line ", 1)[0]  # the position is given once, below
        problems.add(C.MALFORMED_FILE, f"{xml}:{line}",
                     f"malformed XML at line {line} column {col} ({reason}); fix or remove the file")
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.add(C.MALFORMED_FILE, str(xml), f"cannot read the file ({e})")
        return None
    if root.tag != "annotation":
        problems.add(C.MALFORMED_FILE, str(xml),
                     f"root element is <{root.tag}>, not <annotation>; is this a Pascal VOC file?")
        return None
    return root


def _number(el: Optional[Element], tag: str) -> Optional[float]:
    """The float in ``el``'s child ``tag``; None when absent or not a number."""
    text = None if el is None else el.findtext(tag)
    try:
        return float(text) if text is not None and text.strip() else None
    except ValueError:
        return None


def _image_path(xml: Path, root: Element, folder: Path) -> Path:
    """The image of ``xml``: ``folder/<filename>``, else ``folder/<xml stem>.<image ext>`` when that exists."""
    return C.find_image(folder, (root.findtext("filename") or "").strip(), xml.stem)


def _object(xml: Path, k: int, obj: Element, width: int, height: int, problems: C.Problems) -> Optional[C.SourceObject]:
    """The ``k``-th (1-based) ``<object>`` of ``xml`` as a :class:`SourceObject`, or None (a problem)."""
    name = (obj.findtext("name") or "").strip()
    where = f"{xml}: <object> {k}" + (f" ({name!r})" if name else "")
    if not name:
        problems.add(C.MALFORMED_ENTRY, where, "has no <name>; give every object its class name")
        return None
    box = obj.find("bndbox")
    coords = [_number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")]
    if any(v is None for v in coords):
        problems.add(C.MALFORMED_ENTRY, where, "needs a <bndbox> with numeric <xmin>, <ymin>, <xmax>, <ymax>")
        return None
    xmin, ymin, xmax, ymax = coords
    clipped = C.check_box((xmin - 1.0, ymin - 1.0, xmax, ymax), width, height, where, problems)
    if clipped is None:
        return None
    difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false", "False")
    return C.SourceObject(category=name, box=clipped, polygons=[], iscrowd=difficult, where=where)


def read_voc(input_dir: Path, images_root: Optional[Path], problems: C.Problems,
             drop_difficult: bool = False) -> C.SourceDataset:
    """Read every VOC XML file of ``input_dir`` (layouts: see the module doc).

    Args:
        input_dir: the dataset folder.
        images_root: folder the COCO ``file_name`` are relative to (None: the layout's default).
        problems: where unusable files and objects are recorded.
        drop_difficult: leave ``difficult`` objects out instead of writing them as ``iscrowd: 1``.
    """
    xml_dir, default_images, beside = voc_layout(input_dir)
    images_root = images_root or default_images
    files = C.iter_files(xml_dir, [".xml"])
    if not files:
        raise DatasetError(f"{xml_dir}: no .xml files found; expected DIR/Annotations/*.xml or a folder of VOC XML files")
    out = C.SourceDataset(images=[], info={"difficult dropped": 0})
    for xml in files:
        root = _parse(xml, problems)
        if root is None:
            continue
        size_el = root.find("size")
        w, h = _number(size_el, "width"), _number(size_el, "height")
        size = (int(w), int(h)) if w and h and w > 0 and h > 0 else None
        located = C.locate_image(_image_path(xml, root, xml.parent if beside else images_root),
                                 images_root, str(xml), problems, size)
        if located is None:
            continue
        file_name, width, height = located
        objects = []
        for k, obj in enumerate(root.findall("object"), start=1):
            o = _object(xml, k, obj, width, height, problems)
            if o is not None and o.iscrowd and drop_difficult:
                out.info["difficult dropped"] += 1
            elif o is not None:
                objects.append(o)
        out.images.append(C.SourceImage(file_name=file_name, width=width, height=height, objects=objects, where=str(xml)))
    return out
