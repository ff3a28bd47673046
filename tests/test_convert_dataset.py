"""detkit.data.convert (what tools/convert_dataset.py runs): the shapes data written as Pascal VOC, YOLO
and LabelMe by this file's own small writers converts back to the same boxes, polygons, classes and
image sizes, and loads with detkit's COCO loader; each kind of bad input is named, skipped and counted
(or stops the run with --strict); the train/val split; defusedxml refusing entity expansion; the tool
end to end (one subprocess)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np
import pytest

from detkit.cli import run_cli
from detkit.data import CocoDetection, load_coco, make_shapes_coco
from detkit.data.convert import ConvertOptions, convert_dataset, split_coco
from detkit.errors import DetkitError, UsageError

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_dataset.py"
TOL = 1e-3  # px; the converter rounds to 3 decimals, YOLO files hold 6


# ------------------------------------------------------------------ the source data: detkit's shapes


def _clip_polygon(poly: list[float], w: int, h: int) -> list[float]:
    return [min(max(v, 0.0), float(w if i % 2 == 0 else h)) for i, v in enumerate(poly)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Any]:
    """6 generated shapes images: ``images`` (folder), ``items``: file_name -> (width, height, objects),
    each object a dict with ``name``, ``box`` (x1, y1, x2, y2) and ``polygon`` (inside the image) or None."""
    root = tmp_path_factory.mktemp("shapes")
    paths = make_shapes_coco(root, num_train=6, num_val=0, image_size=64, seed=5)
    coco = json.loads(Path(paths["train_annotations"]).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    items: dict[str, Any] = {}
    for im in coco["images"]:
        objects = []
        for a in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            poly = None
            if isinstance(a["segmentation"], list):
                poly = _clip_polygon(a["segmentation"][0], im["width"], im["height"])
            objects.append({"name": names[a["category_id"]], "box": (x, y, x + w, y + h), "polygon": poly})
        items[im["file_name"]] = (im["width"], im["height"], objects)
    assert sum(len(v[2]) for v in items.values()) >= 6 and any(o["polygon"] for v in items.values() for o in v[2])
    return {"images": Path(paths["train_images"]), "items": items}


def _converted(path: Path) -> dict[str, Any]:
    """file_name -> (width, height, [(name, bbox xywh, segmentation or None, iscrowd), ...]) of a COCO file."""
    coco = json.loads(path.read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out = {im["file_name"]: (im["width"], im["height"], []) for im in coco["images"]}
    by_id = {im["id"]: im["file_name"] for im in coco["images"]}
    for a in coco["annotations"]:
        out[by_id[a["image_id"]]][2].append((names[a["category_id"]], a["bbox"], a.get("segmentation"), a["iscrowd"]))
    return out


def _assert_close(got: list[float], want: list[float], tol: float = TOL) -> None:
    assert len(got) == len(want) and np.allclose(got, want, atol=tol, rtol=0), (got, want)


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _loads_with_detkit(path: Path, images: Path) -> None:
    """The file loads as train_det.py loads it, and every image decodes at its recorded size."""
    data = load_coco(path, images, filter_empty=False, is_train=False)
    coco = json.loads(path.read_text(encoding="utf-8"))
    assert len(data) == len(coco["images"]) and data.class_names == [c["name"] for c in coco["categories"]]
    ds = CocoDetection(data)
    for i in range(len(ds)):
        sample = ds[i]
        rec = data.records[i]
        assert sample is not None and tuple(sample.image.shape) == (3, rec.height, rec.width)
        assert len(sample.targets) == len(rec.boxes)


def _image(path: Path, w: int = 48, h: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))
    return path


def _convert(fmt: str, src: Path, out: Path, warnings: Optional[list[str]] = None, **kw: Any):
    return convert_dataset(ConvertOptions(format=fmt, input=str(src), output=str(out), **kw),
                           warn=(warnings.append if warnings is not None else None))


# ------------------------------------------------------------------ Pascal VOC


def _voc_xml(file_name: str, w: int, h: int, objects: list[tuple[str, tuple[int, ...], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return (f"<annotation><folder>VOC</folder><filename>{file_name}</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def _voc_box(box: tuple[float, ...]) -> tuple[int, ...]:
    """VOC's 1-based inclusive integer box of a continuous xyxy box."""
    return round(box[0]) + 1, round(box[1]) + 1, round(box[2]), round(box[3])


