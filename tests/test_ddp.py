"""Two-process torchrun runs (gloo, CPU) of pretrain_cls, train_det and eval_det."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from detkit.checkpoint import load_checkpoint
from detkit.data.synthetic import make_shapes_coco, make_shapes_imagefolder

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

TINY_DET = [
    "model.fpn.out_channels=32", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=30", "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.box_head.fc_dim=64",
    "model.roi_heads.mask_head.conv_dim=16", "model.roi_heads.mask_head.num_conv=1",
    "input.min_size_train=96", "input.max_size_train=128", "input.min_size_test=96", "input.max_size_test=128",
    "dataloader.num_workers=0", "train.num_vis_images=0", "model.roi_heads.score_thresh_test=0.0",
]


def _torchrun(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools" / tool)] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes share the cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_pretrain_cls_two_processes(tmp_path: Path) -> None:
    paths = make_shapes_imagefolder(tmp_path / "data", num_per_class_train=4, num_per_class_val=3, image_size=32)
    out = tmp_path / "run"
    proc = _torchrun("pretrain_cls.py", [
        "--config", str(ROOT / "configs" / "classification" / "shapes_resnet18.yaml"), "--output-dir", str(out),
        f"data.train={paths['train']}", f"data.val={paths['val']}", "data.synthetic=null", "input.size=32",
        "train.batch_size=8", "train.epochs=1", "dataloader.num_workers=0", "train.warmup_epochs=0",
    ], tmp_path)
    assert proc.stdout.count("top1 ") == 1  # the summary is printed by rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"top1", "top5"}
    # 12 val images split over 2 ranks and counted once: accuracy is a multiple of 1/12
    assert abs(metrics["top1"] * 12 / 100 - round(metrics["top1"] * 12 / 100)) < 1e-6
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["iteration"] == 2 and ck["epoch"] == 1  # 16 images / (4 per rank x 2 ranks)
    assert len(ck["rng_states"]) == 2
    assert (out / "log.txt").read_text().count("Output folder") == 1


def test_train_det_and_eval_det_two_processes(tmp_path: Path) -> None:
    paths = make_shapes_coco(tmp_path / "data", num_train=4, num_val=3, image_size=96, seed=5)
    data = ["data.synthetic=null",
            f"data.train.annotations={paths['train_annotations']}", f"data.train.images={paths['train_images']}",
            f"data.val.annotations={paths['val_annotations']}", f"data.val.images={paths['val_images']}"]
    cfg = str(ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml")
    out = tmp_path / "run"
    proc = _torchrun("train_det.py", ["--config", cfg, "--output-dir", str(out), *TINY_DET, *data,
                                      "train.max_iters=2", "train.batch_size=2", "train.checkpoint_period=1",
                                      "train.log_period=1", "train.warmup_iters=1", "train.sync_bn=true"], tmp_path)
    assert proc.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert "bbox/AP" in metrics and "segm/AP" in metrics
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "total_loss" in r] == [1, 2]
    evals = [r for r in records if "bbox/AP" in r]  # the final evaluation, logged once (rank 0)
    assert len(evals) == 1 and evals[0]["iter"] == 2 and evals[0]["segm/AP"] == metrics["segm/AP"]
    assert (out / "log.txt").read_text().count("Output folder") == 1
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["iteration"] == 2 and len(ck["rng_states"]) == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # saved unwrapped from DDP

    ev = tmp_path / "eval"
    proc = _torchrun("eval_det.py", ["--config", cfg, "--weights", str(out / "checkpoints" / "last.pth"),
                                     "--output-dir", str(ev), *TINY_DET, *data], tmp_path)
    ev_metrics = json.loads((ev / "metrics.json").read_text())
    results = json.loads((ev / "results.json").read_text())
    # every val image's results were gathered from both ranks into one file
    assert {r["image_id"] for r in results} == {1, 2, 3}
    assert ev_metrics["bbox/AP"] == pytest.approx(metrics["bbox/AP"], abs=1e-6)
