"""tools/browse_dataset.py (run as a subprocess) and the contact-sheet / ground-truth drawing helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.analysis.browse import build_dataset, choose_indices, render, write_outputs
from detkit.config import load_detection_config
from detkit.errors import UsageError
from detkit.structures import Targets
from detkit.visualization import class_color, draw_ground_truth, draw_targets, make_contact_sheet
from shared_data import coco128_root, require_coco128

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "browse_dataset.py"
COCO128 = coco128_root()

TINY_CONFIG = """\
model:
  meta_architecture: mask_rcnn
  backbone: {{name: resnet18}}
data:
  synthetic: {{root: {root}, num_train: 5, num_val: 3, image_size: 96, seed: 0}}
input: {{min_size_train: [128], max_size_train: 200, min_size_test: 64, max_size_test: 100, hflip_prob: 0.5}}
"""


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CONFIG.format(root=tmp_path / "shapes"), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- drawing helpers
def test_contact_sheet_layout() -> None:
    a = np.full((50, 100, 3), 200, np.uint8)  # landscape
    b = np.full((100, 50, 3), 100, np.uint8)  # portrait
    sheet = make_contact_sheet([a, b, a], cols=2, cell_size=64, gap=4, background=(0, 0, 0))
    assert sheet.shape == (2 * 68 + 4, 2 * 68 + 4, 3) and sheet.dtype == np.uint8
    # first cell: the landscape image fills the width (64) and half the height (32), centred
    assert (sheet[4 + 16 : 4 + 48, 4 : 4 + 64] == 200).all()
    assert (sheet[4 : 4 + 15, 4 : 4 + 64] == 0).all()
    # second cell: portrait, 32 wide, centred
    assert (sheet[4 : 4 + 64, 68 + 4 + 16 : 68 + 4 + 48] == 100).all()
    # the unused fourth cell stays background
    assert (sheet[72:, 72:] == 0).all()
    with pytest.raises(ValueError, match="at least one image"):
        make_contact_sheet([])


def test_ground_truth_drawing_colours_boxes_and_masks() -> None:
    img = np.full((80, 80, 3), 40, np.uint8)
    masks = np.zeros((1, 80, 80), np.uint8)
    masks[0, 30:50, 30:50] = 1
    out = draw_ground_truth(img, np.array([[20.0, 20.0, 60.0, 60.0]]), np.array([2]), masks, ["a", "b", "c"])
    assert (img == 40).all(), "the input must not be modified"
    assert tuple(out[40, 20]) == class_color(2)  # left edge, mid-height
    blended = np.rint(0.5 * 40 + 0.5 * np.array(class_color(2))).astype(np.uint8)
    assert (np.abs(out[40, 40].astype(int) - blended) <= 1).all()  # translucent mask
    assert (out[70, 70] == 40).all()  # outside: untouched
    t = Targets(boxes=torch.tensor([[10.0, 10.0, 30.0, 30.0]]), labels=torch.tensor([1]),
                ignore_boxes=torch.tensor([[50.0, 50.0, 70.0, 70.0]]))
    out = draw_targets(img, t, ["a", "b"])
    assert tuple(out[20, 10]) == class_color(1) and tuple(out[60, 50]) == (128, 128, 128)


# --------------------------------------------------------------------------- the tool
def test_help_shows_examples(tmp_path: Path) -> None:
    r = run_tool("--help", cwd=tmp_path)
    assert r.returncode == 0 and "examples:" in r.stdout and "python tools/browse_dataset.py --config" in r.stdout


def test_browse_writes_images_and_contact_sheet(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "browse"
    dataset = build_dataset(load_detection_config(tiny_config), "train", seed=0)
    drawn, skipped = render(dataset, choose_indices(len(dataset), 3, shuffle=False, seed=0))
    assert not skipped and len(drawn) == 3
    written = write_outputs(drawn, out, contact_sheet=False, cols=4, cell=320)
    ann = json.loads((tmp_path / "shapes" / "train.json").read_text(encoding="utf-8"))
    files = sorted(out.glob("*.png"))
    assert sorted(written) == files
    assert [f.stem for f in files] == sorted(Path(im["file_name"]).stem for im in ann["images"])[:3]
    colours = {class_color(k) for k in range(4)}
    for f in files:
        drawn = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        # the training pipeline resized the 96 px images to the 128 px train size
        assert drawn.shape[:2] == (128, 128)
        # box outlines in class colours are present
        present = {tuple(int(v) for v in px) for px in drawn.reshape(-1, 3)} & colours
        assert present, f"no class-coloured pixels in {f.name}"

    r = run_tool("--config", str(tiny_config), "--split", "val", "--num", "3", "--contact-sheet", "--cols", "2",
                 "--cell-size", "64", "--output", str(out / "sheet"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sheet = cv2.imread(str(out / "sheet" / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[:2] == (2 * 68 + 4, 2 * 68 + 4)
    cell = sheet[4:68, 4:68]
    assert cell.std() > 10 and len(np.unique(cell.reshape(-1, 3), axis=0)) > 50  # real image content
    assert "test pipeline" in r.stdout


def test_choose_indices() -> None:
    assert choose_indices(5, 3, shuffle=False, seed=0) == [0, 1, 2]
    picked = choose_indices(50, 4, shuffle=True, seed=1)
    assert picked == choose_indices(50, 4, shuffle=True, seed=1) and picked != [0, 1, 2, 3] and len(set(picked)) == 4
    assert choose_indices(2, 9, shuffle=True, seed=0) == [0, 1]
    with pytest.raises(UsageError, match="--num 0: must be at least 1"):
        choose_indices(5, 0, shuffle=False, seed=0)


def test_bad_inputs_give_one_line(tiny_config: Path, tmp_path: Path) -> None:
    r = run_tool("--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert_one_line_error(r, "missing.yaml")
    r = run_tool("--config", str(tiny_config), "input.min_size_trian=[64]", cwd=tmp_path)
    assert_one_line_error(r, "input.min_size_trian", "input.min_size_train")
    r = run_tool("--config", str(tiny_config), "data.synthetic=null", cwd=tmp_path)
    assert_one_line_error(r, "data.train.annotations")
    r = run_tool("--config", str(tiny_config), "data.synthetic=null", f"data.train.annotations={tmp_path}/no.json",
                 f"data.train.images={tmp_path}", cwd=tmp_path)
    assert_one_line_error(r, "no.json")


def test_browse_real_coco128(tmp_path: Path) -> None:
    require_coco128()
    cfg = tmp_path / "coco.yaml"
    cfg.write_text("model: {meta_architecture: mask_rcnn}\ninput: {min_size_train: [160], max_size_train: 240}\n")
    r = run_tool("--config", str(cfg), "--num", "4", "--contact-sheet", "--output", str(tmp_path / "o"),
                 f"data.train.annotations={COCO128 / 'annotations.json'}", f"data.train.images={COCO128 / 'images'}",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "80 classes" in r.stdout
    assert cv2.imread(str(tmp_path / "o" / "contact_sheet.png")).std() > 10
