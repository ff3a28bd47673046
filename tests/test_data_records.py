"""Flat training records (detkit.data.records) and several training files merged by class name."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detkit.config import load_detection_config
from detkit.config import ConfigError
from detkit.data.classes import resolve_classes
from detkit.data.coco import DatasetError, load_coco
from detkit.data.records import InstanceColumns, RecordTable, StringColumn
from detkit.engine.detection import load_split
from shared_data import needs_coco128, require_coco128

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"


def _arrays(obj: Any) -> list[np.ndarray]:
    """Every numpy array a RecordTable holds, through its columns."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, (RecordTable, InstanceColumns, StringColumn)):
        return [a for v in vars(obj).values() for a in _arrays(v)]
    return []


def _expected_record(ann_by_image: dict[int, list], im: dict, cat_to_label: dict[int, int]) -> dict:
    """What one image of a well-formed file holds, read straight from its JSON (no crowd, nothing dropped)."""
    anns = [a for a in ann_by_image.get(im["id"], []) if not a.get("iscrowd")]
    boxes = [[max(a["bbox"][0], 0), max(a["bbox"][1], 0), min(a["bbox"][0] + a["bbox"][2], im["width"]),
              min(a["bbox"][1] + a["bbox"][3], im["height"])] for a in anns]
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": [cat_to_label[a["category_id"]] for a in anns],
            "segmentations": [a["segmentation"] for a in anns], "ann_ids": [a["id"] for a in anns]}


@needs_coco128
def test_coco128_records_match_the_json_and_live_in_flat_arrays() -> None:
    root = require_coco128()
    raw = json.loads((root / "annotations.json").read_text())
    d = load_coco(root / "annotations.json", root / "images", filter_empty=False, is_train=True)
    by_image: dict[int, list] = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    cat_to_label = {c: i for i, c in enumerate(sorted(c["id"] for c in raw["categories"]))}
    assert [r.image_id for r in d.records] == [im["id"] for im in raw["images"]]
    for rec, im in zip(d.records, raw["images"]):
        want = _expected_record(by_image, im, cat_to_label)
        np.testing.assert_allclose(rec.boxes, want["boxes"], rtol=0, atol=1e-4)
        assert rec.labels.tolist() == want["labels"] and rec.ann_ids == want["ann_ids"]
        assert rec.segmentations == want["segmentations"]  # polygons exactly as read (float64)
        assert rec.path == str(root / "images" / im["file_name"]) and (rec.height, rec.width) == (im["height"], im["width"])
        assert len(rec.crowd_boxes) == sum(1 for a in by_image.get(im["id"], []) if a.get("iscrowd"))
    assert sum(len(r.crowd_segmentations) for r in d.records) == 10
    # nothing per image or per annotation is a Python object: the workers share the buffers as they are
    arrays = _arrays(d.records)
    assert len(arrays) == 26 and all(a.dtype != object for a in arrays)
    assert sum(a.nbytes for a in arrays) == d.records.nbytes


@needs_coco128
def test_take_and_concatenate_keep_every_field() -> None:
    root = require_coco128()
    d = load_coco(root / "annotations.json", root / "images", filter_empty=False, is_train=True)
    table = d.records
    index = np.array([5, 0, 77, 5])
    sub = table.take(index)
    both = RecordTable.concatenate([table, sub], [np.arange(80), np.arange(80)[::-1].copy()])
    for j, i in enumerate(index):
        a, b, c = table[int(i)], sub[j], both[len(table) + j]
        assert (a.image_id, a.path, a.ann_ids, a.segmentations) == (b.image_id, b.path, b.ann_ids, b.segmentations)
        assert a.crowd_segmentations == b.crowd_segmentations == c.crowd_segmentations
        np.testing.assert_array_equal(a.boxes, c.boxes)
        assert c.labels.tolist() == (79 - a.labels).tolist()  # the second label map
    assert both[3].segmentations == table[3].segmentations and len(both) == len(table) + 4


