"""ImageFolderDataset: discovery, clear errors, corrupt-file skipping, collate."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from detkit.config.schema import ClsInputConfig
from detkit.data.coco import DatasetError
from detkit.data.collate import ClassificationSample, SkippedSample
from detkit.data.imagefolder import ImageFolderDataset, check_class_sets, collate_classification
from detkit.data.transforms import build_classification_transform


def _make(root: Path, layout: dict[str, int]) -> None:
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / cls / f"{i}.png"), np.full((20, 24, 3), 10 * i, np.uint8))


def test_discovery_and_labels(tmp_path: Path) -> None:
    _make(tmp_path, {"dog": 2, "cat": 3})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "cat" / "sub" / "x.JPG"), np.zeros((8, 8, 3), np.uint8))
    ds = ImageFolderDataset(tmp_path, transform=None)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 0, 1, 1]
    assert not any(p.endswith(".txt") for p, _ in ds.samples)
    s = ds[5]
    assert isinstance(s, ClassificationSample) and s.label == 1 and s.image.shape == (20, 24, 3)
    # explicit class order (e.g. the training set's) is respected
    ordered = ImageFolderDataset(tmp_path, None, classes=["dog", "cat"])
    assert ordered.class_to_idx == {"dog": 0, "cat": 1}
    assert all((Path(p).relative_to(tmp_path).parts[0] == "dog") == (y == 0) for p, y in ordered.samples)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as e:
        ImageFolderDataset(tmp_path / "missing", None)
    assert "missing" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, None)
    _make(tmp_path, {"cat": 2})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="'empty_class' has no images"):
        ImageFolderDataset(tmp_path, None)
    with pytest.raises(DatasetError, match=r"\['bird'\] not found"):
        ImageFolderDataset(tmp_path, None, classes=["cat", "bird"])


def test_check_class_sets(tmp_path: Path) -> None:
    _make(tmp_path / "train", {"cat": 1, "dog": 1, "fox": 1})
    _make(tmp_path / "val", {"cat": 1, "dog": 1, "owl": 1})
    train, val = ImageFolderDataset(tmp_path / "train", None), ImageFolderDataset(tmp_path / "val", None)
    with pytest.raises(DatasetError) as e:
        check_class_sets(train, val)
    assert "only in train ['fox']" in str(e.value) and "only in val ['owl']" in str(e.value)
    _make(tmp_path / "val2", {"cat": 1, "dog": 1, "fox": 1})
    check_class_sets(train, ImageFolderDataset(tmp_path / "val2", None))  # same classes: no error


def test_corrupt_images_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "b" / "0.png"
    bad.write_bytes(b"\x89PNG garbage")
    tf = build_classification_transform(ClsInputConfig(size=16), is_train=False)
    ds = ImageFolderDataset(tmp_path, tf)
    idx = [p for p, _ in ds.samples].index(str(bad))
    with caplog.at_level(logging.WARNING, logger="detkit"):
        assert ds[idx] is None
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    items = ds.__getitems__(list(range(len(ds))))
    assert isinstance(items[idx], SkippedSample) and items[idx].file_name == str(bad)
    images, labels, skipped = collate_classification(items)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1] and skipped == [str(bad)]
    # through a DataLoader (batched fetch) the skipped name arrives too
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_classification)
    (imgs, labs, sk), = list(loader)
    assert imgs.shape[0] == 3 and sk == [str(bad)]
    empty = collate_classification([None])
    assert empty[0].shape[0] == 0 and empty[2] == ["<unknown>"]


def test_scan_is_cached_until_a_folder_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detkit.data import imagefolder

    monkeypatch.setenv("DETKIT_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    _make(root, {"b": 2, "a": 3})
    (root / "a" / "deep").mkdir()
    cv2.imwrite(str(root / "a" / "deep" / "z.png"), np.zeros((4, 4, 3), np.uint8))
    first = ImageFolderDataset(root)
    assert [Path(p).relative_to(root).as_posix() for p, _ in first.samples] == [
        "a/0.png", "a/1.png", "a/2.png", "a/deep/z.png", "b/0.png", "b/1.png"]
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.npz"))) == 1
    scans: list = []
    real = imagefolder._scan
    monkeypatch.setattr(imagefolder, "_scan", lambda *a: scans.append(a) or real(*a))
    again = ImageFolderDataset(root)
    assert scans == [] and list(again.samples) == list(first.samples) and again.targets == first.targets
    for changed in (root / "a" / "deep" / "new.png", root / "b" / "new.png"):  # a nested folder too
        cv2.imwrite(str(changed), np.zeros((4, 4, 3), np.uint8))
        ds = ImageFolderDataset(root)
        assert str(changed) in [p for p, _ in ds.samples] and len(scans) == 1
        assert list(ImageFolderDataset(root).samples) == list(ds.samples) and len(scans) == 1  # cached again
        scans.clear()
    assert ImageFolderDataset(root, classes=["b"]).targets == [0, 0, 0] and len(scans) == 1
