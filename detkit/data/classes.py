"""The model's classes, resolved once, by one rule, for every tool.

detkit labels are contiguous, ``0..K-1``, in ascending order of the dataset's COCO category ids.
:func:`resolve_classes` finds ``K``, the name of each label and (when known) its category id:

1. from a loaded dataset (:class:`CocoData`) when one is given, e.g. by training;
2. else from ``data.class_names`` (with ``data.category_ids`` when recorded, as ``train_det.py``
   does in a run's ``config.yaml``);
3. else from the categories of ``data.train.annotations`` (several files: merged by name, see
   :func:`~detkit.data.coco.merge_classes`), then ``data.val.annotations``, the first that exists;
4. else from the generated shapes set when ``data.synthetic`` is configured;
5. else ``model.num_classes`` alone (names ``class_0``, ``class_1``, ...).

``model.num_classes`` may always be set as well; it must then agree with what the steps above
found. Nothing found is a :class:`ConfigError` that says what to set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..config.schema import DetectionConfig
from .coco import CocoData, DatasetError, merge_classes
from .synthetic import SHAPE_CLASSES

__all__ = ["ClassInfo", "resolve_classes"]


@dataclass(frozen=True)
class ClassInfo:
    """The classes of a detector.

    Attributes:
        names: display name of each contiguous label ``0..K-1``; unique.
        category_ids: the dataset's COCO category id of each label (ascending), or None when
            nothing records them (tools then write ``label + 1``).
        source: where the classes came from, for messages (e.g. ``"data.class_names"``).
    """

    names: list[str]
    category_ids: Optional[list[int]]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_count(cls, num_classes: int, source: str) -> "ClassInfo":
        """``num_classes`` unnamed classes (``class_0`` ...), e.g. for a model analyzed without data."""
        if int(num_classes) < 1:
            raise ConfigError(f"{source}: the number of classes must be at least 1, got {num_classes}")
        return cls([f"class_{i}" for i in range(int(num_classes))], None, source)


def _categories_of(path: str) -> Optional[tuple[list[str], list[int]]]:
    """(names, ids) of a COCO file's categories in ascending id order; None when the file is absent."""
    if not path or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cats = sorted(data.get("categories") or [], key=lambda c: int(c["id"]))
        names, ids = [str(c["name"]) for c in cats], [int(c["id"]) for c in cats]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise DatasetError(
            f"{path}: cannot read its categories ({detail}); fix the file or set data.class_names in the config"
        ) from None
    return (names, ids) if names else None


def _found(cfg: DetectionConfig, data: Optional[CocoData]) -> Optional[ClassInfo]:
    if data is not None:
        return ClassInfo(list(data.class_names), [int(c) for c in data.category_ids], data.annotations_path)
    d = cfg.data
    if d.class_names:
        ids = d.category_ids
        if ids is not None and len(ids) != len(d.class_names):
            raise ConfigError(
                f"data.category_ids has {len(ids)} ids but data.class_names names {len(d.class_names)} classes; "
                "make them agree or remove data.category_ids"
            )
        return ClassInfo(list(d.class_names), None if ids is None else [int(c) for c in ids], "data.class_names")
    train = [(p, _categories_of(p)) for p in d.train.annotation_files]
    if len(train) > 1 and all(cats is not None for _, cats in train):  # several training files, merged by name
        names, ids = merge_classes([(p, cats[0], cats[1]) for p, cats in train], d.class_names)  # type: ignore[index]
        return ClassInfo(names, ids, f"data.train.annotations ({', '.join(p for p, _ in train)})")
    for key, path in (("data.train.annotations", train[0][0] if train else None),
                      ("data.val.annotations", d.val.annotations)):
        cats = _categories_of(path) if path else None
        if cats is not None:
            return ClassInfo(cats[0], cats[1], f"{key} ({path})")
    if d.synthetic is not None:
        pairs = sorted(SHAPE_CLASSES)
        return ClassInfo([n for _, n in pairs], [c for c, _ in pairs], "the generated shapes set (data.synthetic)")
    return None


def resolve_classes(cfg: DetectionConfig, data: Optional[CocoData] = None) -> ClassInfo:
    """The detector's classes from ``cfg`` (and the loaded training ``data`` if given); see the module doc.

    Raises :class:`ConfigError` when nothing names the classes, when ``model.num_classes``
    disagrees with what names them; :class:`DatasetError` when an
    annotations file that should name them cannot be read.
    """
    found = _found(cfg, data)
    n = cfg.model.num_classes
    if found is None:
        if n is None:
            raise ConfigError(
                "the number of classes is unknown; set model.num_classes=K or data.class_names in the config "
                "(or point data.train.annotations at the COCO file)"
            )
        return ClassInfo.from_count(n, "model.num_classes")
    if n is not None and n != found.num_classes:
        shown = ", ".join(found.names[:5]) + (", ..." if found.num_classes > 5 else "")
        raise ConfigError(
            f"model.num_classes={n} but {found.source} names {found.num_classes} classes ({shown}); "
            "remove model.num_classes or make them agree"
        )
    return found
