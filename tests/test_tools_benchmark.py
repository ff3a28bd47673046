"""tools/benchmark.py, run as a subprocess on a tiny model and a tiny generated dataset."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark.py"

TINY_CONFIG = """\
model:
  meta_architecture: mask_rcnn
  backbone: {{name: resnet18, norm: BN, freeze_at: 0}}
  fpn: {{out_channels: 32}}
  anchors: {{sizes: [[16], [32], [64], [128], [256]]}}
  rpn: {{pre_nms_topk_train: 200, post_nms_topk_train: 100, pre_nms_topk_test: 100, post_nms_topk_test: 30}}
  roi_heads:
    batch_size_per_image: 32
    box_head: {{fc_dim: 64}}
    mask_head: {{conv_dim: 16, num_conv: 1}}
data:
  {data}
input: {{min_size_train: [96], max_size_train: 128, min_size_test: 96, max_size_test: 128}}
dataloader: {{num_workers: 0}}
train: {{batch_size: 2, base_lr: 0.001}}
"""

ROW = r"^{name}\s+([\d.]+) {unit}\s"


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    data = f"synthetic: {{root: {tmp_path / 'shapes'}, num_train: 4, num_val: 2, image_size: 96, seed: 0}}"
    p.write_text(TINY_CONFIG.format(data=data), encoding="utf-8")
    return p


def test_help_shows_examples(tmp_path: Path) -> None:
    r = run_tool("--help", cwd=tmp_path)
    assert r.returncode == 0 and "examples:" in r.stdout and "python tools/benchmark.py --config" in r.stdout


def test_benchmark_prints_three_throughputs_and_machine(tiny_config: Path, tmp_path: Path) -> None:
    r = run_tool("--config", str(tiny_config), "--iters", "1", "--warmup", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name, unit in (("inference", "img/s"), ("training", "it/s"), ("dataloader", "img/s")):
        m = re.search(ROW.format(name=name, unit=re.escape(unit)), out, re.M)
        assert m is not None, f"no {name} row in:\n{out}"
        assert float(m.group(1)) > 0
    assert "training pipeline" in out  # the real data pipeline fed the training steps
    for key in ("cpu", "cores", "torch", "threads", "device", "gpu"):
        assert re.search(rf"^  {key}\s+\S", out, re.M), f"machine row {key!r} missing"
    assert torch.__version__ in out and "4 classes" in out


def test_synthetic_batches_without_data(tmp_path: Path) -> None:
    cfg = tmp_path / "nodata.yaml"
    cfg.write_text(TINY_CONFIG.format(data="class_names: [a, b]"), encoding="utf-8")
    r = run_tool("--config", str(cfg), "--iters", "1", "--warmup", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(ROW.format(name="training", unit="it/s"), r.stdout, re.M)
    assert "synthetic batches" in r.stdout and "random 96x128 images" in r.stdout
    assert re.search(r"^dataloader\s+n/a\s", r.stdout, re.M) and "2 classes" in r.stdout


def test_bad_inputs_give_one_line(tiny_config: Path, tmp_path: Path) -> None:
    r = run_tool("--config", str(tiny_config), "train.batch_sise=2", cwd=tmp_path)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "train.batch_sise" in r.stderr and "train.batch_size" in r.stderr
    if not torch.cuda.is_available():
        r = run_tool("--config", str(tiny_config), "--device", "cuda", cwd=tmp_path)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "CUDA" in r.stderr


def test_missing_val_files_fall_back_to_random_images_missing_train_files_are_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "nofiles.yaml"
    data = ("train: {annotations: nope/train.json, images: nope/train}\n"
            "  val: {annotations: nope/val.json, images: nope/val}\n  class_names: [a, b]")
    cfg.write_text(TINY_CONFIG.format(data=data), encoding="utf-8")
    # inference only: the val images are only samples -> random images, said in the output
    r = run_tool("--config", str(cfg), "--skip-train", "--skip-data", "--iters", "1", "--warmup", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(ROW.format(name="inference", unit="img/s"), r.stdout, re.M)
    assert "random 96x128 images" in r.stdout
    assert "note: data.val.annotations nope/val.json not found" in r.stdout
    # the data-loader / training benchmarks need the training data: one line naming the file and the way out
    for extra in ([], ["--skip-data"]):
        r = run_tool("--config", str(cfg), "--iters", "1", *extra, cwd=tmp_path)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "nope/train.json" in r.stderr and "--skip-train --skip-data" in r.stderr
