"""What ``tools/infer.py`` reads: the input (:func:`list_input`), the records' image and category ids
(:func:`read_coco_json`, :func:`image_ids_for`, :func:`resolve_category_ids`), and the images
themselves, optionally read ahead on a background thread (:func:`read_images`) so that decoding
overlaps with inference. Used by :mod:`detkit.inference.runner`; bad input raises a
:class:`~detkit.errors.DetkitError`, warnings (``warning: ...``) go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import numpy as np

from ..data.classes import ClassInfo
from ..data.coco import DatasetError
from ..data.images import IMAGE_EXTENSIONS, read_image
from ..errors import UsageError

__all__ = [
    "VIDEO_EXTENSIONS", "InferInput", "CocoIndex", "CategoryIds", "ReadImage", "warn", "list_input",
    "read_coco_json", "resolve_category_ids", "image_ids_for", "read_images",
]

#: file extensions read as videos (lower case, with the dot)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")


def warn(msg: str, prefix: str = "") -> None:
    """Print ``<prefix>warning: <msg>`` to stderr."""
    print(f"{prefix}warning: {msg}", file=sys.stderr)


@dataclass(frozen=True)
class InferInput:
    """What ``--input`` names: ``kind="images"`` with the image, or a folder's images sorted by
    name; ``kind="video"`` with ``files == [the video]``."""

    kind: Literal["images", "video"]
    files: list[Path]


def list_input(path: Path) -> InferInput:
    """The images or the video that ``path`` names; :class:`UsageError` for anything else."""
    path = Path(path)
    images, videos = ", ".join(sorted(IMAGE_EXTENSIONS)), ", ".join(sorted(VIDEO_EXTENSIONS))
    if not path.exists():
        raise UsageError(f"--input {path}: no such file or folder; pass an image, a folder of images or a video")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UsageError(f"--input {path}: folder holds no images ({images})")
        return InferInput("images", files)
    ext = path.suffix.lower()
    if ext in VIDEO_EXTENSIONS:
        return InferInput("video", [path])
    if ext in IMAGE_EXTENSIONS:
        return InferInput("images", [path])
    raise UsageError(f"--input {path}: unknown file type {ext or '(none)'!r}; use an image ({images}) "
                     f"or a video ({videos})")


@dataclass(frozen=True)
class CocoIndex:
    """What a COCO annotations file says about the records' ids.

    Attributes:
        image_ids: base name of each image's ``file_name`` -> its image id; -1 when the base name
            is listed twice with different ids (ambiguous).
        category_ids: the file's category ids, sorted.
    """

    image_ids: dict[str, int]
    category_ids: list[int]


def read_coco_json(path: Path) -> CocoIndex:
    """The :class:`CocoIndex` of a COCO annotations file (``--coco-json``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--coco-json {path}: no such file; pass a COCO annotations file such as "
                         "instances_val2017.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"--coco-json {path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"--coco-json {path}: no 'images' list; pass a COCO annotations file (not a results file)")
    ids: dict[str, int] = {}
    try:
        for im in data["images"]:
            name, iid = Path(str(im["file_name"])).name, int(im["id"])
            ids[name] = iid if ids.get(name, iid) == iid else -1
        cats = sorted({int(c["id"]) for c in data.get("categories") or []})
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"--coco-json {path}: an image or category lacks a valid {e} entry") from None
    return CocoIndex(ids, cats)


@dataclass(frozen=True)
class CategoryIds:
    """The records' category id of each label (None: ``label + 1``) and where they come from."""

    ids: Optional[list[int]]
    source: str


def resolve_category_ids(classes: ClassInfo, coco_categories: Optional[Sequence[int]]) -> CategoryIds:
    """The records' category ids: the data's ids that the config records (``data.category_ids``,
    or its annotation files' categories, see :func:`~detkit.data.classes.resolve_classes`); else
    ``coco_categories`` (``--coco-json``'s sorted ids) when there is one per class; else None,
    i.e. ``label + 1``. Recorded ids missing from ``coco_categories`` are warned about."""
    if classes.category_ids:
        source = ("the config's data.category_ids" if classes.source == "data.class_names"
                  else f"the categories of {classes.source}")
        if coco_categories and not set(classes.category_ids) <= set(coco_categories):
            missing = sorted(set(classes.category_ids) - set(coco_categories))[:5]
            warn(f"category ids {missing} of {source} are not in --coco-json's categories")
        return CategoryIds([int(c) for c in classes.category_ids], source)
    if coco_categories and len(coco_categories) == classes.num_classes:
        return CategoryIds([int(c) for c in coco_categories], "--coco-json's categories (sorted ids)")
    return CategoryIds(None, "label + 1 (the config records no data.category_ids)")


def image_ids_for(files: Sequence[Path], coco_ids: Optional[dict[str, int]],
                  coco_json: Optional[str]) -> list[Optional[int]]:
    """The image id of each input file: its ``--coco-json`` id (None when not listed, warned),
    else its position in ``files``."""
    if coco_ids is None:
        return list(range(len(files)))
    ids: list[Optional[int]] = []
    for f in files:
        iid = coco_ids.get(f.name)
        if iid == -1:
            raise DatasetError(f"--coco-json {coco_json}: {f.name} is listed twice with different image ids")
        ids.append(iid)
    missing = [f.name for f, i in zip(files, ids) if i is None]
    if len(missing) == len(files):
        raise UsageError(f"--coco-json {coco_json}: none of the input images ({files[0].name}, ...) is listed in "
                         "its 'images'; pass the annotations of these images")
    if missing:
        warn(f"{len(missing)} input image(s) not in --coco-json get no records (e.g. {missing[0]})")
    return ids


@dataclass(frozen=True)
class ReadImage:
    """Image ``index`` of the input, ``path``: its RGB pixels, or None and why it is unreadable."""

    index: int
    path: Path
    image: Optional[np.ndarray]
    error: str = ""


def _read(index: int, path: Path) -> ReadImage:
    try:
        return ReadImage(index, path, read_image(path))
    except OSError as e:  # corrupt / unreadable (ImageReadError is an OSError)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else f"cannot read image {path}"
        return ReadImage(index, path, None, msg)


def read_images(files: Sequence[Path], ahead: int = 0) -> Iterator[ReadImage]:
    """Each of ``files`` read, in order. With ``ahead`` > 0 one background thread reads up to
    ``ahead`` images before they are asked for (OpenCV decodes without holding the GIL); closing
    the iterator early cancels what is still queued."""
    if ahead <= 0:
        yield from (_read(i, f) for i, f in enumerate(files))
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detkit-read")
    queued: deque = deque()
    try:
        for i, f in enumerate(files):
            queued.append(pool.submit(_read, i, f))
            if len(queued) > ahead:
                yield queued.popleft().result()
        while queued:
            yield queued.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
