"""Classification data laid out as ``<root>/<class>/<image>`` (for backbone pretraining).

The folder is scanned once (``os.scandir``: no ``stat`` per file) into a :class:`FileTable`, flat
buffers that the data-loading workers share without copying, and the scan is cached
(:func:`scan_image_folder`): a later run reads the cache after checking that no scanned folder has
changed (the modification time of every folder, which changes when a file is added, removed or
renamed in it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from ..fileio import detkit_home
from ..machine import release_freed_memory
from .coco import DatasetError
from .collate import ClassificationSample, SkippedSample, collate_classification
from .images import IMAGE_EXTENSIONS, ImageReadError, read_image
from .records import StringColumn

__all__ = ["ImageFolderDataset", "FileTable", "scan_image_folder", "check_class_sets", "collate_classification",
           "ClassificationSample"]

logger = logging.getLogger("detkit")
PathLike = Union[str, os.PathLike]
_CACHE_VERSION = 1


@dataclass
class FileTable:
    """The images of an ImageFolder, class after class (files sorted by path within a class).

    Attributes:
        root: the folder (as given).
        classes: class names in label order.
        files: each image's path relative to ``root``.
        labels: int32 [N], each image's label.
        dirs: every folder scanned, relative to ``root`` (``"."``: root itself); dir_mtimes: int64 [D],
            their modification times (ns) at the scan, which the cache is checked against.
    """

    root: str
    classes: list[str]
    files: StringColumn
    labels: np.ndarray
    dirs: StringColumn
    dir_mtimes: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        """(path, label) of image ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        i %= len(self)
        return os.path.join(self.root, self.files[i]), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def unchanged(self) -> bool:
        """Whether every scanned folder still has the modification time it had at the scan."""
        try:
            return all(os.stat(os.path.join(self.root, self.dirs[i])).st_mtime_ns == self.dir_mtimes[i]
                       for i in range(len(self.dirs)))
        except OSError:
            return False


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_class(root: str, name: str, dirs: list[str], mtimes: list[int]) -> list[str]:
    """The image files under ``root/name`` (any depth), relative to ``root``, sorted as ``Path`` objects sort;
    appends each folder visited to ``dirs`` and its modification time (ns) to ``mtimes``."""
    files, stack = [], [name]
    while stack:
        rel = stack.pop()
        mtimes.append(os.stat(os.path.join(root, rel)).st_mtime_ns)  # before listing: a later change shows
        dirs.append(rel)
        with os.scandir(os.path.join(root, rel)) as it:
            for e in it:
                if e.is_dir():
                    stack.append(os.path.join(rel, e.name))
                elif _is_image(e.name) and e.is_file():
                    files.append(os.path.join(rel, e.name))
    return sorted(files, key=lambda f: f.split(os.sep))


def _scan(root: Path, classes: Optional[Sequence[str]]) -> FileTable:
    dirs, mtimes = ["."], [os.stat(root).st_mtime_ns]
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        if not found:
            raise DatasetError(f"{root}: no class sub-folders; expected <root>/<class>/<image>")
        classes = found
    else:
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetError(f"{root}: class folder(s) {missing} not found; present: {found}")
    files: list[str] = []
    counts: list[int] = []
    for name in classes:
        found_files = _scan_class(str(root), name, dirs, mtimes)
        if not found_files:
            raise DatasetError(
                f"{root / name}: class folder '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        files += found_files
        counts.append(len(found_files))
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), counts)
    return FileTable(str(root), list(classes), StringColumn.from_strings(files), labels,
                     StringColumn.from_strings(dirs), np.array(mtimes, np.int64))


def _cache_path(root: Path, classes: Optional[Sequence[str]]) -> Path:
    base = detkit_home()
    key = repr((_CACHE_VERSION, str(root.absolute()), list(classes) if classes is not None else None))
    return base / "imagefolder" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"


def _read_cache(path: Path, root: Path) -> Optional[FileTable]:
    try:
        with np.load(path, allow_pickle=False) as z:
            table = FileTable(str(root), StringColumn(z["classes_data"], z["classes_offsets"]).to_list(),
                              StringColumn(z["files_data"], z["files_offsets"]), z["labels"],
                              StringColumn(z["dirs_data"], z["dirs_offsets"]), z["dir_mtimes"])
    except (OSError, KeyError, ValueError):
        return None
    return table if table.unchanged() else None


