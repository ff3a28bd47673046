"""One conversion, start to end: read a VOC / YOLO / LabelMe dataset, write COCO JSON (optionally a
train/val split) and report what was converted and what was skipped.

``tools/convert_dataset.py`` is a thin command line over :func:`convert_dataset`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ...errors import UsageError
from ...fileio import write_json_atomic
from ..coco import DatasetError
from . import common as C
from .labelme import read_labelme
from .voc import read_voc, voc_layout
from .yolo import read_yolo, yolo_layout

__all__ = ["FORMATS", "ConvertOptions", "ConvertReport", "convert_dataset", "output_paths"]

#: the source formats, as ``--format`` names them
FORMATS = ("voc", "yolo", "labelme")
_TITLE = {"voc": "Pascal VOC", "yolo": "YOLO", "labelme": "LabelMe"}


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert; mirrors the command line of ``tools/convert_dataset.py``.

    Attributes:
        format: ``"voc"``, ``"yolo"`` or ``"labelme"``.
        input: the dataset folder.
        output: the COCO JSON to write (``OUT.json``; with ``val_fraction``, ``OUT_train.json`` and
            ``OUT_val.json`` instead).
        images: folder the ``file_name`` of the output are relative to (what ``data.*.images``
            must be set to); None: ``DIR/JPEGImages`` (VOC), ``DIR/images`` (YOLO), else ``DIR``.
        classes: a text file of class names, one per line, fixing the class list and its order
            (category ids 1..K); None: YOLO's own names, else the sorted names found.
        val_fraction: in (0, 1): split the images into train and val by this fraction.
        seed: seed of the split.
        strict: stop at the first problem (:class:`DatasetError`) instead of skipping the entry.
        drop_difficult: VOC only: leave ``difficult`` objects out instead of writing ``iscrowd: 1``.
    """

    format: str
    input: str
    output: str
    images: Optional[str] = None
    classes: Optional[str] = None
    val_fraction: Optional[float] = None
    seed: int = 0
    strict: bool = False
    drop_difficult: bool = False


@dataclass
class ConvertReport:
    """What :func:`convert_dataset` did.

    Attributes:
        outputs: the files written (one, or train then val).
        images_root: the folder the ``file_name`` are relative to.
        class_names: the categories, id ``i + 1`` for ``class_names[i]``.
        num_images, num_negatives: images written, and those without any annotation.
        per_class: class name -> annotations written (crowd regions included).
        num_crowd: annotations written with ``iscrowd: 1``.
        problems: problem kind -> skipped entries.
        info: other counts (e.g. ``difficult dropped``).
        parts: per written file, (images, annotations).
    """

    outputs: list[Path]
    images_root: Path
    class_names: list[str]
    num_images: int
    num_negatives: int
    per_class: dict[str, int]
    num_crowd: int
    problems: dict[str, int]
    info: dict[str, int] = field(default_factory=dict)
    parts: list[tuple[int, int]] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """The human summary: images, annotations per class, problems by kind, files written."""
        total = sum(self.per_class.values())
        lines = [f"{self.num_images} images ({self.num_negatives} without annotations), {total} annotations"
                 f"{f' ({self.num_crowd} iscrowd)' if self.num_crowd else ''}, {len(self.class_names)} classes:"]
        width = max(len(n) for n in self.class_names)
        lines += [f"  {i + 1:>3} {n:<{width}}  {self.per_class.get(n, 0)}" for i, n in enumerate(self.class_names)]
        lines += [f"{k}: {v}" for k, v in self.info.items() if v]
        skipped = sum(self.problems.values())
        lines.append("problems: none" if not skipped else f"problems: {skipped} skipped ("
                     + ", ".join(f"{v} {k}" for k, v in sorted(self.problems.items())) + ")")
        for path, (n_img, n_ann) in zip(self.outputs, self.parts):
            lines.append(f"wrote {path} ({n_img} images, {n_ann} annotations)")
        lines.append(f"file names are relative to {self.images_root} (data.*.images)")
        return lines


def output_paths(output: str, val_fraction: Optional[float]) -> list[Path]:
    """``[OUT.json]``, or ``[OUT_train.json, OUT_val.json]`` with a split."""
    out = Path(output)
    if val_fraction is None:
        return [out]
    suffix = out.suffix or ".json"
    return [out.with_name(f"{out.stem}_train{suffix}"), out.with_name(f"{out.stem}_val{suffix}")]


