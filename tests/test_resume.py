"""kill -9 during tools/train_det.py, then --resume: iterations, LR schedule and data order continue, and the
run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detkit.checkpoint import load_checkpoint
from detkit.config import load_config
from detkit.data.synthetic import make_shapes_coco
from detkit.engine import lr_factor
from detkit.engine.detection import build_train_loader, load_split
from detkit.cli import default_argument_parser, run_cli
from detkit.config import load_detection_config
from detkit.engine.run_detection import train_detection

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_det.py"
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
TINY = [
    "model.fpn.out_channels=32", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=30", "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.box_head.fc_dim=64",
    "model.roi_heads.mask_head.conv_dim=16", "model.roi_heads.mask_head.num_conv=1",
    "input.min_size_train=[96,128]", "input.max_size_train=160", "input.min_size_test=96",
    "input.max_size_test=128", "dataloader.num_workers=0", "train.batch_size=2", "train.num_vis_images=0",
]
MAX_ITERS, PERIOD, BASE_LR = 9, 3, 0.01
SCHEDULE = dict(max_iters=MAX_ITERS, schedule="multistep", steps=[4, 7], gamma=0.1, warmup_iters=2, warmup_factor=0.1)


def train_det(argv: list[str]) -> int:
    """What tools/train_det.py does with ``argv``, through the package functions; the exit code."""
    args = default_argument_parser(None).parse_args(argv)
    return run_cli(lambda _: train_detection(load_detection_config(args.config, args.overrides), args.output_dir,
                                             args.resume) and 0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_train=10, num_val=2, image_size=128, seed=3)


def _overrides(shapes: dict) -> list[str]:
    return TINY + [
        "data.synthetic=null",
        f"data.train.annotations={shapes['train_annotations']}", f"data.train.images={shapes['train_images']}",
        f"data.val.annotations={shapes['val_annotations']}", f"data.val.images={shapes['val_images']}",
        f"train.max_iters={MAX_ITERS}", f"train.checkpoint_period={PERIOD}", "train.log_period=1",
        f"train.base_lr={BASE_LR}", "train.steps=[4,7]", "train.gamma=0.1", "train.warmup_iters=2",
        "train.warmup_factor=0.1", "train.keep_last=2",
    ]


def test_kill_9_then_resume_continues(shapes: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pth"
    cmd = [sys.executable, str(TOOL), "--config", str(DEMO), "--output-dir", str(out)] + _overrides(shapes)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not last.exists():
            assert proc.poll() is None, f"training ended (rc {proc.returncode}) before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(last)["iteration"]
    assert killed_at % PERIOD == 0 and 0 < killed_at < MAX_ITERS
    assert not (out / "metrics.json").exists()

    assert train_det(["--config", str(DEMO), "--output-dir", str(out), "--resume"] + _overrides(shapes)) == 0

    log = (out / "log.txt").read_text()
    assert f"Resumed from {last} at iteration {killed_at}" in log
    assert f"Starting training from iteration {killed_at} to {MAX_ITERS}" in log
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "bbox/AP" in r]
    records = [r for r in records if "total_loss" in r]
    assert [r["iter"] for r in records] == list(range(1, MAX_ITERS + 1))  # no gap, no duplicate
    assert [r["iter"] for r in evals] == [MAX_ITERS]  # no eval line of the killed run survives
    for r in records:  # the LR of step i (logged as iter i+1) follows the schedule across the kill
        assert r["lr"] == pytest.approx(BASE_LR * lr_factor(r["iter"] - 1, **SCHEDULE), rel=1e-9), r["iter"]
    final = load_checkpoint(last)
    assert final["iteration"] == MAX_ITERS
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(BASE_LR * 0.01)
    assert sorted(p.name for p in (out / "checkpoints").glob("model_*.pth"))[-1] == f"model_{MAX_ITERS:07d}.pth"
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "best.pth").is_file()

    # the killed-and-resumed run ends with the weights of an uninterrupted run (same seed, data order
    # and RNG state): the resume restored everything the remaining steps depend on
    whole = tmp_path / "whole"
    assert train_det(["--config", str(DEMO), "--output-dir", str(whole)] + _overrides(shapes)) == 0
    uninterrupted = load_checkpoint(whole / "checkpoints" / "last.pth")
    assert uninterrupted["iteration"] == MAX_ITERS
    assert final["model"].keys() == uninterrupted["model"].keys()
    for k, v in uninterrupted["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(final["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # not vacuous: the last steps really changed the weights the comparison covers
    before = load_checkpoint(whole / "checkpoints" / f"model_{MAX_ITERS - PERIOD:07d}.pth")["model"]
    assert any(not torch.allclose(before[k], v, rtol=1e-4, atol=1e-5)
               for k, v in uninterrupted["model"].items() if v.is_floating_point())
    for group, ref in zip(final["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        torch.testing.assert_close(group["momentum_buffer"], ref["momentum_buffer"], rtol=1e-4, atol=1e-5)


def test_resumed_loader_replays_the_same_batches(shapes: dict) -> None:
    cfg = load_config(DEMO, _overrides(shapes))
    data = load_split(cfg, "train", is_train=True)

    def ids(start: int, n: int) -> list[list[int]]:
        it = iter(build_train_loader(cfg, data, start_iter=start))
        return [next(it).image_ids for _ in range(n)]

    full = ids(0, 6)
    assert ids(4, 2) == full[4:6]
    assert len({i for b in full for i in b}) > 2  # really shuffled over the dataset, not one batch repeated


def test_resume_from_a_checkpoint_of_another_class_count_is_one_clear_line(shapes: dict, tmp_path: Path,
                                                                         capsys) -> None:
    import torch

    from detkit.checkpoint import save_checkpoint
    from detkit.engine import build_sgd, training_state
    from detkit.models.build import build_detector

    cfg = load_config(DEMO, _overrides(shapes))
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pth"
    seven = build_detector(cfg, 7)  # the shapes data set has 4 classes
    save_checkpoint(training_state(seven, build_sgd(seven, BASE_LR), 3), last)

    argv = ["--config", str(DEMO), "--output-dir", str(out), "--resume"] + _overrides(shapes)
    assert train_det(argv) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [s for s in stderr.splitlines() if s.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {last}: cannot resume, its weights do not fit this model")
    four = build_detector(cfg, 4).state_dict()
    mismatched = [k for k, v in seven.state_dict().items() if v.shape != four[k].shape]
    assert any(k.startswith("roi_heads") for k in mismatched)
    assert f"{len(mismatched)} tensor(s) differ in shape" in err[0]
    for k in mismatched[:10]:
        assert f"{k} (checkpoint {tuple(seven.state_dict()[k].shape)} vs model {tuple(four[k].shape)})" in err[0]
    assert "another architecture or class count" in err[0] and f"model.weights={last}" in err[0]
    assert torch.equal(load_checkpoint(last)["model"][mismatched[0]], seven.state_dict()[mismatched[0]])  # untouched
    assert not (out / "metrics.json").exists()
