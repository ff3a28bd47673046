"""detkit.inference.runner (what tools/infer.py runs) on an image, a folder and a video, its input listing and
id resolution, draw_detections, and tools/infer.py end to end (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from tiny_configs import TINY_MASK_RCNN

from detkit.cli import run_cli
from detkit.data.classes import ClassInfo
from detkit.data.coco import DatasetError
from detkit.errors import UsageError
from detkit.inference.runner import (
    InferOptions,
    confident,
    image_ids_for,
    list_input,
    prediction_records,
    read_coco_json,
    resolve_category_ids,
    run_inference,
)
from detkit.inference.predictor import Prediction
from detkit.visualization import class_color, draw_detections

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "infer.py"
CLASSES = ["circle", "rectangle", "triangle"]


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config, random weights biased so every proposal is a confident class-0 detection, images."""
    from detkit.config import load_config
    from detkit.models.build import build_detector

    root = tmp_path_factory.mktemp("infer")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(TINY_MASK_RCNN, encoding="utf-8")
    torch.manual_seed(0)
    model = build_detector(load_config(cfg_path), len(CLASSES))
    pred = model.roi_heads.box_predictor
    with torch.no_grad():
        pred.cls_score.weight.zero_()
        pred.cls_score.bias.copy_(torch.tensor([8.0, -8.0, -8.0, -8.0]))  # class 0 wins; background is last
        pred.bbox_pred.weight.zero_()
        pred.bbox_pred.bias.zero_()  # boxes = proposals
    weights = root / "random.pth"
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(2):
        img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        cv2.imwrite(str(images / f"img{i}.png"), img)
    return {"root": root, "config": cfg_path, "weights": weights, "images": images}


def check_drawn(original: np.ndarray, drawn: np.ndarray, records: list[dict]) -> None:
    """Each detection's left or right edge is drawn in its class colour over different original pixels.

    The JSON boxes are rounded to 0.01 px, so the edge column is searched within +-1 pixel.
    """
    assert records, "the biased random model should detect something"
    h, w = original.shape[:2]
    for rec in records:
        x, y, bw, bh = rec["bbox"]
        colour = np.array(class_color(rec["label"]), np.uint8)
        y1, y2 = (min(max(int(round(v)), 0), h - 1) for v in (y, y + bh))
        ys = np.arange(y1, y2 + 1)
        best_share, differs = 0.0, False
        for edge_x in (x, x + bw):
            for dx in (-1, 0, 1):
                col = min(max(int(round(edge_x)) + dx, 0), w - 1)
                hit = (drawn[ys, col] == colour).all(axis=1)
                if hit.mean() > best_share:
                    best_share = hit.mean()
                    differs = bool((original[ys, col][hit] != colour).any())
        assert best_share > 0.5, f"only {best_share:.0%} of the box edge {rec['bbox']} has the class colour"
        assert differs, "the class-coloured edge pixels were already that colour in the original"


# --------------------------------------------------------------------------- drawing
def test_draw_detections_threshold_colours_and_masks() -> None:
    img = np.full((60, 80, 3), 30, np.uint8)
    boxes = np.array([[10.0, 10.0, 40.0, 50.0], [45.0, 5.0, 75.0, 55.0]], np.float32)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 20:40, 15:35] = True
    masks[1, 20:40, 50:70] = True
    out = draw_detections(img, torch.from_numpy(boxes), torch.tensor([1, 2]), torch.tensor([0.9, 0.2]),
                          torch.from_numpy(masks), CLASSES, score_thresh=0.5)
    assert out.dtype == np.uint8 and out.shape == img.shape and (img == 30).all()
    assert tuple(out[30, 10]) == class_color(1)  # left edge of the kept box
    assert (out[30, 45] == 30).all() and (out[30, 60] == 30).all()  # the 0.2 box and its mask are dropped
    expected = np.rint(0.5 * 30 + 0.5 * np.array(class_color(1))).astype(int)
    assert (np.abs(out[30, 25].astype(int) - expected) <= 1).all()  # translucent mask, alpha 0.5
    assert class_color(1) != class_color(2) and class_color(1) == class_color(1)


