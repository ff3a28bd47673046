"""Dataset browsing behind ``tools/browse_dataset.py``: the ground truth drawn after the data pipeline.

The train split goes through the training augmentation (multi-scale resize, flips, jitter, as
configured under ``input``), the val split through the test pipeline; boxes, class names, instance
masks and crowd regions are drawn on the transformed images.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..config import DetectionConfig
from ..data import CocoDetection, build_detection_transform
from ..data.collate import DetectionSample
from ..engine.detection import load_split, resolve_data_paths
from ..errors import UsageError
from ..visualization import draw_targets, make_contact_sheet

__all__ = ["build_dataset", "choose_indices", "render", "write_outputs"]


def build_dataset(cfg: DetectionConfig, split: str, seed: int) -> CocoDetection:
    """The split's :class:`~detkit.data.coco.CocoDetection` with the train or test transform of ``cfg.input``.

    Data paths are resolved as ``tools/train_det.py`` does (the synthetic shapes set is generated
    when ``data.synthetic`` is set) and the annotations validated the same way.
    """
    is_train = split == "train"
    data = load_split(resolve_data_paths(cfg), split, is_train=is_train)
    transform = build_detection_transform(cfg.input, is_train=is_train, seed=seed)
    return CocoDetection(data, transform, with_masks=cfg.model.meta_architecture == "mask_rcnn")


def choose_indices(n: int, num: int, shuffle: bool, seed: int) -> list[int]:
    """``num`` dataset indices: the first ones, or a seeded random sample."""
    if num < 1:
        raise UsageError(f"--num {num}: must be at least 1")
    if shuffle:
        return sorted(random.Random(seed).sample(range(n), min(num, n)))
    return list(range(min(num, n)))


def render(dataset: CocoDetection, indices: Sequence[int]) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Draw the ground truth of each chosen sample; returns ([(file name, RGB image)], skipped files)."""
    drawn, skipped = [], []
    for i in indices:
        sample = dataset.load(i)
        if not isinstance(sample, DetectionSample):
            skipped.append(f"{sample.file_name}: {sample.reason}")
            continue
        # (3, H, W) -> (H, W, 3)
        image = sample.image.permute(1, 2, 0).cpu().numpy()
        drawn.append((Path(sample.file_name).name, draw_targets(image, sample.targets, dataset.class_names)))
    return drawn, skipped


def write_outputs(drawn: list[tuple[str, np.ndarray]], out_dir: Path, contact_sheet: bool, cols: int, cell: int) -> list[Path]:
    """Write PNGs (one per image, or ``contact_sheet.png``); returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if contact_sheet:
        sheet = make_contact_sheet([im for _, im in drawn], cols=cols, cell_size=cell, titles=[n for n, _ in drawn])
        items = [(out_dir / "contact_sheet.png", sheet)]
    else:
        items, seen = [], set()
        for name, im in drawn:
            stem = Path(name).stem
            k, unique = 1, stem
            while unique in seen:  # same file name in two sub-folders
                k += 1
                unique = f"{stem}_{k}"
            seen.add(unique)
            items.append((out_dir / f"{unique}.png", im))
    for path, im in items:
        if not cv2.imwrite(str(path), cv2.cvtColor(im, cv2.COLOR_RGB2BGR)):
            raise UsageError(f"could not write {path}; check that --output is a writable folder")
    return [p for p, _ in items]
