"""A large COCO file's annotations read in slices by several processes (detkit.data.coco_parallel):
the same columns and records as one parse, and a fallback to one parse whenever a slice could be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest

import detkit.data.coco as coco
from detkit.data.coco import DatasetError, load_coco
from detkit.data.coco_annotations import Fields, read_fields
from detkit.data.coco_parallel import parse_in_parts
from shared_data import require_coco128

from test_data_records import _same_records


def _same_fields(a: Fields, b: Fields) -> None:
    for k in ("ids", "image_ids", "category_ids", "bboxes", "crowd", "seg_kind"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    for k in ("per_seg", "ok", "coords", "lens"):
        np.testing.assert_array_equal(getattr(a.polygons, k), getattr(b.polygons, k), err_msg=k)
    assert a.rle == b.rle


def _whole(raw: bytes) -> Fields:
    return read_fields(json.loads(raw)["annotations"], Path("x.json"))


def _small_file(extra_ann: dict | None = None, **top) -> dict:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(1, 5)]
    anns = [{"id": k, "image_id": k % 4 + 1, "category_id": 1 + k % 2, "bbox": [1.5, 2, 20, 10], "area": 200,
             "iscrowd": 0, "segmentation": [[1.5, 2, 21.5, 2, 21.5, 12] * (1 + k % 3)]} for k in range(1, 40)]
    anns[5]["segmentation"] = {"counts": "abc", "size": [48, 64]}
    anns[5]["iscrowd"] = 1
    anns[9]["segmentation"] = [[1, 2, 3, 4]]  # a bad polygon
    for a in anns[10:13]:
        a.update(extra_ann or {})
    return {"info": {"year": 2026}, "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], **top}


@pytest.mark.parametrize("processes", [2, 3, 7])
def test_coco128_in_slices_equals_one_parse(processes: int) -> None:
    """coco128's file (polygons, crowd RLE, 80 non-contiguous ids), compact and indented."""
    raw = (require_coco128("annotations.json") / "annotations.json").read_bytes()
    for text in (raw, json.dumps(json.loads(raw), indent=2).encode()):
        parsed = parse_in_parts(text, processes)
        assert parsed is not None and parsed.data["annotations"] == []
        assert [im["id"] for im in parsed.data["images"]] == [im["id"] for im in json.loads(text)["images"]]
        assert len(parsed.fields.ids) > 900
        _same_fields(parsed.fields, _whole(text))


@pytest.mark.parametrize("extra,top", [
    ({"note": 'a},{"id": 9}, {"x": 1}] b'}, {}),  # a cut could land in a string
    ({"attributes": [{"a": 1}, {"b": 2}]}, {}),  # or in a nested list of objects
    ({}, {"info": {"annotations": [{"id": 1}, {"id": 2}]}}),  # a nested key of the same name
    ({}, {"z_images_last": True}),
])
def test_text_that_could_fool_the_cuts_gives_one_parse_or_the_same_columns(extra: dict, top: dict) -> None:
    data = _small_file(extra, **top)
    if "z_images_last" in top:  # annotations before images
        data = {"annotations": data["annotations"], "categories": data["categories"], "images": data["images"]}
    raw = json.dumps(data).encode()
    for processes in (2, 4, 8):
        parsed = parse_in_parts(raw, processes)
        if parsed is not None:
            _same_fields(parsed.fields, _whole(raw))
    if not extra and "info" not in top:
        assert parse_in_parts(raw, 3) is not None


def test_what_one_slice_cannot_take_falls_back_to_one_parse() -> None:
    data = _small_file()
    data["annotations"][30]["id"] = "31"  # an id that is not an int: the one-by-one check names it
    assert parse_in_parts(json.dumps(data).encode(), 3) is None
    nan = json.dumps(_small_file()).replace("[1.5, 2, 20, 10]", "[NaN, 2, 20, 10]", 1).encode()
    assert parse_in_parts(nan, 3) is None  # orjson refuses NaN; json reads it
    assert parse_in_parts(json.dumps(_small_file(annotations=[])).encode(), 3) is None
    assert parse_in_parts(orjson.dumps(_small_file()), 1) is None


def test_load_coco_reads_a_large_file_in_slices_with_the_same_records_and_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = require_coco128()
    ann = tmp_path / "train.json"
    ann.write_bytes((root / "annotations.json").read_bytes())
    monkeypatch.setenv("DETKIT_COCO_CACHE", "0")
    whole = load_coco(ann, root / "images", filter_empty=True, is_train=True)
    used = []
    monkeypatch.setattr(coco, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(coco, "parse_in_parts", lambda raw, n: used.append(parse_in_parts(raw, max(n, 3))) or used[-1])
    sliced = load_coco(ann, root / "images", filter_empty=True, is_train=True)
    assert used and used[0] is not None
    _same_records(whole, sliced)

    data = json.loads(ann.read_text())
    data["annotations"][-1]["category_id"] = 1000
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation id \d+ has category_id 1000, which is not defined"):
        load_coco(ann, root / "images", filter_empty=True, is_train=True)
    data["annotations"][-1]["category_id"] = "1"
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"has category_id \"1\", which is not an integer id"):
        load_coco(ann, root / "images", filter_empty=True, is_train=True)
    assert used[-1] is None  # the one-by-one check of one parse named it


def test_processes_per_file_share_the_cpus_with_the_ranks_on_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert coco._parse_processes() == 8  # at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert coco._parse_processes() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert coco._parse_processes() == 1  # one parse per rank: parse_in_parts declines
    assert parse_in_parts(orjson.dumps(_small_file()), coco._parse_processes()) is None


def test_a_fork_that_fails_midway_falls_back_to_one_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The children already started are collected; the caller parses the file whole."""
    import detkit.data.coco_parallel as cp

    fork, calls = cp.os.fork, []

    def fork_once() -> int:
        calls.append(1)
        if len(calls) > 1:
            raise BlockingIOError("Resource temporarily unavailable")
        return fork()

    monkeypatch.setattr(cp.os, "fork", fork_once)
    assert parse_in_parts(orjson.dumps(_small_file()), 3) is None
    assert len(calls) == 2