# --------------------------------------------------------------------------- listing and ids
def test_list_input_images_folders_videos(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.png"):
        (folder / name).write_bytes(b"x")
    listed = list_input(folder)
    assert listed.kind == "images" and [f.name for f in listed.files] == ["a.JPG", "b.png"]  # sorted, images only
    assert list_input(folder / "b.png").files == [folder / "b.png"]
    (tmp_path / "clip.MP4").write_bytes(b"x")
    assert list_input(tmp_path / "clip.MP4").kind == "video"
    with pytest.raises(UsageError, match="no such file or folder"):
        list_input(tmp_path / "missing.jpg")
    with pytest.raises(UsageError, match="folder holds no images"):
        list_input(_empty(tmp_path))
    with pytest.raises(UsageError, match="unknown file type '.txt'"):
        list_input(folder / "notes.txt")


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    return empty


def test_read_coco_json_and_image_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = {"images": [{"id": 1, "file_name": "val/a.png"}, {"id": 2, "file_name": "b.png"},
                     {"id": 3, "file_name": "x/dup.png"}, {"id": 4, "file_name": "y/dup.png"},
                     {"id": 5, "file_name": "same.png"}, {"id": 5, "file_name": "z/same.png"}],
          "categories": [{"id": 9, "name": "b"}, {"id": 3, "name": "a"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    coco = read_coco_json(path)
    assert coco.image_ids == {"a.png": 1, "b.png": 2, "dup.png": -1, "same.png": 5}  # -1: ambiguous base name
    assert coco.category_ids == [3, 9]

    files = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    assert image_ids_for(files, None, None) == [0, 1, 2]  # no --coco-json: positions
    assert image_ids_for(files, coco.image_ids, str(path)) == [1, 2, None]
    assert "1 input image(s) not in --coco-json get no records (e.g. c.png)" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="dup.png is listed twice"):
        image_ids_for([tmp_path / "dup.png"], coco.image_ids, str(path))
    with pytest.raises(UsageError, match="none of the input images"):
        image_ids_for([tmp_path / "c.png"], coco.image_ids, str(path))

    with pytest.raises(UsageError, match="no such file"):
        read_coco_json(tmp_path / "missing.json")
    for text, message in (("{not json", "not readable JSON"), ("[]", "no 'images' list"),
                          ('{"images": [{"file_name": "a.png"}]}', "lacks a valid 'id' entry")):
        path.write_text(text)
        with pytest.raises(DatasetError, match=message) as e:
            read_coco_json(path)
        assert "\n" not in str(e.value)


def test_resolve_category_ids_rules(capsys: pytest.CaptureFixture) -> None:
    names = ["circle", "rectangle", "triangle"]
    recorded = ClassInfo(names, [3, 7, 9], "data.class_names")
    cats = resolve_category_ids(recorded, [3, 7, 9, 11])
    assert cats.ids == [3, 7, 9] and cats.source == "the config's data.category_ids"
    assert capsys.readouterr().err == ""
    assert resolve_category_ids(recorded, [3, 7]).ids == [3, 7, 9]  # recorded ids win, with a warning
    assert "category ids [9] of the config's data.category_ids are not in --coco-json's" in capsys.readouterr().err
    from_file = resolve_category_ids(ClassInfo(names, [1, 2, 5], "data.train.annotations (train.json)"), None)
    assert from_file.ids == [1, 2, 5] and "train.json" in from_file.source
    unrecorded = ClassInfo(names, None, "model.num_classes")
    cats = resolve_category_ids(unrecorded, [4, 8, 15])
    assert cats.ids == [4, 8, 15] and "--coco-json" in cats.source  # one per class: sorted ids
    for coco in ([4, 8], None):
        cats = resolve_category_ids(unrecorded, coco)
        assert cats.ids is None and "label + 1" in cats.source


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_prediction_records_fields_and_rounding() -> None:
    masks = np.zeros((3, 20, 30), bool)
    masks[0, 2:8, 3:9] = True
    masks[1, 10:15, 5:25] = True
    pred = Prediction(
        boxes=np.array([[1.234567, 2.0, 10.5, 12.25], [5.0, 10.0, 25.0, 15.0], [0, 0, 1, 1]], np.float32),
        scores=np.array([0.9123456, 0.6, 0.2], np.float32),
        labels=np.array([2, 0, 1], np.int64),
        masks=masks,
    )
    kept = confident(pred, 0.5)
    assert len(kept) == 2 and kept.masks.shape == (2, 20, 30)
    recs = prediction_records(kept, ["a", "b", "c"], "f.png", 42, [3, 7, 9], frame=4)
    assert [list(r) for r in recs] == [["image_id", "category_id", "bbox", "score", "file_name", "label",
                                        "category_name", "frame", "segmentation"]] * 2
    assert recs[0]["bbox"] == [1.23, 2.0, 9.27, 10.25] and recs[0]["score"] == 0.91235
    assert [(r["image_id"], r["category_id"], r["label"], r["category_name"]) for r in recs] == [
        (42, 9, 2, "c"), (42, 3, 0, "a")]
    for r, m in zip(recs, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_util.decode(r["segmentation"]).astype(bool), m)
    plain = prediction_records(confident(Prediction(pred.boxes, pred.scores, pred.labels), 0.0), ["a"], "g.png", 0)
    assert [r["category_id"] for r in plain] == [3, 1, 2]  # label + 1
    assert [r["category_name"] for r in plain] == ["2", "a", "1"] and "segmentation" not in plain[0]
    assert "frame" not in plain[0]


# --------------------------------------------------------------------------- inference
def _options(setup: dict[str, Path], **kwargs) -> InferOptions:
    return InferOptions(config=str(setup["config"]), weights=str(setup["weights"]), **kwargs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_infer_image_draws_boxes_in_class_colour(setup: dict[str, Path], tmp_path: Path) -> None:
    """tools/infer.py end to end: one image drawn and its COCO results written."""
    src = setup["images"] / "img0.png"
    r = run_tool("--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input", str(src),
                 "--output", str(tmp_path / "out"), "--save-json", str(tmp_path / "res.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "img0.png: " in r.stdout and "wrote " in r.stdout and "drawn output in" in r.stdout
    original = cv2.cvtColor(cv2.imread(str(src)), cv2.COLOR_BGR2RGB)
    drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / "img0.png")), cv2.COLOR_BGR2RGB)
    records = json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))
    assert 1 <= len(records) <= 3
    check_drawn(original, drawn, records)
    for rec in records:
        assert rec["file_name"] == "img0.png" and rec["category_name"] == CLASSES[rec["label"]]
        assert rec["score"] >= 0.5 and len(rec["bbox"]) == 4
        m = mask_util.decode(rec["segmentation"])
        assert m.shape == (96, 128)


def test_infer_folder_and_json(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in setup["images"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("ignored")
    returned = run_inference(_options(setup, input=str(folder), output=str(tmp_path / "out"),
                                      save_json=str(tmp_path / "res.json"), score_thresh=0.3))
    err = capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]
    assert "broken.png" in err and "skipped 1 unreadable image(s)" in err  # skipped with a warning
    records = json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))
    assert records == returned
    assert {rec["file_name"] for rec in records} == {"img0.png", "img1.png"}
    for name in ("img0.png", "img1.png"):
        original = cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB)
        drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / name)), cv2.COLOR_BGR2RGB)
        check_drawn(original, drawn, [rec for rec in records if rec["file_name"] == name])


