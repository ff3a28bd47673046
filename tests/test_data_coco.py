"""load_coco / CocoDetection / collate_detection on hand-written COCO files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from detkit.data.coco import DatasetError, load_coco
from detkit.data.coco_dataset import CocoDetection, decode_segmentation
from detkit.data.collate import DetectionSample, SkippedSample, collate_detection
from detkit.data.samplers import build_detection_test_loader
from shared_data import coco128_root, needs_coco128

COCO128 = coco128_root()
H, W = 40, 60


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Column-major run lengths starting with zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _crowd_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[2:12, 40:58] = 1
    return m


def _rle_mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[20:35, 5:15] = 1
    m[30:35, 15:25] = 1
    return m


def _base_dataset(tmp_path: Path) -> dict[str, Any]:
    """Three images (one without annotations), categories with non-contiguous ids, every mask format."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for i in range(3):
        cv2.imwrite(str(img_dir / f"{i}.png"), np.full((H, W, 3), 40 * i, np.uint8))
    rle = mask_utils.encode(np.asfortranarray(_rle_mask()))
    return {
        "images": [{"id": 10 + i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(3)],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 12, "name": "twelve"}],
        "annotations": [
            # polygon, category 7 -> label 1
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            # compressed RLE, category 12 -> label 2
            {"id": 2, "image_id": 10, "category_id": 12, "bbox": [5, 20, 20, 15], "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
            # crowd, uncompressed RLE
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [40, 2, 18, 10], "iscrowd": 1,
             "segmentation": _uncompressed_rle(_crowd_mask())},
            # image 11: one polygon instance, category 3 -> label 0
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0,
             "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
        ],
    }