def _write_cache(path: Path, table: FileTable) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = StringColumn.from_strings(table.classes)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, classes_data=classes.data, classes_offsets=classes.offsets, files_data=table.files.data,
                 files_offsets=table.files.offsets, labels=table.labels, dirs_data=table.dirs.data,
                 dirs_offsets=table.dirs.offsets, dir_mtimes=table.dir_mtimes)
        os.replace(tmp, path)
    except OSError as e:  # e.g. a read-only home: no cache, the next run scans again
        logger.info("not caching the scan of %s (%s)", table.root, e)


def scan_image_folder(root: PathLike, classes: Optional[Sequence[str]] = None, cache: bool = True) -> FileTable:
    """The images under ``root/<class>/`` (any depth), scanned, or read from the cache of an earlier scan
    when no folder under ``root`` has changed since.

    The cache is one file per (folder, classes) under ``$DETKIT_HOME`` (default ``~/.cache/detkit``)
    ``/imagefolder/``.

    Args:
        root: the folder holding one sub-folder per class.
        classes: class names in label order; default: the sorted sub-folder names.
        cache: read and write the cache.

    Raises:
        DatasetError: missing root, no class folders, a requested class folder missing, or a
            class folder without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found; expected <root>/<class>/<image> (check data.train / data.val)")
    path = _cache_path(root, classes)
    table = _read_cache(path, root) if cache else None
    if table is not None:
        return table
    table = _scan(root, classes)
    if cache:
        _write_cache(path, table)
    return table


class ImageFolderDataset(Dataset):
    """Images under ``<root>/<class>/`` (any depth below the class folder), labelled by class folder.

    ``samples`` is the folder's :class:`FileTable` (``samples[i]`` is ``(path, label)``).

    Args:
        root: the folder holding one sub-folder per class.
        transform: image (H x W x 3 uint8 RGB) -> tensor, e.g.
            :func:`~detkit.data.transforms.build_classification_transform`. None returns the
            uint8 array untouched.
        classes: class names in label order; default: the sorted sub-folder names. Use the
            training set's ``classes`` for the validation set.
        cache: read / write the scan's cache (:func:`scan_image_folder`).

    Raises:
        DatasetError: missing root, no class folders, a requested class folder missing, or a
            class folder without images.
    """

    def __init__(self, root: PathLike, transform: Optional[Callable[..., Tensor]] = None,
                 classes: Optional[Sequence[str]] = None, cache: bool = True):
        self.root = Path(root)
        self.transform = transform
        self.samples = scan_image_folder(root, classes, cache)
        self.classes: list[str] = list(self.samples.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    @property
    def targets(self) -> list[int]:
        """The label of every sample."""
        return self.samples.labels.tolist()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Union[ClassificationSample, SkippedSample]:
        """The sample at ``index``, or a :class:`SkippedSample` naming an unreadable file."""
        path, label = self.samples[index]
        try:
            img = read_image(path)
        except ImageReadError as e:
            logger.warning("skipping image: %s", e)
            return SkippedSample(path, e.reason)
        image = self.transform(img) if self.transform is not None else img
        return ClassificationSample(image=image, label=label, file_name=path)

    def __getitem__(self, index: int) -> Optional[ClassificationSample]:
        s = self.load(index)
        return s if isinstance(s, ClassificationSample) else None

    def __getitems__(self, indices: Sequence[int]) -> list[Union[ClassificationSample, SkippedSample]]:
        batch = [self.load(i) for i in indices]
        if get_worker_info() is not None:
            # a worker's decodes and random-size crops leave glibc's heap fragmented: freed, but resident,
            # 2-5 MiB more per batch (docs/data.md); hand the free pages back after each batch
            release_freed_memory()
        return batch


def check_class_sets(train_ds: ImageFolderDataset, val_ds: ImageFolderDataset) -> None:
    """Raise :class:`DatasetError` naming the classes that appear in only one of the two sets
    (or in a different order)."""
    a, b = train_ds.classes, val_ds.classes
    if a == b:
        return
    only_train = [c for c in a if c not in b]
    only_val = [c for c in b if c not in a]
    if only_train or only_val:
        raise DatasetError(
            f"class folders differ between {train_ds.root} and {val_ds.root}: only in train {only_train}, "
            f"only in val {only_val}; both splits need the same class folders"
        )
    raise DatasetError(f"class order differs between {train_ds.root} and {val_ds.root}: {a} vs {b}")