def _check_options(opts: ConvertOptions) -> None:
    if opts.format not in FORMATS:
        raise UsageError(f"--format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if not Path(opts.input).is_dir():
        raise UsageError(f"--input {opts.input}: not a folder; give the dataset's folder")
    if opts.images is not None and not Path(opts.images).is_dir():
        raise UsageError(f"--images {opts.images}: not a folder; give the folder that holds the images")
    if opts.val_fraction is not None and not 0.0 < opts.val_fraction < 1.0:
        raise UsageError(f"--val-fraction {opts.val_fraction}: give a fraction of the images strictly between "
                         "0 and 1, e.g. 0.2")
    if opts.drop_difficult and opts.format != "voc":
        raise UsageError("--drop-difficult applies to --format voc only (VOC's <difficult> flag)")
    if Path(opts.output).is_dir():
        raise UsageError(f"--output {opts.output} is a folder; give a file name such as {Path(opts.output) / 'coco.json'}")


def _default_images(opts: ConvertOptions) -> Path:
    if opts.images is not None:
        return Path(opts.images)
    if opts.format == "voc":
        return voc_layout(Path(opts.input))[1]
    if opts.format == "yolo":
        return yolo_layout(Path(opts.input))[0]
    return Path(opts.input)


def convert_dataset(opts: ConvertOptions, warn: Optional[Callable[[str], None]] = None) -> ConvertReport:
    """Convert the dataset ``opts`` describes and write its COCO JSON file(s) atomically.

    ``warn`` receives one line per skipped entry (default: a warning on the ``detkit`` logger).

    Raises:
        UsageError: a bad option (format, folders, ``val_fraction``, ``drop_difficult``, class file).
        DatasetError: nothing usable found, a broken class list, or with ``strict`` the first problem.
    """
    _check_options(opts)
    problems = C.Problems(strict=opts.strict, warn=warn)
    fixed = C.read_class_file(opts.classes) if opts.classes else None
    src, images_root = Path(opts.input), _default_images(opts)
    outputs = output_paths(opts.output, opts.val_fraction)
    if not images_root.is_dir():
        raise DatasetError(f"{images_root}: images folder not found; pass --images DIR")
    if opts.format == "voc":
        dataset = read_voc(src, images_root, problems, drop_difficult=opts.drop_difficult)
    elif opts.format == "yolo":
        dataset = read_yolo(src, images_root, problems, class_names=fixed)
    else:
        dataset = read_labelme(src, images_root, problems, exclude=tuple(outputs))
    class_names = C.resolve_class_names(dataset, fixed)
    coco = C.build_coco(dataset, class_names, problems,
                        description=f"converted from {_TITLE[opts.format]} ({os.path.abspath(src)}) by detkit")
    if not coco["images"]:
        raise DatasetError(f"{src}: no usable image left ({problems.total} problems, see the warnings above); "
                           "fix them or check --format and --images")
    parts = [coco] if opts.val_fraction is None else list(C.split_coco(coco, opts.val_fraction, opts.seed))
    for path, part in zip(outputs, parts):
        write_json_atomic(path, part)
    return _report(coco, parts, outputs, images_root, class_names, problems, dataset.info)


def _report(coco: dict[str, Any], parts: list[dict[str, Any]], outputs: list[Path], images_root: Path,
            class_names: list[str], problems: C.Problems, info: dict[str, int]) -> ConvertReport:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = Counter(names[a["category_id"]] for a in coco["annotations"])
    annotated = {a["image_id"] for a in coco["annotations"]}
    return ConvertReport(
        outputs=outputs, images_root=images_root, class_names=list(class_names),
        num_images=len(coco["images"]), num_negatives=sum(1 for im in coco["images"] if im["id"] not in annotated),
        per_class={n: per_class.get(n, 0) for n in class_names},
        num_crowd=sum(1 for a in coco["annotations"] if a["iscrowd"]),
        problems=dict(problems.counts), info=dict(info),
        parts=[(len(p["images"]), len(p["annotations"])) for p in parts],
    )