def _file(tmp_path: Path, name: str, categories: list[tuple[int, str]], anns: list[tuple[int, int]]) -> Path:
    """A COCO file with one 20x20 image per (category id, image index) annotation pair."""
    images = sorted({i for _, i in anns})
    data = {"images": [{"id": i, "file_name": f"{name}_{i}.png", "width": 20, "height": 20} for i in images],
            "categories": [{"id": c, "name": n} for c, n in categories],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [1, 1, 5, 5], "iscrowd": 0,
                             "segmentation": [[1, 1, 6, 1, 6, 6]]} for k, (c, i) in enumerate(anns)]}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(data))
    return p


def test_several_files_merge_by_class_name(tmp_path: Path, caplog) -> None:
    a = _file(tmp_path, "a", [(1, "cat"), (2, "dog")], [(1, 1), (2, 1), (2, 2)])
    b = _file(tmp_path, "b", [(5, "dog"), (9, "cat")], [(5, 1), (9, 3), (9, 4)])  # same classes, other ids
    with caplog.at_level(logging.INFO, logger="detkit"):
        d = load_coco([a, b], [tmp_path / "ia", tmp_path / "ib"], filter_empty=True, is_train=True)
    assert d.class_names == ["cat", "dog"] and d.category_ids == [1, 2]
    assert [r.labels.tolist() for r in d.records] == [[0, 1], [1], [1], [0], [0]]
    assert [Path(r.path).parent.name for r in d.records] == ["ia"] * 2 + ["ib"] * 3
    assert [r.source for r in d.records] == [str(a)] * 2 + [str(b)] * 3
    line = next(r.getMessage() for r in caplog.records if "2 annotation files" in r.getMessage())
    assert f"{a} (2 images, 3 instances); {b} (3 images, 3 instances)" in line


