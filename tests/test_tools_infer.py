"""tools/infer.py on an image, a folder and a video (subprocesses), and draw_detections."""

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

from detkit.visualization import class_color, draw_detections

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "infer.py"
CLASSES = ["circle", "rectangle", "triangle"]

# a tiny Mask R-CNN that needs no data: class names in the config, at most 3 detections per image
TINY_CONFIG = """\
model:
  meta_architecture: mask_rcnn
  num_classes: 3
  backbone: {name: resnet18, norm: BN, freeze_at: 0}
  fpn: {out_channels: 32}
  anchors: {sizes: [[16], [32], [64], [128], [256]]}
  rpn: {pre_nms_topk_test: 100, post_nms_topk_test: 30}
  roi_heads:
    detections_per_image: 3
    box_head: {fc_dim: 64}
    mask_head: {conv_dim: 16, num_conv: 1}
data:
  class_names: [circle, rectangle, triangle]
input: {min_size_test: 96, max_size_test: 128}
"""


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
    cfg_path.write_text(TINY_CONFIG, encoding="utf-8")
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


# --------------------------------------------------------------------------- the tool
def test_help_shows_examples(tmp_path: Path) -> None:
    r = run_tool("--help", cwd=tmp_path)
    assert r.returncode == 0 and "examples:" in r.stdout and "python tools/infer.py --config" in r.stdout


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_infer_image_draws_boxes_in_class_colour(setup: dict[str, Path], tmp_path: Path) -> None:
    src = setup["images"] / "img0.png"
    r = run_tool("--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input", str(src),
                 "--output", str(tmp_path / "out"), "--save-json", str(tmp_path / "res.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
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


def test_infer_folder_and_json(setup: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in setup["images"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("ignored")
    r = run_tool("--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input", str(folder),
                 "--output", str(tmp_path / "out"), "--save-json", str(tmp_path / "res.json"),
                 "--score-thresh", "0.3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]
    assert "broken.png" in r.stderr  # skipped with a warning
    records = json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))
    assert {rec["file_name"] for rec in records} == {"img0.png", "img1.png"}
    for name in ("img0.png", "img1.png"):
        original = cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB)
        drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / name)), cv2.COLOR_BGR2RGB)
        check_drawn(original, drawn, [rec for rec in records if rec["file_name"] == name])


def test_infer_video(setup: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (128, 96))
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for _ in range(4):
        writer.write(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    writer.release()
    r = run_tool("--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input", str(src),
                 "--output", str(tmp_path / "out"), "--save-json", str(tmp_path / "res.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
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


def test_bad_inputs_give_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    base = ["--config", str(setup["config"]), "--weights", str(setup["weights"])]
    r = run_tool(*base, "--input", str(tmp_path / "missing.jpg"), cwd=tmp_path)
    assert_one_line_error(r, "missing.jpg")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    r = run_tool(*base, "--input", str(bad), cwd=tmp_path)
    assert_one_line_error(r, "corrupt.jpg")
    r = run_tool(*base, "--input", str(setup["images"] / "img0.png"), "model.roi_heads.score_thresh_tset=0.1",
                 cwd=tmp_path)
    assert_one_line_error(r, "score_thresh_tset", "score_thresh_test")
    r = run_tool(*base, "--input", str(setup["images"]), "--output", str(setup["images"]), cwd=tmp_path)
    assert_one_line_error(r, "overwrite")
    r = run_tool("--config", str(setup["config"]), "--weights", str(tmp_path / "nope.pth"),
                 "--input", str(setup["images"] / "img0.png"), cwd=tmp_path)
    assert_one_line_error(r, "nope.pth")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_save_json_is_a_coco_results_file(setup: dict[str, Path], tmp_path: Path) -> None:
    """category_id from the recorded data.category_ids (else label + 1); --coco-json gives the GT's image ids
    and the file goes straight into pycocotools' loadRes / COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # without recorded ids: label + 1, image ids = position in the sorted folder
    r = run_tool("--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input",
                 str(setup["images"]), "--save-json", str(tmp_path / "plain.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "label + 1" in r.stderr
    plain = json.loads((tmp_path / "plain.json").read_text(encoding="utf-8"))
    assert plain and all(rec["category_id"] == rec["label"] + 1 for rec in plain)
    assert {(rec["file_name"], rec["image_id"]) for rec in plain} == {("img0.png", 0), ("img1.png", 1)}

    # recorded ids (as train_det writes them) and a GT file listing the images under other ids
    cat_ids = [3, 7, 9]
    cfg = tmp_path / "recorded.yaml"
    cfg.write_text(TINY_CONFIG.replace("data:\n", f"data:\n  category_ids: {cat_ids}\n"), encoding="utf-8")
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
    r = run_tool("--config", str(cfg), "--weights", str(setup["weights"]), "--input", str(setup["images"]),
                 "--coco-json", str(gt_path), "--score-thresh", "0", "--save-json", str(res), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "data.category_ids" in r.stderr
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
    r = run_tool("--config", str(cfg), "--weights", str(setup["weights"]), "--input", str(lone),
                 "--coco-json", str(gt_path), "--save-json", str(tmp_path / "x.json"), cwd=tmp_path)
    assert_one_line_error(r, "--coco-json", "zzz.png")
