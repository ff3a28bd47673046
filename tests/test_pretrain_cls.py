"""End-to-end tests of tools/pretrain_cls.py on tiny generated ImageFolders (CPU, random init)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.checkpoint import load_checkpoint, load_initial_weights, load_weights
from detkit.data.synthetic import make_shapes_imagefolder
from detkit.cli import run_cli
from detkit.config import load_classification_config
from detkit.engine.run_classification import pretrain_classifier

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "pretrain_cls.py"
CONFIG = ROOT / "configs" / "classification" / "shapes_resnet18.yaml"




@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls_data")
    make_shapes_imagefolder(root, num_per_class_train=6, num_per_class_val=3, image_size=32, seed=0)
    return root


def _overrides(folder: Path, **extra) -> list[str]:
    base = {
        "data.train": str(folder / "train"), "data.val": str(folder / "val"), "data.synthetic": "null",
        "input.size": 32, "train.batch_size": 8, "train.epochs": 1, "dataloader.num_workers": 0,
        "train.warmup_epochs": 0, "train.log_period": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _run(out: Path, overrides: list[str], resume: bool = False) -> int:
    """What ``tools/pretrain_cls.py --config CONFIG --output-dir out [--resume] overrides`` does, through the
    package functions; the exit code."""
    return run_cli(lambda _: pretrain_classifier(load_classification_config(CONFIG, overrides), out, resume) and 0)


def test_trains_checkpoints_and_resumes(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _run(out, _overrides(folder, **{"train.epochs": 1})) == 0
    first = capsys.readouterr().err
    assert "Epoch 1/1" in first
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["epoch"] == 1 and ck["iteration"] == 3  # 24 images / batch 8
    assert ck["classes"] == ["circle", "rectangle", "star", "triangle"]

    # the checkpoint reloads into a fresh classifier, strictly
    from detkit.models import build_classifier

    clf = build_classifier("resnet18", 4)
    clf.load_state_dict(ck["model"])

    # resume to 2 epochs: only epoch 2 runs, iterations continue
    assert _run(out, _overrides(folder, **{"train.epochs": 2}), resume=True) == 0
    second = capsys.readouterr().err
    assert "Resumed from" in second and "1 epoch(s) done" in second
    assert "Epoch 2/2" in second and "Epoch 1/2" not in second
    ck2 = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck2["epoch"] == 2 and ck2["iteration"] == 6
    assert [h["epoch"] for h in ck2["history"]] == [1, 2]
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "total_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in records if "top1" in r] == [3, 6]  # one eval line per epoch

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"top1", "top5"}
    assert 0.0 <= metrics["top1"] <= 100.0 and metrics["top5"] == pytest.approx(100.0)  # 4 classes: top5 = all
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    assert list(out.glob("events.out.tfevents.*"))


def test_loss_falls(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "fit"
    ov = _overrides(folder, **{"train.epochs": 4, "train.base_lr": 0.003, "input.min_crop_scale": 1.0,
                               "input.hflip_prob": 0.0, "train.label_smoothing": 0.0})
    assert _run(out, ov) == 0
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_pretrained_checkpoint_initializes_detector_backbone(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bb"
    assert _run(out, _overrides(folder)) == 0
    ckpt_path = out / "checkpoints" / "last.pth"
    from detkit.config import load_config
    from detkit.models import build_detector  # type: ignore[attr-defined]

    cfg = load_config(ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml",
                      [f"model.backbone.weights={ckpt_path}", "model.fpn.out_channels=32"])
    det = build_detector(cfg, num_classes=3)  # builds only; the checkpointer loads
    (report,) = load_initial_weights(det, cfg, training=True)
    assert report.dropped == ["fc.weight", "fc.bias"] or set(report.dropped) == {"fc.weight", "fc.bias"}
    sd = load_checkpoint(ckpt_path)["model"]
    torch.testing.assert_close(det.backbone.bottom_up.stem.conv1.weight, sd["backbone.stem.conv1.weight"])
    report = load_weights(det.backbone.bottom_up, ckpt_path)
    assert {"fc.weight", "fc.bias"} <= set(report.dropped)
    assert not report.missing and not report.mismatched


def test_corrupt_image_is_skipped_and_counted(folder: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "train" / "star" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "corrupt"
    assert _run(out, _overrides(data)) == 0
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 1
    assert "skipped unreadable images: 1" in capsys.readouterr().err
    assert "skipped unreadable images: 1" in (out / "log.txt").read_text()


def _one_line_error(out: Path, overrides: list[str], capsys) -> str:
    assert _run(out, overrides) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    return err[0]


def test_missing_split_is_a_clear_error(folder: Path, tmp_path: Path, capsys) -> None:
    msg = _one_line_error(tmp_path / "o", _overrides(folder, **{"data.val": str(tmp_path / "nope")}), capsys)
    assert "nope" in msg and "not found" in msg
    msg = _one_line_error(tmp_path / "o", _overrides(folder, **{"data.val": "null"}), capsys)
    assert "data.val is not set" in msg


def test_empty_class_folder_is_a_clear_error(folder: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "train" / "hexagon").mkdir()
    (data / "val" / "hexagon").mkdir()
    msg = _one_line_error(tmp_path / "o", _overrides(data), capsys)
    assert "hexagon" in msg and "no images" in msg


def test_different_class_sets_exit_nonzero_with_one_line(folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    shutil.rmtree(data / "val" / "star")
    cmd = [sys.executable, str(TOOL), "--config", str(CONFIG), "--output-dir", str(tmp_path / "o")] + _overrides(data)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_cls.py: error:")]
    assert len(errors) == 1 and "star" in errors[0] and "only in train" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
