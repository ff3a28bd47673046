"""End-to-end tests of tools/train_det.py (and eval_det.py on what it produced), CPU, random init."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from detkit.checkpoint import load_checkpoint
from detkit.data.synthetic import make_shapes_coco
from detkit.cli import default_argument_parser, run_cli
from detkit.config import load_detection_config
from detkit.engine.run_detection import evaluate_detection, train_detection
from shared_data import coco128_root, needs_coco128

ROOT = Path(__file__).resolve().parents[1]
COCO128 = coco128_root()
MASK_R18 = ROOT / "configs" / "coco" / "mask_rcnn_R_18_FPN_1x.yaml"
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"

# a small, fast Mask R-CNN R18-FPN at ~128-160 px
TINY = [
    "model.fpn.out_channels=32", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=50", "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.box_head.fc_dim=64",
    "model.roi_heads.mask_head.conv_dim=16", "model.roi_heads.mask_head.num_conv=1",
    "input.min_size_train=[128,160]", "input.max_size_train=192", "input.min_size_test=128",
    "input.max_size_test=160", "dataloader.num_workers=0", "train.batch_size=2", "train.warmup_iters=2",
    "train.num_vis_images=1",
]


def train_det(argv: list[str]) -> int:
    """What tools/train_det.py does with ``argv``, through the package functions; the exit code."""
    args = default_argument_parser(None).parse_args(argv)
    return run_cli(lambda _: train_detection(load_detection_config(args.config, args.overrides), args.output_dir,
                                             args.resume) and 0)


def eval_det(argv: list[str]) -> int:
    """What tools/eval_det.py does with ``argv``, through the package functions; the exit code."""
    args = default_argument_parser(None, weights=True, resume=False).parse_args(argv)
    return run_cli(lambda _: evaluate_detection(load_detection_config(args.config, args.overrides), args.weights,
                                                args.output_dir) and 0)


def _subset(src: Path, dst: Path, n: int) -> Path:
    """A COCO file with the first ``n`` images of ``src`` (and all categories)."""
    d = json.loads(src.read_text())
    d["images"] = d["images"][:n]
    keep = {im["id"] for im in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in keep]
    dst.write_text(json.dumps(d))
    return dst


@needs_coco128
def test_mask_rcnn_r18_on_coco128_writes_all_outputs_then_eval(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    val = _subset(COCO128 / "annotations.json", tmp_path / "val3.json", 3)
    ov = TINY + [
        f"data.train.annotations={COCO128 / 'annotations.json'}", f"data.train.images={COCO128 / 'images'}",
        f"data.val.annotations={val}", f"data.val.images={COCO128 / 'images'}",
        "train.max_iters=3", "train.eval_period=0", "train.checkpoint_period=2", "train.log_period=1",
        "model.rpn.post_nms_topk_test=20", "model.roi_heads.score_thresh_test=0.0",
        # random init: trainable BN keeps activations in range (FrozenBN is for pretrained weights)
        "model.backbone.norm=BN", "model.backbone.freeze_at=0", "train.base_lr=0.005",
    ]
    assert train_det(["--config", str(MASK_R18), "--output-dir", str(out)] + ov) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert f"tensorboard --logdir {out}" in printed
    # the final drawing ([ground truth | predictions], train.num_vis_images=1) as a PNG file
    drawn = sorted((out / "vis").glob("val_*.png"))
    assert [p.name for p in drawn] == ["val_0.png"]
    assert f"Predictions drawn on 1 validation image(s) ([ground truth | predictions]): {out / 'vis'}" in printed
    canvas = cv2.imread(str(drawn[0]))
    assert canvas is not None and canvas.std() > 5

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP75", "bbox/AP-person"):
        assert key in metrics
    assert isinstance(metrics["bbox/AP"], float) and 0.0 <= metrics["bbox/AP"] <= 100.0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "bbox/AP" in r]
    lines = [r for r in lines if "total_loss" in r]
    assert [r["iter"] for r in lines] == [1, 2, 3]
    assert [r["iter"] for r in evals] == [3] and evals[0]["bbox/AP"] == pytest.approx(metrics["bbox/AP"])
    assert "bbox/AP-person" not in evals[0]  # per-class AP stays in metrics.json
    assert all({"lr", "total_loss", "loss_mask", "loss_rpn_cls", "time", "data_time"} <= set(r) for r in lines)
    assert all(math.isfinite(r["total_loss"]) for r in lines)
    ck = out / "checkpoints"
    assert (ck / "last.pth").is_file() and (ck / "best.pth").is_file()
    assert sorted(p.name for p in ck.glob("model_*.pth")) == ["model_0000002.pth", "model_0000003.pth"]
    last = load_checkpoint(ck / "last.pth")
    assert last["iteration"] == 3 and last["config"]["model"]["meta_architecture"] == "mask_rcnn"
    assert (out / "config.yaml").is_file() and "Starting training" in (out / "log.txt").read_text()
    assert list(out.glob("events.out.tfevents.*"))

    # eval_det on the produced checkpoint
    ev = tmp_path / "eval"
    eval_ov = [o for o in ov if not o.startswith("data.train")]
    assert eval_det(["--config", str(out / "config.yaml"), "--weights", str(ck / "last.pth"),
                                   "--output-dir", str(ev)] + eval_ov) == 0
    ev_metrics = json.loads((ev / "metrics.json").read_text())
    assert "bbox/AP" in ev_metrics and "segm/AP" in ev_metrics
    results = json.loads((ev / "results.json").read_text())
    assert isinstance(results, list) and results  # score_thresh 0: there are detections
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert {r["image_id"] for r in results} <= {im["id"] for im in json.loads(val.read_text())["images"]}
    # the same weights evaluated at the end of training give the same numbers
    assert ev_metrics["bbox/AP"] == pytest.approx(metrics["bbox/AP"], abs=1e-6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    return make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=2, image_size=128, seed=0)


def _shapes_overrides(paths: dict, **extra) -> list[str]:
    ov = {"data.synthetic": "null",
          "data.train.annotations": paths["train_annotations"], "data.train.images": paths["train_images"],
          "data.val.annotations": paths["val_annotations"], "data.val.images": paths["val_images"],
          "train.log_period": 1, "train.checkpoint_period": 1, "train.max_iters": 3}
    ov.update(extra)
    return TINY + [f"{k}={v}" for k, v in ov.items()]


def test_corrupt_images_are_skipped_counted_and_training_completes(shapes: dict, tmp_path: Path, capsys) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes["root"], data)
    corrupt = sorted((data / "train").glob("*.jpg"))[:4]  # 3 iterations x 2 images must meet some
    for p in corrupt:
        p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    paths = {k: v.replace(shapes["root"], str(data)) for k, v in shapes.items()}
    out = tmp_path / "run"
    assert train_det(["--config", str(DEMO), "--output-dir", str(out)]
                   + _shapes_overrides(paths, **{"train.num_vis_images": 0, "train.ema": "true",
                                                  "train.ema_decay": 0.5})) == 0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if "total_loss" in r]  # iteration lines, not the eval line
    assert lines[-1]["iter"] == 3
    skipped = lines[-1]["skipped_images"]
    assert skipped >= 2
    log = (out / "log.txt").read_text()
    assert f"{skipped} unreadable images were skipped during training" in log
    assert any(p.name in log for p in corrupt)
    assert (out / "metrics.json").is_file()
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["ema"]["updates"] == 3  # EMA on: updated every step, saved, and used for evaluation
    assert any(not torch.equal(v, ck["model"][k]) for k, v in ck["ema"]["model"].items() if v.is_floating_point())


def test_nan_loss_stops_with_iteration_and_keeps_last_good_checkpoint(shapes: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nan"
    ov = _shapes_overrides(shapes, **{"train.base_lr": 1e12, "train.warmup_iters": 0, "train.max_iters": 6,
                                      "train.num_vis_images": 0})
    assert train_det(["--config", str(DEMO), "--output-dir", str(out)] + ov) == 2
    err = [s for s in capsys.readouterr().err.splitlines() if s.startswith("error:")]
    assert len(err) == 1 and "non-finite loss" in err[0] and "last good checkpoint kept" in err[0], err
    failed_at = int(err[0].split("iteration ")[1].split(":")[0])
    assert "loss_cls=" in err[0] and "loss_mask=" in err[0]
    last = load_checkpoint(out / "checkpoints" / "last.pth")
    assert last["iteration"] == failed_at - 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()


def test_checkpoint_of_another_class_count_gives_a_load_report(shapes: dict, tmp_path: Path, capsys) -> None:
    from detkit.config import load_config
    from detkit.models.build import build_detector

    cfg = load_config(DEMO, [o for o in TINY if not o.startswith(("input", "dataloader", "train"))])
    other = tmp_path / "other.pth"
    torch.save({"model": build_detector(cfg, num_classes=7).state_dict()}, other)
    out = tmp_path / "run"
    ov = _shapes_overrides(shapes, **{"model.weights": other, "train.max_iters": 1, "train.num_vis_images": 0})
    assert train_det(["--config", str(DEMO), "--output-dir", str(out)] + ov) == 0
    log = (out / "log.txt").read_text()
    assert "model.weights" in log and "mismatched" in log and "roi_heads" in log


def test_unknown_config_key_exits_with_one_line_suggestion(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "train_det.py"), "--config", str(DEMO),
           "--output-dir", str(tmp_path / "o"), "train.max_iter=5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert len(lines) == 1, proc.stderr
    assert "unknown config key 'train.max_iter'" in lines[0] and "train.max_iters" in lines[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_saved_config_records_category_ids_and_folder_for_eval_resume_and_infer(shapes: dict, tmp_path: Path,
                                                                                  capsys) -> None:
    from detkit.config import load_config

    out = tmp_path / "run"
    ov = _shapes_overrides(shapes, **{"train.max_iters": 1, "train.num_vis_images": 0,
                                      "model.roi_heads.score_thresh_test": 0.0})
    assert train_det(["--config", str(DEMO), "--output-dir", str(out)] + ov) == 0
    saved = load_config(out / "config.yaml")
    assert saved.data.category_ids == [1, 3, 7, 9]  # the shapes set's (non-contiguous) category ids
    assert saved.data.class_names == ["circle", "rectangle", "triangle", "star"]
    assert saved.output_dir == str(out)
    train_metrics = (out / "metrics.json").read_text()

    # eval_det with the run's config and no --output-dir writes into run/eval, not over run/metrics.json
    assert eval_det(["--config", str(out / "config.yaml"),
                                   "--weights", str(out / "checkpoints" / "last.pth")]) == 0
    assert (out / "eval" / "metrics.json").is_file() and (out / "eval" / "results.json").is_file()
    assert (out / "metrics.json").read_text() == train_metrics

    # --resume with the run's config continues in the run's folder
    assert train_det(["--config", str(out / "config.yaml"), "--resume", "train.max_iters=2"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pth")["iteration"] == 2
    assert "Resumed from" in (out / "log.txt").read_text()

    # infer.py writes category ids the ground truth uses
    res = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "infer.py"), "--config", str(out / "config.yaml"),
                           "--weights", str(out / "checkpoints" / "last.pth"), "--input", shapes["val_images"],
                           "--coco-json", shapes["val_annotations"], "--score-thresh", "0", "--save-json", str(res)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(res.read_text())
    gt = json.loads(Path(shapes["val_annotations"]).read_text())
    assert records and {r["category_id"] for r in records} <= {c["id"] for c in gt["categories"]}
    assert all(r["category_id"] == [1, 3, 7, 9][r["label"]] for r in records)
    assert {r["image_id"] for r in records} <= {im["id"] for im in gt["images"]}
