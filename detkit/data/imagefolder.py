"""Classification data laid out as ``<root>/<class>/<image>`` (for backbone pretraining)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from torch import Tensor
from torch.utils.data import Dataset

from .coco import DatasetError
from .collate import ClassificationSample, SkippedSample, collate_classification
from .images import IMAGE_EXTENSIONS, ImageReadError, read_image

__all__ = ["ImageFolderDataset", "check_class_sets", "collate_classification", "ClassificationSample"]

logger = logging.getLogger("detkit")
PathLike = Union[str, os.PathLike]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


class ImageFolderDataset(Dataset):
    """Images under ``<root>/<class>/`` (any depth below the class folder), labelled by class folder.

    Args:
        root: the folder holding one sub-folder per class.
        transform: image (H x W x 3 uint8 RGB) -> tensor, e.g.
            :func:`~detkit.data.transforms.build_classification_transform`. None returns the
            uint8 array untouched.
        classes: class names in label order; default: the sorted sub-folder names. Use the
            training set's ``classes`` for the validation set.

    Raises:
        DatasetError: missing root, no class folders, a requested class folder missing, or a
            class folder without images.
    """

    def __init__(self, root: PathLike, transform: Optional[Callable[..., Tensor]] = None, classes: Optional[Sequence[str]] = None):
        self.root = Path(root)
        self.transform = transform
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: image folder not found; expected <root>/<class>/<image> (check data.train / data.val)")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not found:
                raise DatasetError(f"{self.root}: no class sub-folders; expected <root>/<class>/<image>")
            classes = found
        else:
            missing = [c for c in classes if c not in found]
            if missing:
                raise DatasetError(f"{self.root}: class folder(s) {missing} not found; present: {found}")
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if _is_image(p))
            if not files:
                raise DatasetError(
                    f"{self.root / name}: class folder '{name}' has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add images or remove the folder"
                )
            self.samples.extend((str(f), label) for f in files)

    @property
    def targets(self) -> list[int]:
        """The label of every sample."""
        return [label for _, label in self.samples]

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
        return [self.load(i) for i in indices]


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