def _write_voc(shapes: dict[str, Any], root: Path) -> dict[str, list[tuple[str, list[float], int]]]:
    """DIR/Annotations + DIR/JPEGImages; the first object is difficult; one extra negative image.
    Returns file_name -> expected [(name, bbox xywh, iscrowd)]."""
    expected = {}
    (root / "Annotations").mkdir(parents=True)
    for k, (name, (w, h, objects)) in enumerate(sorted(shapes["items"].items())):
        _copy(shapes["images"] / name, root / "JPEGImages" / name)
        rows = [(o["name"], _voc_box(o["box"]), int(k == 0 and j == 0)) for j, o in enumerate(objects)]
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(_voc_xml(name, w, h, rows), encoding="utf-8")
        expected[name] = [(n, [b[0] - 1, b[1] - 1, b[2] - b[0] + 1, b[3] - b[1] + 1], d) for n, b, d in rows]
    first = sorted(shapes["items"])[0]
    _copy(shapes["images"] / first, root / "JPEGImages" / "negative.jpg")
    (root / "Annotations" / "negative.xml").write_text(_voc_xml("negative.jpg", 64, 64, []), encoding="utf-8")
    expected["negative.jpg"] = []
    return expected


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def test_voc_round_trip(shapes, tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    expected = _write_voc(shapes, root)
    report = _convert("voc", root, tmp_path / "voc.json")
    got = _converted(tmp_path / "voc.json")
    assert set(got) == set(expected)
    for name, want in expected.items():
        w, h, anns = got[name]
        assert (w, h) == (64, 64)
        assert [(n, c) for n, _, _, c in anns] == [(n, c) for n, _, c in want]
        for (_, bbox, seg, _), (_, want_box, _) in zip(anns, want):
            assert bbox == want_box and seg is None  # VOC's integer boxes come back exactly
    assert json.loads((tmp_path / "voc.json").read_text())["categories"] == [
        {"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(report.class_names)]
    assert report.class_names == sorted({n for v in expected.values() for n, _, _ in v})
    assert report.num_negatives == 1 and report.num_crowd == 1 and not report.problems
    _loads_with_detkit(tmp_path / "voc.json", root / "JPEGImages")

    dropped = _convert("voc", root, tmp_path / "easy.json", drop_difficult=True)
    assert dropped.info["difficult dropped"] == 1 and dropped.num_crowd == 0
    assert sum(dropped.per_class.values()) == sum(report.per_class.values()) - 1


def test_voc_flat_folder_and_class_file(tmp_path: Path) -> None:
    """LabelImg's layout (XML beside its image); --classes fixes the category order."""
    _image(tmp_path / "flat" / "sub" / "a.png")
    (tmp_path / "flat" / "sub" / "a.xml").write_text(
        _voc_xml("a.png", 48, 32, [("zebra", (1, 1, 10, 20), 0), ("ant", (5, 6, 49, 33), 0)]),  # 1 px over: clipped
        encoding="utf-8")
    (tmp_path / "classes.txt").write_text("zebra\nant\n\n", encoding="utf-8")
    report = _convert("voc", tmp_path / "flat", tmp_path / "out.json", classes=str(tmp_path / "classes.txt"))
    got = _converted(tmp_path / "out.json")
    assert report.class_names == ["zebra", "ant"]
    assert list(got) == ["sub/a.png"] and got["sub/a.png"][:2] == (48, 32)
    assert [(n, b) for n, b, _, _ in got["sub/a.png"][2]] == [("zebra", [0, 0, 10, 20]), ("ant", [4, 5, 44, 27])]
    _loads_with_detkit(tmp_path / "out.json", tmp_path / "flat")


# ------------------------------------------------------------------ YOLO


def _write_yolo(shapes: dict[str, Any], root: Path) -> tuple[list[str], dict[str, list[tuple[str, list[float], Any]]]]:
    """Ultralytics layout with train/val subfolders; polygons as segment lines, the rest as boxes; class
    names as a data.yaml mapping; one image without a label file. Returns (names, expected)."""
    names = ["circle", "rectangle", "triangle", "star"]
    (root).mkdir(parents=True)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n"
                                    + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)), encoding="utf-8")
    expected = {}
    for k, (name, (w, h, objects)) in enumerate(sorted(shapes["items"].items())):
        split = "val" if k % 3 == 2 else "train"
        _copy(shapes["images"] / name, root / "images" / split / name)
        lines, want = [], []
        for o in objects:
            cls = names.index(o["name"])
            if o["polygon"] is not None:
                p = o["polygon"]
                lines.append(f"{cls} " + " ".join(f"{v / (w if i % 2 == 0 else h):.6f}" for i, v in enumerate(p)))
                want.append((o["name"], [min(p[0::2]), min(p[1::2]), max(p[0::2]) - min(p[0::2]),
                                         max(p[1::2]) - min(p[1::2])], p))
            else:
                x1, y1, x2, y2 = o["box"]
                cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
                want.append((o["name"], _xywh(o["box"]), None))
        label = root / "labels" / split / f"{Path(name).stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected[f"{split}/{name}"] = want
    first = sorted(shapes["items"])[0]
    _copy(shapes["images"] / first, root / "images" / "train" / "negative.jpg")  # no label file: a negative
    expected["train/negative.jpg"] = []
    return names, expected