def _write(tmp_path: Path, data: dict[str, Any], name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_label_mapping_and_mask_formats(tmp_path: Path) -> None:
    p = _write(tmp_path, _base_dataset(tmp_path))
    d = load_coco(p, tmp_path / "images", filter_empty=True, is_train=True)
    assert d.category_ids == [3, 7, 12] and d.class_names == ["three", "seven", "twelve"]
    assert d.category_id_to_label == {3: 0, 7: 1, 12: 2}
    assert [r.image_id for r in d.records] == [10, 11]  # empty image 12 dropped for training
    assert d.aspect_ratios.tolist() == [W / H, W / H]
    # segmentations stay in JSON form until a sample is loaded (lazy decoding)
    assert isinstance(d.records[0].segmentations[0], list) and isinstance(d.records[0].segmentations[1], dict)

    ds = CocoDetection(d, transform=None, with_masks=True)
    s = ds[0]
    assert isinstance(s, DetectionSample)
    assert s.image.shape == (3, H, W) and s.image.dtype == torch.uint8
    assert s.image_id == 10 and s.orig_size == (H, W) and s.file_name.endswith("0.png")
    t = s.targets
    assert t.labels.tolist() == [1, 2]
    torch.testing.assert_close(t.boxes, torch.tensor([[10.0, 5, 30, 15], [5, 20, 25, 35]]))
    assert t.masks is not None and t.masks.shape == (2, H, W) and t.masks.dtype == torch.uint8
    np.testing.assert_array_equal(t.masks[1].numpy(), _rle_mask())  # compressed RLE exact
    assert abs(int(t.masks[0].sum()) - 200) <= 30  # 20x10 polygon
    # crowd goes to ignore_boxes only, never to the positives
    torch.testing.assert_close(t.ignore_boxes, torch.tensor([[40.0, 2, 58, 12]]))
    assert 0 not in t.labels.tolist()
    # crowd (uncompressed RLE) decodes to its mask
    np.testing.assert_array_equal(decode_segmentation(d.records[0].crowd_segmentations[0], H, W), _crowd_mask())


def test_empty_images_kept_for_evaluation(tmp_path: Path) -> None:
    p = _write(tmp_path, _base_dataset(tmp_path))
    d = load_coco(p, tmp_path / "images", filter_empty=True, is_train=False)
    assert [r.image_id for r in d.records] == [10, 11, 12]
    d2 = load_coco(p, tmp_path / "images", filter_empty=False, is_train=True)
    assert len(d2) == 3
    s = CocoDetection(d, None, with_masks=True)[2]
    assert s is not None and len(s.targets) == 0 and s.targets.masks.shape == (0, H, W)


def test_crowd_only_image_dropped_for_training(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    data["annotations"] = [a for a in data["annotations"] if a["id"] in (3, 4)]  # image 10 has only the crowd
    d = load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)
    assert [r.image_id for r in d.records] == [11]


def test_no_usable_training_image_is_an_error(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    data["annotations"] = [a for a in data["annotations"] if a["id"] == 3]  # only a crowd region
    p = _write(tmp_path, data)
    with pytest.raises(DatasetError, match="no training image left"):
        load_coco(p, tmp_path / "images", filter_empty=True, is_train=True)
    assert len(load_coco(p, tmp_path / "images", filter_empty=True, is_train=False)) == 3


def test_one_summary_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _write(tmp_path, _base_dataset(tmp_path))
    with caplog.at_level(logging.INFO, logger="detkit"):
        load_coco(p, tmp_path / "images", filter_empty=True, is_train=True)
    records = [r for r in caplog.records if r.name == "detkit"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    msg = records[0].getMessage()
    assert "2 images" in msg and "3 instances" in msg and "1 crowd" in msg and "3 classes" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "bbox, what",
    [
        ([5, 5, 0, 10], "zero, negative or NaN"),
        ([5, 5, 10, -3], "zero, negative or NaN"),
        ([5, float("nan"), 10, 10], "zero, negative or NaN"),
        ([W + 5, 5, 10, 10], "entirely outside"),
        ([-30, 5, 20, 10], "entirely outside"),
    ],
)
def test_bad_boxes_dropped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, bbox: list, what: str) -> None:
    data = _base_dataset(tmp_path)
    data["annotations"].append({"id": 99, "image_id": 11, "category_id": 3, "bbox": bbox, "iscrowd": 0,
                                "segmentation": [[1, 1, 5, 1, 5, 5]]})
    p = _write(tmp_path, data)  # json writes NaN as a bare literal, which json.load reads back
    with caplog.at_level(logging.WARNING, logger="detkit"):
        d = load_coco(p, tmp_path / "images", filter_empty=True, is_train=True)
    assert d.records[1].ann_ids == [4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and what in warnings[0] and "99" in warnings[0] and str(p) in warnings[0]


def test_partly_outside_box_is_clipped(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    data["annotations"][3]["bbox"] = [-5, -5, 15, 15]
    d = load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)
    np.testing.assert_allclose(d.records[1].boxes, [[0, 0, 10, 10]])


def test_short_polygons_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _base_dataset(tmp_path)
    # only a 2-point polygon: annotation dropped
    data["annotations"].append({"id": 50, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0,
                                "segmentation": [[1, 1, 6, 6]]})
    # one good and one bad polygon: annotation kept with the good one
    data["annotations"].append({"id": 51, "image_id": 11, "category_id": 3, "bbox": [20, 20, 10, 10], "iscrowd": 0,
                                "segmentation": [[20, 20, 30, 20, 30, 30], [1, 2]]})
    with caplog.at_level(logging.WARNING, logger="detkit"):
        d = load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)
    rec = d.records[1]
    assert rec.ann_ids == [4, 51]
    assert rec.segmentations[1] == [[20, 20, 30, 20, 30, 30]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fewer than 3 points" in warnings[0] and "50" in warnings[0] and "51" in warnings[0]


@pytest.mark.parametrize("key, value, named", [("category_id", 5, "category_id 5"), ("image_id", 77, "image_id 77")])
def test_undefined_ids_raise(tmp_path: Path, key: str, value: int, named: str) -> None:
    msg, p = _annotation_error(tmp_path, key, value)
    assert "annotation id 2" in msg and named in msg and str(p) in msg and "\n" not in msg


def _annotation_error(tmp_path: Path, key: str, value: Any) -> tuple[str, Path]:
    """The DatasetError message of loading the base dataset with annotation 2's ``key`` set to ``value``."""
    data = _base_dataset(tmp_path)
    data["annotations"][1][key] = value
    p = _write(tmp_path, data)
    with pytest.raises(DatasetError) as e:
        load_coco(p, tmp_path / "images", filter_empty=True, is_train=True)
    return str(e.value), p


@pytest.mark.parametrize("key", ["category_id", "image_id"])
@pytest.mark.parametrize("value", ["abc", None, 1.5, "10", True])
def test_non_integer_ids_raise_one_line(tmp_path: Path, key: str, value: Any) -> None:
    msg, p = _annotation_error(tmp_path, key, value)
    assert "annotation id 2" in msg and f"{key} {json.dumps(value)}" in msg and "not an integer" in msg
    assert str(p) in msg and "\n" not in msg


def test_integral_float_ids_are_accepted(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    data["annotations"][0]["category_id"] = 7.0
    data["annotations"][0]["image_id"] = 10.0
    d = load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)
    assert d.records[0].image_id == 10 and d.records[0].ann_ids[0] == 1 and d.records[0].labels[0] == 1


@pytest.mark.parametrize("field, value, expected", [
    ("id", None, 'images[1] (id null, file_name "1.png") has id null, which is not an integer id'),
    ("id", "abc", 'has id "abc", which is not an integer id'),
    ("id", 2.5, "has id 2.5, which is not an integer id"),
    ("id", "<missing>", "images[1] (file_name \"1.png\") lacks required key(s) ['id']"),
    ("file_name", "<missing>", "images[1] (id 11) lacks required key(s) ['file_name']"),
    ("file_name", None, "images[1] (id 11, file_name null) has file_name null"),
    ("file_name", "", 'has file_name ""'),
    ("width", 0, "images[1] (id 11, file_name \"1.png\") has width 0; image sizes must be positive"),
    ("height", -5, "has height -5; image sizes must be positive"),
    ("width", "abc", 'has width "abc"'),
    ("height", None, "has height null"),
])
def test_bad_image_entries_raise_one_line(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    data = _base_dataset(tmp_path)
    if value == "<missing>":
        del data["images"][1][field]
    else:
        data["images"][1][field] = value
    p = _write(tmp_path, data)
    with pytest.raises(DatasetError) as e:
        load_coco(p, tmp_path / "images", filter_empty=True, is_train=True)
    msg = str(e.value)
    assert expected in msg and str(p) in msg and "\n" not in msg


def test_non_integer_annotation_and_category_ids_raise(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    data["annotations"][2]["id"] = "x3"
    with pytest.raises(DatasetError, match=r'annotations\[2\] has id "x3", which is not an integer id'):
        load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)
    data = _base_dataset(tmp_path)
    data["categories"][1]["id"] = None
    with pytest.raises(DatasetError, match=r'categories\[1\] \(name "three"\) has id null'):
        load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as e:
        load_coco(tmp_path / "missing.json", tmp_path, filter_empty=True, is_train=True)
    assert "missing.json" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DatasetError, match="malformed JSON") as e:
        load_coco(bad, tmp_path, filter_empty=True, is_train=True)
    assert str(bad) in str(e.value)
    data = _base_dataset(tmp_path)
    del data["categories"]
    p = _write(tmp_path, data, "nocat.json")
    with pytest.raises(DatasetError, match="categories") as e:
        load_coco(p, tmp_path, filter_empty=True, is_train=True)
    assert str(p) in str(e.value)
    data = _base_dataset(tmp_path)
    del data["annotations"][0]["bbox"]
    with pytest.raises(DatasetError, match=r"annotations\[0\].*bbox"):
        load_coco(_write(tmp_path, data, "nobbox.json"), tmp_path, filter_empty=True, is_train=True)
    data = _base_dataset(tmp_path)
    data["images"][1]["id"] = 10
    with pytest.raises(DatasetError, match="duplicate image id 10"):
        load_coco(_write(tmp_path, data, "dup.json"), tmp_path, filter_empty=True, is_train=True)


def _load_error(path: Path, tmp_path: Path) -> str:
    """The DatasetError message of loading ``path`` as a training file, checked to be one line naming the file."""
    with pytest.raises(DatasetError) as e:
        load_coco(path, tmp_path / "images", filter_empty=True, is_train=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    return msg


Mutation = Callable[[dict[str, Any]], None]


def _set(*keys: Any, value: Any) -> Mutation:
    """A mutation of the base dataset: ``data[k0][k1]...[kn] = value``."""
    def mutate(data: dict[str, Any]) -> None:
        obj = data
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return mutate


def _delete(*keys: Any) -> Mutation:
    """A mutation of the base dataset: ``del data[k0][k1]...[kn]``."""
    def mutate(data: dict[str, Any]) -> None:
        obj = data
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return mutate


@pytest.mark.parametrize("mutate, expected", [
    pytest.param(_delete("images"), "the top-level object lacks required key(s) ['images']", id="no-images"),
    pytest.param(_delete("annotations"), "the top-level object lacks 'annotations'; a training file needs them",
                 id="no-annotations-for-training"),
    pytest.param(_set("images", value={"id": 10}), "'images' must be a list, got dict", id="images-not-list"),
    pytest.param(_set("annotations", value="none"), "'annotations' must be a list, got str", id="annotations-not-list"),
    pytest.param(_set("categories", value=None), "'categories' must be a list, got NoneType",
                 id="categories-not-list"),
    pytest.param(_set("categories", value=[]), "'categories' is empty; define at least one category",
                 id="categories-empty"),
    pytest.param(_set("categories", 1, value=3), "categories[1] must be a JSON object, got int",
                 id="category-not-object"),
    pytest.param(_delete("categories", 2, "name"), "categories[2] lacks required key(s) ['name']",
                 id="category-without-name"),
    pytest.param(_set("categories", 2, "id", value=7.0), "duplicate category ids in 'categories'",
                 id="duplicate-category-id"),
    pytest.param(_set("images", 2, value="2.png"), "images[2] must be a JSON object, got str", id="image-not-object"),
    pytest.param(_set("annotations", 1, value=[5, 20, 20, 15]), "annotations[1] must be a JSON object, got list",
                 id="annotation-not-object"),
    pytest.param(_set("annotations", 1, "bbox", value=[5, 20, 20]),
                 "annotation id 2 has bbox [5, 20, 20]; expected [x, y, width, height]", id="bbox-three-numbers"),
    pytest.param(_set("annotations", 1, "bbox", value="5 20 20 15"),
                 "annotation id 2 has bbox '5 20 20 15'; expected [x, y, width, height]", id="bbox-string"),
    pytest.param(_set("annotations", 1, "bbox", value=[5, "a", 20, 15]),
                 "annotation id 2 has non-numeric bbox [5, 'a', 20, 15]", id="bbox-non-numeric"),
    pytest.param(_set("annotations", 1, "bbox", value=[5, None, 20, 15]),
                 "annotation id 2 has non-numeric bbox [5, None, 20, 15]", id="bbox-null"),
    pytest.param(_set("annotations", 1, "segmentation", value="polygon"),
                 "annotation id 2 has a segmentation that is neither polygons nor RLE", id="segmentation-string"),
    pytest.param(_set("annotations", 1, "segmentation", value={"counts": "abc"}),
                 "annotation id 2 has a segmentation that is neither polygons nor RLE", id="rle-without-size"),
])
def test_malformed_files_raise_one_line(tmp_path: Path, mutate: Mutation, expected: str) -> None:
    data = _base_dataset(tmp_path)
    mutate(data)
    assert expected in _load_error(_write(tmp_path, data), tmp_path)


def test_evaluation_file_without_annotations_loads(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    del data["annotations"]
    d = load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=False)
    assert [r.image_id for r in d.records] == [10, 11, 12] and all(len(r.boxes) == 0 for r in d.records)
    assert d.coco_index().dataset["annotations"] == [] and d.num_classes == 3


def test_unreadable_and_non_object_files_raise_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{\"images\": []}")
    msg = _load_error(binary, tmp_path)
    assert "cannot read annotation file" in msg and "utf-8" in msg
    array = _write(tmp_path, [_base_dataset(tmp_path)], "array.json")  # type: ignore[arg-type]
    msg = _load_error(array, tmp_path)
    assert "top level must be a JSON object with 'images', 'annotations', 'categories', got list" in msg


def test_masks_required_for_mask_rcnn(tmp_path: Path) -> None:
    data = _base_dataset(tmp_path)
    del data["annotations"][3]["segmentation"]
    d = load_coco(_write(tmp_path, data), tmp_path / "images", filter_empty=True, is_train=True)
    assert CocoDetection(d, None, with_masks=False)[1].targets.masks is None
    with pytest.raises(DatasetError, match="annotation id 4 has no segmentation"):
        CocoDetection(d, None, with_masks=True)


def test_unreadable_images_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _base_dataset(tmp_path)
    p = _write(tmp_path, data)
    (tmp_path / "images" / "1.png").write_bytes(b"not an image at all")
    cv2.imwrite(str(tmp_path / "images" / "2.png"), np.zeros((H + 1, W, 3), np.uint8))  # wrong size
    d = load_coco(p, tmp_path / "images", filter_empty=False, is_train=False)
    ds = CocoDetection(d, None, with_masks=True)
    with caplog.at_level(logging.WARNING, logger="detkit"):
        assert ds[1] is None
        assert ds[2] is None
    msgs = [r.getMessage() for r in caplog.records]
    assert any("1.png" in m for m in msgs) and any("2.png" in m and "differs" in m for m in msgs)
    items = ds.__getitems__([0, 1, 2])
    assert isinstance(items[0], DetectionSample) and isinstance(items[1], SkippedSample)
    batch = collate_detection(items)
    assert len(batch) == 1 and batch.image_ids == [10] and batch.orig_sizes == [(H, W)]
    assert [Path(s).name for s in batch.skipped] == ["1.png", "2.png"]
    # through a real DataLoader the names arrive in Batch.skipped
    batches = list(build_detection_test_loader(ds, batch_size=2, num_workers=0))
    assert [b.image_ids for b in batches] == [[10], []]
    assert [Path(s).name for b in batches for s in b.skipped] == ["1.png", "2.png"]
    assert collate_detection([None]).skipped == ["<unknown>"]


def test_transform_is_applied(tmp_path: Path) -> None:
    from detkit.config.schema import InputConfig
    from detkit.data.transforms import build_detection_transform

    d = load_coco(_write(tmp_path, _base_dataset(tmp_path)), tmp_path / "images", filter_empty=True, is_train=True)
    tf = build_detection_transform(InputConfig(min_size_test=80, max_size_test=1000), is_train=False)
    s = CocoDetection(d, tf, with_masks=True)[0]
    assert s.image.shape == (3, 80, 120) and s.orig_size == (H, W)
    torch.testing.assert_close(s.targets.boxes, torch.tensor([[20.0, 10, 60, 30], [10, 40, 50, 70]]))
    torch.testing.assert_close(s.targets.ignore_boxes, torch.tensor([[80.0, 4, 116, 24]]))
    assert s.targets.masks.shape == (2, 80, 120)


@needs_coco128
def test_coco128_smoke() -> None:
    d = load_coco(COCO128 / "annotations.json", COCO128 / "images", filter_empty=True, is_train=True)
    assert d.num_classes == 80 and d.category_ids[-1] == 90 and d.class_names[0] == "person"
    crowd = [(r, seg) for r in d.records for seg in r.crowd_segmentations]
    assert crowd, "coco128 is expected to contain crowd annotations"
    for rec, seg in crowd[:3]:
        m = decode_segmentation(seg, rec.height, rec.width)
        assert m.shape == (rec.height, rec.width) and m.sum() > 0
    idx = next(i for i, r in enumerate(d.records) if len(r.crowd_boxes))
    s = CocoDetection(d, None, with_masks=True)[idx]
    assert len(s.targets.ignore_boxes) > 0 and s.targets.masks.shape[1:] == s.image.shape[1:]
    assert (s.targets.masks.flatten(1).sum(1) > 0).all()