def test_files_with_other_classes_are_refused_unless_class_names_fix_the_union(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", [(1, "cat"), (2, "dog")], [(1, 1), (2, 2)])
    b = _file(tmp_path, "b", [(1, "cat"), (3, "bird")], [(3, 1)])
    with pytest.raises(DatasetError) as e:
        load_coco([a, b], [tmp_path, tmp_path], filter_empty=True, is_train=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{b}: ") and "['bird']" in msg and "['dog']" in msg
    assert "data.class_names" in msg
    d = load_coco([a, b], [tmp_path, tmp_path], filter_empty=True, is_train=True,
                  class_names=["bird", "cat", "dog"])
    assert d.class_names == ["bird", "cat", "dog"] and d.category_ids == [3, 1, 2]
    assert [r.labels.tolist() for r in d.records] == [[1], [2], [0]]
    with pytest.raises(DatasetError, match=rf"^{b}: classes \['bird'\] are not in data.class_names"):
        load_coco([a, b], [tmp_path, tmp_path], filter_empty=True, is_train=True, class_names=["cat", "dog"])


def test_lists_from_yaml_overrides_reach_the_loader_and_the_class_resolver(tmp_path: Path) -> None:
    a = _file(tmp_path, "a", [(1, "cat"), (2, "dog")], [(1, 1)])
    b = _file(tmp_path, "b", [(4, "dog"), (1, "cat")], [(4, 7)])
    cfg = load_detection_config(DEMO, [f"data.train.annotations=[{a},{b}]", f"data.train.images=[{tmp_path},{tmp_path}]"])
    assert cfg.data.train.annotations == [str(a), str(b)]
    data = load_split(cfg, "train", is_train=True)
    assert len(data) == 2 and len(data.sets) == 2 and data.class_names == ["cat", "dog"]
    assert resolve_classes(cfg).names == ["cat", "dog"]
    with pytest.raises(ConfigError, match="annotations lists 2 file.s. but images 1 folder"):
        load_detection_config(DEMO, [f"data.train.annotations=[{a},{b}]", f"data.train.images=[{tmp_path}]"])


# --------------------------------------------------------------------------- the cache of large files
def _same_records(a, b) -> None:
    assert len(a.records) == len(b.records) and a.class_names == b.class_names and a.category_ids == b.category_ids
    assert a.num_dropped == b.num_dropped
    for ra, rb in zip(a.records, b.records):
        assert (ra.image_id, ra.file_name, ra.path, ra.height, ra.width) == (rb.image_id, rb.file_name, rb.path,
                                                                            rb.height, rb.width)
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
        np.testing.assert_array_equal(ra.labels, rb.labels)
        np.testing.assert_array_equal(ra.crowd_boxes, rb.crowd_boxes)
        assert ra.segmentations == rb.segmentations and ra.crowd_segmentations == rb.crowd_segmentations
        assert ra.ann_ids == rb.ann_ids


def test_large_file_is_read_back_from_its_cache_while_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """coco128 (polygons, crowd RLE, non-contiguous ids) with the size threshold at 0: the second load comes
    from the cache and gives the same records; a changed file, a corrupt cache or DETKIT_COCO_CACHE=0 parse."""
    from detkit.data import records_cache

    root = require_coco128()
    monkeypatch.setattr(records_cache, "MIN_CACHED_BYTES", 0)
    monkeypatch.setenv("DETKIT_HOME", str(tmp_path / "home"))
    ann = tmp_path / "train.json"
    ann.write_bytes((root / "annotations.json").read_bytes())
    args = dict(filter_empty=True, is_train=True)
    with caplog.at_level(logging.INFO, logger="detkit"):
        parsed = load_coco(ann, root / "images", **args)
        assert "from the cache" not in caplog.text
        cache = records_cache.cache_path(ann, True, True)
        assert cache.is_file() and cache.parent == tmp_path / "home" / "coco"
        caplog.clear()
        cached = load_coco(ann, root / "images", **args)
        assert "from the cache" in caplog.text
    _same_records(parsed, cached)
    assert len(parsed.records.crowds.labels) > 0  # the crowd RLE went through the cache too

    other = load_coco(ann, root / "images", filter_empty=False, is_train=True)  # another key: parsed
    assert len(other.records) >= len(parsed.records)

    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][:-1]
    ann.write_text(json.dumps(data))  # the file changes: its cache no longer applies
    changed = load_coco(ann, root / "images", **args)

    def count(d) -> int:  # instances and crowd regions
        return len(d.records.instances.labels) + len(d.records.crowds.labels)

    assert count(changed) == count(parsed) - 1

    new_cache = records_cache.cache_path(ann, True, True)
    new_cache.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="detkit"):
        again = load_coco(ann, root / "images", **args)
    assert "ignoring the unreadable cache" in caplog.text
    _same_records(changed, again)

    monkeypatch.setenv("DETKIT_COCO_CACHE", "0")
    ann.write_text(json.dumps(data, indent=1))
    load_coco(ann, root / "images", **args)
    assert not records_cache.cache_path(ann, True, True).exists()


def test_parsing_pauses_the_garbage_collector_and_restores_it(tmp_path: Path, monkeypatch) -> None:
    """A large file's millions of fresh (acyclic) objects parse without the cyclic collector running over them
    again and again; its state is restored after, on success and on error."""
    import gc

    import detkit.data.coco as coco

    seen = []
    validate = coco.validate_annotations
    monkeypatch.setattr(coco, "validate_annotations", lambda *a, **k: seen.append(gc.isenabled()) or validate(*a, **k))
    path = _file(tmp_path, "a.json", [(1, "cat")], [(1, 1)])
    assert gc.isenabled()
    load_coco(path, tmp_path, filter_empty=False, is_train=True)
    assert seen == [False] and gc.isenabled()
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "categories": [], "annotations": []}')
    with pytest.raises(DatasetError, match="categories"):
        load_coco(bad, tmp_path, filter_empty=False, is_train=True)
    assert gc.isenabled()
    gc.disable()
    try:  # a caller's disabled collector stays disabled
        load_coco(path, tmp_path, filter_empty=False, is_train=True)
        assert not gc.isenabled()
    finally:
        gc.enable()
