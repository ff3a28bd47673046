"""Synthetic shapes datasets: deterministic, valid COCO, exact masks, fast, cached by manifest."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from detkit.data.coco import load_coco
from detkit.data.coco_dataset import CocoDetection, decode_segmentation
from detkit.data.imagefolder import ImageFolderDataset
from detkit.data.images import read_image
from detkit.data.synthetic import SHAPE_CLASSES, make_shapes_coco, make_shapes_imagefolder

# pycocotools' own annToMask under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_coco_generation_is_deterministic_and_cached(tmp_path: Path) -> None:
    a = make_shapes_coco(tmp_path / "a", num_train=10, num_val=3, image_size=96, seed=1)
    make_shapes_coco(tmp_path / "b", num_train=10, num_val=3, image_size=96, seed=1)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and len([k for k in fa if k.endswith(".jpg")]) == 13
    assert set(a) == {"root", "train_annotations", "train_images", "val_annotations", "val_images"}
    # a different seed gives different data
    make_shapes_coco(tmp_path / "c", num_train=10, num_val=3, image_size=96, seed=2)
    assert _files(tmp_path / "c")["train.json"] != fa["train.json"]
    # unchanged parameters: nothing is rewritten
    mtime = Path(a["train_annotations"]).stat().st_mtime_ns
    time.sleep(0.01)
    make_shapes_coco(tmp_path / "a", num_train=10, num_val=3, image_size=96, seed=1)
    assert Path(a["train_annotations"]).stat().st_mtime_ns == mtime
    # changed parameters or a missing output: regenerated
    make_shapes_coco(tmp_path / "a", num_train=12, num_val=3, image_size=96, seed=1)
    assert len(json.loads(Path(a["train_annotations"]).read_text())["images"]) == 12
    Path(a["val_annotations"]).unlink()
    make_shapes_coco(tmp_path / "a", num_train=12, num_val=3, image_size=96, seed=1)
    assert Path(a["val_annotations"]).is_file()
    # images are a function of (seed, split, index) only: the val split did not change with num_train
    assert (tmp_path / "a" / "val" / "000000.jpg").read_bytes() == fa["val/000000.jpg"]


def test_coco_is_valid_and_masks_match_boxes(tmp_path: Path) -> None:
    p = make_shapes_coco(tmp_path, num_train=30, num_val=5, image_size=128, seed=0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(p["train_annotations"])
    assert sorted(coco.getCatIds()) == [c for c, _ in SHAPE_CLASSES] == [1, 3, 7, 9]
    anns = coco.loadAnns(coco.getAnnIds())
    assert {type(a["segmentation"]) for a in anns} == {list, dict}  # polygons and RLE both present
    per_image: dict[int, int] = {}
    for a in anns:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        m = coco.annToMask(a)
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x, y, x + w, y + h], atol=1.0)
        assert abs(m.sum() - a["area"]) <= 0.02 * a["area"] + 2
        side = max(w, h) / 128
        assert 0.05 <= side <= 0.55  # roughly 10-50% of the image side (visible part)
    assert set(per_image.values()) <= {1, 2, 3, 4} and len(per_image) >= 28
    # visible masks of one image do not overlap (occlusion handled) and were painted
    for img_id in list(per_image)[:10]:
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        assert max(int(sum(masks).max()), 1) == 1
        info = coco.loadImgs(img_id)[0]
        img = read_image(Path(p["train_images"]) / info["file_name"]).astype(np.float32)
        for m in masks:  # shapes are flat colours: low variance inside the mask, unlike the background
            inner = m.astype(bool)
            core = inner & np.roll(inner, 2, 0) & np.roll(inner, -2, 0) & np.roll(inner, 2, 1) & np.roll(inner, -2, 1)
            if core.sum() > 20:
                assert img[core].std(axis=0).max() < 25


def test_detkit_reads_it(tmp_path: Path) -> None:
    p = make_shapes_coco(tmp_path, num_train=8, num_val=4, image_size=96, seed=0)
    d = load_coco(p["val_annotations"], p["val_images"], filter_empty=False, is_train=False)
    assert d.class_names == ["circle", "rectangle", "triangle", "star"] and len(d) == 4
    s = CocoDetection(d, None, with_masks=True)[0]
    assert s.image.shape == (3, 96, 96) and len(s.targets) >= 1
    rec = d.records[0]
    for seg, box in zip(rec.segmentations, rec.boxes):
        m = decode_segmentation(seg, 96, 96)
        ys, xs = np.nonzero(m)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1.0)
    rle = mask_utils.encode(np.asfortranarray(s.targets.masks[0].numpy()))
    assert mask_utils.area(rle) > 0


def test_default_size(tmp_path: Path) -> None:
    # generation time: benchmarks/bench_step_time.py
    p = make_shapes_coco(tmp_path)  # the README default: 400 train + 50 val images of 256 px
    for split, n in (("train", 400), ("val", 50)):
        images = json.loads(Path(p[f"{split}_annotations"]).read_text())["images"]
        assert len(images) == n and {(im["width"], im["height"]) for im in images} == {(256, 256)}
        assert len(list(Path(p[f"{split}_images"]).glob("*.jpg"))) == n


def test_imagefolder_generation(tmp_path: Path) -> None:
    p = make_shapes_imagefolder(tmp_path / "a", num_per_class_train=5, num_per_class_val=2, image_size=48, seed=0)
    make_shapes_imagefolder(tmp_path / "b", num_per_class_train=5, num_per_class_val=2, image_size=48, seed=0)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    train = ImageFolderDataset(p["train"], transform=None)
    val = ImageFolderDataset(p["val"], transform=None, classes=train.classes)
    assert train.classes == sorted(n for _, n in SHAPE_CLASSES) and len(train) == 20 and len(val) == 8
    s = train[0]
    assert s is not None and s.image.shape == (48, 48, 3)
