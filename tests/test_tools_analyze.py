"""tools/analyze.py: model (params, FLOPs), dataset (statistics, plot), log (curves), run as subprocesses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "analyze.py"

# a tiny Mask R-CNN (R18, 32-channel FPN) on a tiny generated shapes set
TINY_CONFIG = """\
model:
  meta_architecture: mask_rcnn
  backbone: {{name: resnet18, norm: BN, freeze_at: 0}}
  fpn: {{out_channels: 32}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  rpn: {{pre_nms_topk_test: 100, post_nms_topk_test: 30}}
  roi_heads:
    box_head: {{fc_dim: 64}}
    mask_head: {{conv_dim: 16, num_conv: 1}}
data:
  synthetic: {{root: {root}, num_train: 6, num_val: 2, image_size: 96, seed: 0}}
input: {{min_size_train: [96], max_size_train: 128, min_size_test: 96, max_size_test: 128}}
dataloader: {{num_workers: 0}}
"""


def run_tool(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=180, env=env
    )


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


def test_help_shows_examples(tmp_path: Path) -> None:
    for args in (["--help"], ["model", "--help"], ["dataset", "--help"], ["log", "--help"]):
        r = run_tool(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "examples:" in r.stdout and "python tools/analyze.py model --config" in r.stdout


def test_model_params_and_flops(tiny_config: Path, tmp_path: Path) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from detkit.config import load_config
    from detkit.models.build import build_detector

    out = tmp_path / "model.txt"
    r = run_tool("model", "--config", str(tiny_config), "--num-classes", "4", "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    params = int(re.search(r"parameters: ([\d,]+)", r.stdout).group(1).replace(",", ""))
    flops = int(re.search(r"FLOPs per image: [\d.]+ GFLOPs \(([\d,]+)\)", r.stdout).group(1).replace(",", ""))

    model = build_detector(load_config(tiny_config), 4)
    assert params == sum(p.numel() for p in model.parameters())
    assert flops > 0
    # the breakdown's backbone.bottom_up row equals an independent count of the ResNet alone on the
    # padded 96x96 input (convolution FLOPs do not depend on the pixel values)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.backbone.bottom_up(torch.zeros(1, 3, 96, 96))
    row = re.search(r"^\s+backbone\.bottom_up\s+([\d,]+)\s+([\d.]+)\s", r.stdout, re.M)
    assert row is not None, r.stdout
    assert int(row.group(1).replace(",", "")) == sum(p.numel() for p in model.backbone.bottom_up.parameters())
    assert abs(float(row.group(2)) - counter.get_total_flops() / 1e9) <= 0.0006
    assert counter.get_total_flops() < flops
    assert out.read_text(encoding="utf-8").strip() == r.stdout.split("saved to")[0].strip()


def test_dataset_counts_and_plot(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats"
    r = run_tool("dataset", "--config", str(tiny_config), "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ann = json.loads((tmp_path / "shapes" / "train.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in ann["categories"]}
    expected = Counter(names[a["category_id"]] for a in ann["annotations"] if not a.get("iscrowd", 0))
    table = r.stdout.split("instances per class")[1].split("\n\n")[0]
    got = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s+[\d.]+$", table, re.M)}
    assert got == {n: expected.get(n, 0) for n in names.values()}
    assert f"images: {len(ann['images'])}" in r.stdout
    png = cv2.imread(str(out / "dataset_stats.png"))
    assert png is not None and png.shape[0] > 200 and png.std() > 5
    assert "instances per class" in (out / "dataset_stats.txt").read_text(encoding="utf-8")


METRICS = [
    {"iter": 20, "lr": 0.01, "loss_cls": 1.2, "loss_box_reg": 0.6, "loss_rpn_cls": 0.7, "loss_rpn_loc": 0.2},
    {"iter": 40, "lr": 0.02, "loss_cls": 0.9, "loss_box_reg": 0.5, "loss_rpn_cls": 0.4, "loss_rpn_loc": 0.15},
    {"iter": 40, "bbox/AP": 4.5, "bbox/AP50": 10.0, "segm/AP": 3.0},
    {"iter": 60, "lr": 0.02, "loss_cls": 0.7, "loss_box_reg": 0.4, "loss_rpn_cls": 0.3, "loss_rpn_loc": 0.1},
]


def test_log_plots_losses_and_ap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in METRICS) + "\n", encoding="utf-8")
    (run / "metrics.json").write_text(json.dumps({"bbox/AP": 7.25, "segm/AP": 5.0}), encoding="utf-8")
    r = run_tool("log", "--metrics", str(run / "metrics.jsonl"), "--output", str(tmp_path / "plots"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("loss_curves.png", "ap_curves.png"):
        img = cv2.imread(str(tmp_path / "plots" / name))
        assert img is not None and img.std() > 5, name
    # total_loss is the sum of the loss_* keys when the log has none: 0.7+0.4+0.3+0.1 at the end
    row = re.search(r"^total_loss\s+(\d+)\s+([\d.]+)\s+([\d.]+)", r.stdout, re.M)
    assert row and int(row.group(1)) == 3 and float(row.group(3)) == pytest.approx(1.5)
    # bbox/AP: the logged eval at iter 40 plus metrics.json's final value at the last iteration
    row = re.search(r"^bbox/AP\s+(\d+)\s+([\d.]+)\s+([\d.]+)", r.stdout, re.M)
    assert row and int(row.group(1)) == 2 and float(row.group(3)) == pytest.approx(7.25)


def test_log_without_ap_writes_only_losses(tmp_path: Path) -> None:
    lines = [m for m in METRICS if "bbox/AP" not in m]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\nnot json\n", encoding="utf-8")
    r = run_tool("log", "--metrics", str(tmp_path / "metrics.jsonl"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "loss_curves.png").is_file() and not (tmp_path / "ap_curves.png").exists()
    assert "skipped 1 unparsable line" in r.stderr


def test_bad_inputs_give_one_line(tiny_config: Path, tmp_path: Path) -> None:
    r = run_tool("log", "--metrics", str(tmp_path / "nope.jsonl"), cwd=tmp_path)
    assert_one_line_error(r, "nope.jsonl", "metrics.jsonl")
    (tmp_path / "empty.jsonl").write_text('{"iter": 1, "lr": 0.1}\n', encoding="utf-8")
    r = run_tool("log", "--metrics", str(tmp_path / "empty.jsonl"), cwd=tmp_path)
    assert_one_line_error(r, "no lines with 'iter' and loss_* values")
    r = run_tool("model", "--config", str(tiny_config), "model.fpn.out_chanels=8", cwd=tmp_path)
    assert_one_line_error(r, "model.fpn.out_chanels", "model.fpn.out_channels")
    r = run_tool("dataset", "--config", str(tiny_config), "--output", str(tmp_path / "o"), "data.synthetic=null",
                 cwd=tmp_path)
    assert_one_line_error(r, "data.train.annotations")


def test_missing_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    import os

    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n", encoding="utf-8")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")])}
    r = run_tool("log", "--metrics", str(tmp_path / "metrics.jsonl"), cwd=tmp_path, env=env)
    assert_one_line_error(r, "pip install", "detkit[plot]")