def test_yolo_round_trip(shapes, tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    names, expected = _write_yolo(shapes, root)
    report = _convert("yolo", root, tmp_path / "all.json")
    got = _converted(tmp_path / "all.json")
    assert report.class_names == names and set(got) == set(expected) and not report.problems
    for name, want in expected.items():
        w, h, anns = got[name]
        assert (w, h) == (64, 64) and [a[0] for a in anns] == [n for n, _, _ in want]
        for (_, bbox, seg, crowd), (_, want_box, want_poly) in zip(anns, want):
            _assert_close(bbox, want_box)
            assert crowd == 0 and (seg is None) == (want_poly is None)
            if want_poly is not None:
                assert len(seg) == 1
                _assert_close(seg[0], want_poly)
    assert report.num_negatives == 1
    _loads_with_detkit(tmp_path / "all.json", root / "images")

    # --images picks one split, and the file names are relative to it
    val = _convert("yolo", root, tmp_path / "val.json", images=str(root / "images" / "val"))
    got_val = _converted(tmp_path / "val.json")
    assert set(got_val) == {n.removeprefix("val/") for n in expected if n.startswith("val/")}
    assert val.num_images == len(got_val) and not val.problems
    _loads_with_detkit(tmp_path / "val.json", root / "images" / "val")


def test_yolo_class_names_from_classes_txt_and_missing(tmp_path: Path) -> None:
    _image(tmp_path / "flat" / "a.jpg")
    (tmp_path / "flat" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n", encoding="utf-8")
    with pytest.raises(DetkitError, match="data.yaml.*classes.txt.*--classes"):
        _convert("yolo", tmp_path / "flat", tmp_path / "out.json")
    (tmp_path / "flat" / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    report = _convert("yolo", tmp_path / "flat", tmp_path / "out.json")
    got = _converted(tmp_path / "out.json")
    assert report.class_names == ["cat", "dog"] and not report.problems  # classes.txt is no label file
    name, bbox, _, _ = got["a.jpg"][2][0]
    assert name == "dog" and got["a.jpg"][:2] == (48, 32)  # the size comes from the image header
    _assert_close(bbox, [18.0, 8.0, 12.0, 16.0])


# ------------------------------------------------------------------ LabelMe


def _labelme(image_path: str, w: int, h: int, shapes: list[dict[str, Any]]) -> str:
    return json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
                       "imageData": None, "imageHeight": h, "imageWidth": w})


def _shape(label: str, points: list[list[float]], kind: str = "polygon", group: Optional[int] = None) -> dict:
    return {"label": label, "points": points, "group_id": group, "description": "", "shape_type": kind, "flags": {}}


def test_labelme_round_trip(shapes, tmp_path: Path) -> None:
    """Polygons stay polygons, the other objects go as rectangles; an image without shapes is a negative."""
    root = tmp_path / "labelme"
    expected = {}
    for name, (w, h, objects) in sorted(shapes["items"].items()):
        _copy(shapes["images"] / name, root / "imgs" / name)
        entries, want = [], []
        for o in objects:
            if o["polygon"] is not None:
                p = o["polygon"]
                entries.append(_shape(o["name"], [[p[i], p[i + 1]] for i in range(0, len(p), 2)]))
                want.append((o["name"], [min(p[0::2]), min(p[1::2]), max(p[0::2]) - min(p[0::2]),
                                         max(p[1::2]) - min(p[1::2])], p))
            else:
                x1, y1, x2, y2 = o["box"]
                entries.append(_shape(o["name"], [[x2, y2], [x1, y1]], "rectangle"))  # corners in any order
                want.append((o["name"], _xywh(o["box"]), None))
        (root / f"{Path(name).stem}.json").write_text(_labelme(f"imgs\\{name}", w, h, entries), encoding="utf-8")
        expected[f"imgs/{name}"] = want
    _copy(shapes["images"] / sorted(shapes["items"])[0], root / "imgs" / "negative.jpg")
    (root / "negative.json").write_text(_labelme("imgs/negative.jpg", 64, 64, []), encoding="utf-8")
    expected["imgs/negative.jpg"] = []
    out = root / "coco.json"  # written inside the input folder: not read back as a LabelMe file
    report = _convert("labelme", root, out)
    report_again = _convert("labelme", root, out)
    assert report_again.num_images == report.num_images and not report_again.problems
    got = _converted(out)
    assert set(got) == set(expected) and not report.problems
    for name, want in expected.items():
        w, h, anns = got[name]
        assert (w, h) == (64, 64) and [a[0] for a in anns] == [n for n, _, _ in want]
        for (_, bbox, seg, _), (_, want_box, want_poly) in zip(anns, want):
            _assert_close(bbox, want_box)
            assert (seg is None) == (want_poly is None)
            if want_poly is not None:
                _assert_close(seg[0], want_poly)
    assert report.class_names == sorted({n for v in expected.values() for n, _, _ in v})
    assert report.num_images == len(expected) and report.num_negatives == 1
    _loads_with_detkit(out, root)


def test_labelme_groups_and_unsupported_shapes(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    shapes_ = [
        _shape("car", [[1, 1], [10, 1], [10, 8]], group=3),
        _shape("car", [[20, 10], [30, 10], [30, 20], [20, 20]], group=3),  # second part of the same car
        _shape("car", [[40, 2], [44, 2], [44, 6]]),
        _shape("car", [[5, 5], [9, 9]], "circle"),
    ]
    (tmp_path / "a.json").write_text(_labelme("a.jpg", 48, 32, shapes_), encoding="utf-8")
    warnings: list[str] = []
    report = _convert("labelme", tmp_path, tmp_path / "out" / "coco.json", warnings)
    anns = _converted(tmp_path / "out" / "coco.json")["a.jpg"][2]
    assert len(anns) == 2 and len(anns[0][2]) == 2 and len(anns[1][2]) == 1
    _assert_close(anns[0][1], [1, 1, 29, 19])
    coco = json.loads((tmp_path / "out" / "coco.json").read_text())
    _assert_close([coco["annotations"][0]["area"]], [9 * 7 / 2 + 100])  # both parts' polygon area
    assert report.problems == {"unsupported shape": 1}
    assert len(warnings) == 1 and "a.json: shapes[3]" in warnings[0] and "circle" in warnings[0]


# ------------------------------------------------------------------ bad input


def _yolo_case(root: Path, lines: list[str], orphan: bool = False) -> list[str]:
    _image(root / "images" / "a.jpg")
    _image(root / "images" / "b.jpg")
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    (root / "labels" / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "labels" / "b.txt").write_text("0 0.5 0.5 0.5 0.5\n", encoding="utf-8")
    if orphan:
        (root / "labels" / "c.txt").write_text("0 0.5 0.5 0.5 0.5\n", encoding="utf-8")
    return []


def _voc_case(root: Path, first: str, with_a: bool = True) -> list[str]:
    """Annotations/a.xml (``first``) and a good b.xml, with JPEGImages/b.jpg (and a.jpg when ``with_a``)."""
    _image(root / "JPEGImages" / "b.jpg")
    if with_a:
        _image(root / "JPEGImages" / "a.jpg")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(first, encoding="utf-8")
    (root / "Annotations" / "b.xml").write_text(_voc_xml("b.jpg", 48, 32, [("cat", (1, 1, 10, 10), 0)]), encoding="utf-8")
    return []


def _labelme_case(root: Path, first: str, with_a: bool = True) -> list[str]:
    """a.json (``first``) and a good b.json beside b.jpg (and a.jpg when ``with_a``)."""
    if with_a:
        _image(root / "a.jpg")
    _image(root / "b.jpg")
    (root / "a.json").write_text(first, encoding="utf-8")
    (root / "b.json").write_text(_labelme("b.jpg", 48, 32, [_shape("cat", [[1, 1], [9, 9]], "rectangle")]),
                                 encoding="utf-8")
    return []


_GOOD_A = _voc_xml("a.jpg", 48, 32, [("cat", (1, 1, 10, 10), 0)])
BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<annotation><filename>a.jpg</filename><object><name>&lol3;</name></object></annotation>
"""

# name -> (format, builder(root), extra options, problem kind, what the message names)
BAD_CASES: dict[str, tuple[str, Callable[[Path], Any], dict, str, str]] = {
    "yolo_unknown_class": ("yolo", lambda r: _yolo_case(r, ["0 0.5 0.5 0.2 0.2", "7 0.5 0.5 0.2 0.2"]), {},
                           "unknown class", "a.txt:2"),
    "yolo_box_outside": ("yolo", lambda r: _yolo_case(r, ["1 1.5 0.5 0.2 0.2"]), {}, "box outside image", "a.txt:1"),
    "yolo_label_without_image": ("yolo", lambda r: _yolo_case(r, ["0 0.5 0.5 0.2 0.2"], orphan=True), {},
                                 "missing image", "c.txt"),
    "yolo_malformed_line": ("yolo", lambda r: _yolo_case(r, ["0 0.5 0.5 0.2 0.2", "", "1 0.5 0.5"]), {},
                            "malformed entry", "a.txt:3"),
    "voc_unknown_class": ("voc", lambda r: _voc_case(r, _voc_xml("a.jpg", 48, 32, [("cat", (1, 1, 9, 9), 0),
                                                                                  ("bird", (2, 2, 9, 9), 0)])),
                          {"classes": "cat\ndog\n"}, "unknown class", "a.xml: <object> 2 ('bird')"),
    "voc_box_outside": ("voc", lambda r: _voc_case(r, _voc_xml("a.jpg", 48, 32, [("cat", (1, 1, 90, 9), 0)])), {},
                        "box outside image", "a.xml: <object> 1"),
    "voc_image_missing": ("voc", lambda r: _voc_case(r, _GOOD_A, with_a=False), {}, "missing image", "a.xml"),
    "voc_malformed_xml": ("voc", lambda r: _voc_case(r, "<annotation>\n<filename>a.jpg</filename>\n<object>\n"),
                          {}, "malformed file", "a.xml:4"),
    "voc_billion_laughs": ("voc", lambda r: _voc_case(r, BILLION_LAUGHS), {}, "malformed file", "a.xml"),
    "labelme_malformed_json": ("labelme", lambda r: _labelme_case(r, '{"shapes": [\n  {"label": "cat",\n'), {},
                               "malformed file", "a.json:3"),
    "labelme_image_missing": ("labelme", lambda r: _labelme_case(r, _labelme("a.jpg", 48, 32, []), with_a=False), {},
                              "missing image", "a.json"),
    "labelme_box_outside": ("labelme", lambda r: _labelme_case(r, _labelme("a.jpg", 48, 32, [
        _shape("cat", [[1, 1], [4, 1], [4, 5]]), _shape("cat", [[1, 1], [60, 1], [60, 5]])])), {},
                            "box outside image", "a.json: shapes[1] ('cat')"),
    "labelme_unknown_class": ("labelme", lambda r: _labelme_case(r, _labelme("a.jpg", 48, 32, [
        _shape("bird", [[1, 1], [9, 9]], "rectangle")])), {"classes": "cat\n"}, "unknown class", "a.json: shapes[0]"),
    "labelme_size_mismatch": ("labelme", lambda r: _labelme_case(r, _labelme("a.jpg", 32, 48, [])), {},
                              "image size mismatch", "a.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_named_skipped_and_counted(case: str, tmp_path: Path) -> None:
    fmt, build, extra, kind, where = BAD_CASES[case]
    root = tmp_path / "data"
    build(root)
    if "classes" in extra:
        (tmp_path / "classes.txt").write_text(extra["classes"], encoding="utf-8")
        extra = {**extra, "classes": str(tmp_path / "classes.txt")}
    warnings: list[str] = []
    report = _convert(fmt, root, tmp_path / "out.json", warnings, **extra)
    assert report.problems == {kind: 1}, warnings
    assert len(warnings) == 1 and where in warnings[0] and str(root) in warnings[0], warnings
    # the good entries are converted: b's annotation always, and the rest of a where a is usable
    got = _converted(tmp_path / "out.json")
    assert any(name.endswith("b.jpg") and len(anns) == 1 for name, (_, _, anns) in got.items()), got
    if case == "voc_billion_laughs":
        assert "entit" in warnings[0] and "billion laughs" in warnings[0]

    with pytest.raises(DetkitError, match=re.escape(where.split(" (")[0]) + ".*--strict") as err:
        _convert(fmt, root, tmp_path / "strict.json", strict=True, **extra)
    assert "\n" not in str(err.value) and not (tmp_path / "strict.json").exists()


def test_strict_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    """convert_dataset under run_cli, as tools/convert_dataset.py runs it (the tool itself: the subprocess test)."""
    _yolo_case(tmp_path / "data", ["0 0.5 0.5 0.2 0.2", "5 0.5 0.5 0.2 0.2"])

    def main(strict: bool) -> Callable:
        opts = ConvertOptions(format="yolo", input=str(tmp_path / "data"), output=str(tmp_path / "o.json"),
                              strict=strict)
        warn = lambda line: print(f"warning: {line}", file=sys.stderr)  # noqa: E731 - as the tool prints them
        return lambda argv: print("\n".join(convert_dataset(opts, warn=warn).summary_lines())) or 0

    assert run_cli(main(True), [], prog="convert_dataset.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_dataset.py: error: ") and "a.txt:2" in err[0], err
    assert not (tmp_path / "o.json").exists()

    # without --strict: a warning line, the summary counts it, exit 0
    assert run_cli(main(False), [], prog="convert_dataset.py") == 0
    out = capsys.readouterr()
    assert "warning: skipped unknown class:" in out.err and "a.txt:2" in out.err
    assert "1 unknown class" in out.out and (tmp_path / "o.json").is_file()


# ------------------------------------------------------------------ the split


def _fake_coco(n: int) -> dict[str, Any]:
    images = [{"id": i + 1, "file_name": f"{i:03d}.jpg", "width": 10, "height": 10} for i in range(n)]
    anns = [{"id": k + 1, "image_id": 1 + k % n, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
            for k in range(3 * n)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}


def test_split_is_by_image_disjoint_complete_and_seeded() -> None:
    coco = _fake_coco(30)
    train, val = split_coco(coco, 0.2, seed=0)
    ids = lambda part: {im["id"] for im in part["images"]}  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and ids(train) | ids(val) == ids(coco)
    assert len(val["images"]) == 6
    for part in (train, val):  # each image's annotations go with it, all of them
        assert {a["image_id"] for a in part["annotations"]} <= ids(part)
        assert len(part["annotations"]) == 3 * len(part["images"]) and part["categories"] == coco["categories"]
    reversed_input = {**coco, "images": coco["images"][::-1]}
    assert ids(split_coco(reversed_input, 0.2, seed=0)[1]) == ids(val)  # same seed, same split
    assert ids(split_coco(coco, 0.2, seed=1)[1]) != ids(val)  # another seed, another split


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_val_fraction_outside_0_1_is_a_usage_error(fraction: float, tmp_path: Path) -> None:
    _labelme_case(tmp_path, _labelme("a.jpg", 48, 32, []))
    with pytest.raises(UsageError, match="--val-fraction"):
        _convert("labelme", tmp_path, tmp_path / "o.json", val_fraction=fraction)
    with pytest.raises(UsageError, match="--val-fraction"):
        split_coco(_fake_coco(4), fraction, seed=0)


def test_tool_end_to_end_with_split(shapes, tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    _, expected = _write_yolo(shapes, root)
    out = tmp_path / "out" / "shapes.json"
    r = subprocess.run([sys.executable, str(TOOL), "--format", "yolo", "--input", str(root), "--output", str(out),
                        "--val-fraction", "0.3", "--seed", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    train, val = _converted(out.with_name("shapes_train.json")), _converted(out.with_name("shapes_val.json"))
    assert not out.exists() and set(train).isdisjoint(val) and set(train) | set(val) == set(expected)
    assert len(val) == round(len(expected) * 0.3)
    assert f"{len(expected)} images (1 without annotations)" in r.stdout and "problems: none" in r.stdout
    assert str(out.with_name("shapes_val.json")) in r.stdout
