"""detkit.analysis (model: params/FLOPs, dataset: statistics/plot, log: curves) and the
tools/analyze.py command line over it (help, outputs, one-line errors)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import pytest

from detkit.config import ConfigError, DetectionConfig, load_config
from detkit.data.synthetic import SHAPE_CLASSES
from detkit.errors import UsageError

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
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("analyze.py: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CONFIG.format(root=tmp_path / "shapes"), encoding="utf-8")
    return p


def tiny_cfg(path: Path, *overrides: str) -> DetectionConfig:
    cfg = load_config(path, list(overrides))
    assert isinstance(cfg, DetectionConfig)
    return cfg


# --------------------------------------------------------------------------- model
def test_count_model_params_and_flops(tiny_config: Path) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from detkit.analysis.model import count_model, format_model_report
    from detkit.models.build import build_detector

    model = build_detector(tiny_cfg(tiny_config), 4)
    count = count_model(model, (96, 96))
    assert count.params == sum(p.numel() for p in model.parameters()) == count.trainable
    assert count.flops > 0
    # the top-level rows (with what ran outside them) add up to the total
    assert sum(m.flops for m in count.modules if m.depth == 1) == count.flops
    # the backbone.bottom_up row equals an independent count of the ResNet alone on the padded
    # 96x96 input (convolution FLOPs do not depend on the pixel values)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.backbone.bottom_up(torch.zeros(1, 3, 96, 96))
    row = next(m for m in count.modules if m.name == "backbone.bottom_up")
    assert row.depth == 2
    assert row.params == sum(p.numel() for p in model.backbone.bottom_up.parameters())
    assert row.flops == counter.get_total_flops() < count.flops
    report = format_model_report(count, "title")
    assert f"parameters: {count.params:,}" in report and f"({count.flops:,})" in report
    assert re.search(r"^\s+backbone\.bottom_up\s+[\d,]+\s+[\d.]+\s", report, re.M), report


def test_model_classes_explicit_flag(tiny_config: Path) -> None:
    from detkit.analysis.model import model_classes

    info = model_classes(tiny_cfg(tiny_config), 4)
    assert info.num_classes == 4 and info.source == "--num-classes"
    # the flag wins over the config's own classes and model.num_classes
    info = model_classes(tiny_cfg(tiny_config, "model.num_classes=7", "data.class_names=[a,b]"), 3)
    assert info.num_classes == 3 and info.source == "--num-classes"
    with pytest.raises(ConfigError, match="--num-classes"):
        model_classes(tiny_cfg(tiny_config), 0)


def test_model_classes_from_config(tiny_config: Path) -> None:
    from detkit.analysis.model import model_classes

    info = model_classes(tiny_cfg(tiny_config))  # the generated shapes set
    assert info.names == [n for _, n in sorted(SHAPE_CLASSES)] and "data.synthetic" in info.source
    info = model_classes(tiny_cfg(tiny_config, "data.synthetic=null", "data.class_names=[cat,dog,bird]"))
    assert info.names == ["cat", "dog", "bird"] and info.source == "data.class_names"
    info = model_classes(tiny_cfg(tiny_config, "data.synthetic=null", "model.num_classes=5"))
    assert info.num_classes == 5 and info.source == "model.num_classes"


def test_model_classes_unknown_is_an_error(tiny_config: Path) -> None:
    from detkit.analysis.model import model_classes

    # no silent default (the old tool assumed 80): the error says what to set
    with pytest.raises(ConfigError, match="model.num_classes"):
        model_classes(tiny_cfg(tiny_config, "data.synthetic=null"))


def test_analyze_model_builds_with_the_resolved_classes(tiny_config: Path) -> None:
    from detkit.analysis.model import analyze_model

    r = analyze_model(tiny_cfg(tiny_config, "data.synthetic=null", "data.class_names=[cat,dog]"), size=64)
    assert r.classes.names == ["cat", "dog"] and (r.height, r.width) == (64, 64)
    assert r.report.splitlines()[0].endswith("2 classes from data.class_names, input 64x64")
    # --num-classes overrides a disagreeing model.num_classes; the box predictor has K+1 scores
    r2 = analyze_model(tiny_cfg(tiny_config, "model.num_classes=5"), num_classes=3, size=64, width=96)
    assert "3 classes from --num-classes, input 64x96" in r2.report
    box_params = {m.name: m.params for m in r.count.modules}
    box_params2 = {m.name: m.params for m in r2.count.modules}
    assert box_params2["roi_heads.box_predictor"] - box_params["roi_heads.box_predictor"] == 5 * 65  # per class: 1 score + 4 deltas, each 64 weights + bias
    with pytest.raises(UsageError, match="at least 32"):
        analyze_model(tiny_cfg(tiny_config), size=16)


def test_model_cli_report_and_output(tiny_config: Path, tmp_path: Path) -> None:
    from detkit.models.build import build_detector

    out = tmp_path / "model.txt"
    r = run_tool("model", "--config", str(tiny_config), "--num-classes", "4", "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "4 classes from --num-classes, input 96x96" in r.stdout
    params = int(re.search(r"parameters: ([\d,]+)", r.stdout).group(1).replace(",", ""))
    assert params == sum(p.numel() for p in build_detector(tiny_cfg(tiny_config), 4).parameters())
    assert int(re.search(r"FLOPs per image: [\d.]+ GFLOPs \(([\d,]+)\)", r.stdout).group(1).replace(",", "")) > 0
    assert out.read_text(encoding="utf-8").strip() == r.stdout.split("saved to")[0].strip()


def test_model_cli_unknown_classes_gives_one_line(tiny_config: Path, tmp_path: Path) -> None:
    r = run_tool("model", "--config", str(tiny_config), "data.synthetic=null", cwd=tmp_path)
    assert_one_line_error(r, "number of classes is unknown", "model.num_classes")


# --------------------------------------------------------------------------- dataset
def test_dataset_counts_and_plot(tiny_config: Path, tmp_path: Path) -> None:
    from detkit.analysis.dataset import analyze_dataset

    out = tmp_path / "stats"
    r = analyze_dataset(tiny_cfg(tiny_config), "train", out)
    ann = json.loads((tmp_path / "shapes" / "train.json").read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in ann["categories"]}
    expected = Counter(names[a["category_id"]] for a in ann["annotations"] if not a.get("iscrowd", 0))
    assert r.stats.instances_per_class == {n: expected.get(n, 0) for n in names.values()}
    assert r.stats.num_images == len(ann["images"])
    assert r.stats.sqrt_areas.shape == (sum(expected.values()),)
    assert sum(r.stats.image_sizes.values()) == len(ann["images"])
    # the printed table says the same
    table = r.report.split("instances per class")[1].split("\n\n")[0]
    got = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s+[\d.]+$", table, re.M)}
    assert got == r.stats.instances_per_class
    assert f"images: {len(ann['images'])}" in r.report
    assert (r.text_path, r.plot_path) == (out / "dataset_stats.txt", out / "dataset_stats.png")
    png = cv2.imread(str(r.plot_path))
    assert png is not None and png.shape[0] > 200 and png.std() > 5
    assert r.text_path.read_text(encoding="utf-8") == r.report + "\n"


def test_dataset_counts_after_repeat_factors(tmp_path: Path) -> None:
    from detkit.analysis.dataset import dataset_statistics, format_dataset_report
    from detkit.data.coco import load_coco

    # "common" on images 1-8, "rare" on images 9 (three instances) and 10, image 11 without instances
    pairs = [(1, i) for i in range(1, 9)] + [(2, 9)] * 3 + [(2, 10)]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(1, 12)],
            "categories": [{"id": 1, "name": "common"}, {"id": 2, "name": "rare"}],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [1, 1, 5, 5]}
                            for k, (c, i) in enumerate(pairs, start=1)]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    d = load_coco(tmp_path / "a.json", tmp_path, filter_empty=False, is_train=True)
    stats = dataset_statistics(d, repeat_threshold=0.8, filter_empty=True)
    # f(rare) = 2 of the 10 images training keeps -> r = sqrt(0.8 / 0.2) = 2; f(common) = 0.8 -> r = 1
    assert stats.instances_per_class == {"common": 8, "rare": 4}
    assert stats.repeated_per_class == {"common": 8.0, "rare": 8.0} and stats.images_per_epoch == 12.0
    report = format_dataset_report(stats, "t", 10)
    assert re.search(r"^rare\s+4\s+33\.3\s+8\.0\s+50\.0\s+x2\.00$", report, re.M), report
    assert "repeat_threshold=0.8, 12 images" in report
    assert dataset_statistics(d).repeated_per_class is None


# --------------------------------------------------------------------------- log
METRICS = [
    {"iter": 20, "lr": 0.01, "loss_cls": 1.2, "loss_box_reg": 0.6, "loss_rpn_cls": 0.7, "loss_rpn_loc": 0.2},
    {"iter": 40, "lr": 0.02, "loss_cls": 0.9, "loss_box_reg": 0.5, "loss_rpn_cls": 0.4, "loss_rpn_loc": 0.15},
    {"iter": 40, "bbox/AP": 4.5, "bbox/AP50": 10.0, "segm/AP": 3.0},
    {"iter": 60, "lr": 0.02, "loss_cls": 0.7, "loss_box_reg": 0.4, "loss_rpn_cls": 0.3, "loss_rpn_loc": 0.1},
]


def test_extract_curves() -> None:
    from detkit.analysis.log import extract_curves

    c = extract_curves(METRICS + [{"lr": 0.1, "loss_cls": 9.0}], {"bbox/AP": 7.25, "segm/AP": 5.0, "bbox/AP50": "x"})
    # total_loss is the sum of the loss_* keys when the log has none; lines without iter are skipped
    assert c.losses["total_loss"].iters == [20, 40, 60]
    assert c.losses["total_loss"].values == pytest.approx([2.7, 1.95, 1.5])
    assert set(c.losses) == {"total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    # metrics.json's final values land at the last logged iteration; non-numbers are ignored
    assert (c.aps["bbox/AP"].iters, c.aps["bbox/AP"].values) == ([40, 60], [4.5, 7.25])
    assert (c.aps["bbox/AP50"].iters, c.aps["bbox/AP50"].values) == ([40], [10.0])
    # a final value at an iteration already logged is not added twice
    c = extract_curves(METRICS, {"iter": 40, "bbox/AP": 9.0})
    assert c.aps["bbox/AP"].values == [4.5]


def test_log_plots_losses_and_ap(tmp_path: Path) -> None:
    from detkit.analysis.log import analyze_log

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in METRICS) + "\n", encoding="utf-8")
    (run / "metrics.json").write_text(json.dumps({"bbox/AP": 7.25, "segm/AP": 5.0}), encoding="utf-8")
    r = analyze_log(run / "metrics.jsonl", tmp_path / "plots")
    assert r.written == [tmp_path / "plots" / "loss_curves.png", tmp_path / "plots" / "ap_curves.png"]
    for p in r.written:
        img = cv2.imread(str(p))
        assert img is not None and img.std() > 5, p
    assert r.skipped_lines == 0 and r.ignored_final is None
    # total_loss at the end: 0.7+0.4+0.3+0.1
    row = re.search(r"^total_loss\s+(\d+)\s+([\d.]+)\s+([\d.]+)", r.table, re.M)
    assert row and int(row.group(1)) == 3 and float(row.group(3)) == pytest.approx(1.5)
    # bbox/AP: the logged eval at iter 40 plus metrics.json's final value at the last iteration
    row = re.search(r"^bbox/AP\s+(\d+)\s+([\d.]+)\s+([\d.]+)", r.table, re.M)
    assert row and int(row.group(1)) == 2 and float(row.group(3)) == pytest.approx(7.25)


def test_log_bad_final_metrics_is_ignored(tmp_path: Path) -> None:
    from detkit.analysis.log import analyze_log

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in METRICS) + "\n", encoding="utf-8")
    (tmp_path / "metrics.json").write_text("{broken", encoding="utf-8")
    r = analyze_log(tmp_path / "metrics.jsonl")
    assert r.ignored_final == tmp_path / "metrics.json"
    assert r.curves.aps["bbox/AP"].values == [4.5]


def test_log_cli_without_ap_writes_only_losses(tmp_path: Path) -> None:
    lines = [m for m in METRICS if "bbox/AP" not in m]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\nnot json\n", encoding="utf-8")
    r = run_tool("log", "--metrics", str(tmp_path / "metrics.jsonl"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "loss_curves.png").is_file() and not (tmp_path / "ap_curves.png").exists()
    assert "skipped 1 unparsable line" in r.stderr
    assert "AP plot not written" in r.stdout and f"wrote {tmp_path / 'loss_curves.png'}" in r.stdout


# --------------------------------------------------------------------------- command line
def test_help_shows_examples(tmp_path: Path) -> None:
    for args in (["--help"], ["model", "--help"], ["dataset", "--help"], ["log", "--help"]):
        r = run_tool(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "examples:" in r.stdout and "python tools/analyze.py model --config" in r.stdout
        if args[0] == "model":  # no silent class-count default
            assert "an error when it names none" in " ".join(r.stdout.split())


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
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n", encoding="utf-8")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")])}
    r = run_tool("log", "--metrics", str(tmp_path / "metrics.jsonl"), cwd=tmp_path, env=env)
    assert_one_line_error(r, "pip install", "detkit[plot]")