def test_infer_video(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (128, 96))
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for _ in range(4):
        writer.write(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    writer.release()
    run_inference(_options(setup, input=str(src), output=str(tmp_path / "out"), save_json=str(tmp_path / "res.json")))
    assert "clip.mp4: 4 frames" in capsys.readouterr().out
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == 4 and frames[0].shape == (96, 128, 3)
    records = json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))
    assert {rec["frame"] for rec in records} <= set(range(4)) and records
    assert all(rec["image_id"] == rec["frame"] for rec in records)
    with pytest.raises(UsageError, match="does not apply to a video"):
        run_inference(_options(setup, input=str(src), coco_json=str(tmp_path / "gt.json")))


def test_bad_inputs_give_one_line(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the script itself: exit code 2 and one "infer.py: error: ..." line
    base = ["--config", str(setup["config"]), "--weights", str(setup["weights"])]
    r = run_tool(*base, "--input", str(tmp_path / "missing.jpg"), cwd=tmp_path)
    assert_one_line_error(r, "infer.py: error:", "missing.jpg")
    assert r.returncode == 2

    # the rest through the same wrapper, in this process
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cases = [
        (_options(setup, input=str(setup["images"] / "img0.png"), overrides=("model.roi_heads.score_thresh_tset=0.1",)),
         ("score_thresh_tset", "score_thresh_test")),  # a typo in a key: the message names the key meant
        (_options(setup, input=str(bad)), ("corrupt.jpg",)),
        (_options(setup, input=str(setup["images"]), output=str(setup["images"])), ("overwrite",)),
        (InferOptions(config=str(setup["config"]), weights=str(tmp_path / "nope.pth"),
                      input=str(setup["images"] / "img0.png")), ("nope.pth",)),
        (_options(setup, input=str(setup["images"]), overrides=("model.num_classes=5",)), ("model.num_classes=5",)),
    ]
    if not torch.cuda.is_available():
        cases.append((_options(setup, input=str(setup["images"]), device="cuda:7"), ("--device cuda:7",)))
    for opts, needles in cases:
        assert run_cli(lambda argv, o=opts: run_inference(o), [], prog="infer.py") == 2
        err = capsys.readouterr().err
        assert err.startswith("infer.py: error: ") and err.count("\n") == 1, err
        assert all(n in err for n in needles), err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_save_json_is_a_coco_results_file(setup: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """category_id from the recorded data.category_ids (else label + 1); --coco-json gives the GT's image ids
    and the file goes straight into pycocotools' loadRes / COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # without recorded ids: label + 1, image ids = position in the sorted folder
    run_inference(_options(setup, input=str(setup["images"]), save_json=str(tmp_path / "plain.json")))
    assert "label + 1" in capsys.readouterr().err
    plain = json.loads((tmp_path / "plain.json").read_text(encoding="utf-8"))
    assert plain and all(rec["category_id"] == rec["label"] + 1 for rec in plain)
    assert {(rec["file_name"], rec["image_id"]) for rec in plain} == {("img0.png", 0), ("img1.png", 1)}

    # recorded ids (as train_det writes them) and a GT file listing the images under other ids
    cat_ids = [3, 7, 9]
    cfg = tmp_path / "recorded.yaml"
    cfg.write_text(TINY_MASK_RCNN.replace("data:\n", f"data:\n  category_ids: {cat_ids}\n"), encoding="utf-8")
    gt = {
        "images": [{"id": 42, "file_name": "val/img0.png", "height": 96, "width": 128},
                   {"id": 1001, "file_name": "img1.png", "height": 96, "width": 128},
                   {"id": 5, "file_name": "other.png", "height": 96, "width": 128}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900,
                         "iscrowd": 0, "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]}],
        "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, CLASSES)],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt), encoding="utf-8")
    res = tmp_path / "res.json"
    recorded = InferOptions(config=str(cfg), weights=str(setup["weights"]), input=str(setup["images"]),
                            coco_json=str(gt_path), score_thresh=0.0, save_json=str(res))
    run_inference(recorded)
    assert "data.category_ids" in capsys.readouterr().err
    records = json.loads(res.read_text(encoding="utf-8"))
    assert records
    assert all(rec["category_id"] == cat_ids[rec["label"]] for rec in records)
    assert {(rec["file_name"], rec["image_id"]) for rec in records} == {("img0.png", 42), ("img1.png", 1001)}
    for rec in records:
        x, y, w, h = rec["bbox"]
        assert w >= 0 and h >= 0 and isinstance(rec["score"], float)
        assert mask_util.decode(rec["segmentation"]).shape == (96, 128)
    coco_gt = COCO(str(gt_path))
    coco_dt = coco_gt.loadRes(str(res))
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()  # the file as written runs through COCOeval
        assert 0.0 <= ev.stats[0] <= 1.0

    # an input image the GT does not list gets no records (warned); none listed is an error
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "zzz.png").write_bytes((setup["images"] / "img0.png").read_bytes())
    with pytest.raises(UsageError, match="--coco-json .*zzz.png"):
        run_inference(InferOptions(config=str(cfg), weights=str(setup["weights"]), input=str(lone),
                                   coco_json=str(gt_path), save_json=str(tmp_path / "x.json")))
    assert not (tmp_path / "x.json").exists()
