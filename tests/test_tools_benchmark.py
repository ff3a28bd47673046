"""detkit.benchmark and detkit.machine on a tiny model and a tiny generated dataset; tools/benchmark.py as a subprocess."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detkit.machine as machine
from detkit.benchmark import (
    DEFAULT_NUM_CLASSES,
    BenchmarkOptions,
    benchmark_classes,
    machine_rows,
    run_benchmark,
)
from detkit.config import ConfigError, load_config
from detkit.data.coco import DatasetError
from detkit.errors import UsageError
from detkit.machine import resolve_device

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "benchmark.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

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
FAST = BenchmarkOptions(iters=1, warmup=0)


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_config(tmp_path: Path, data: str, name: str = "tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(TINY_CONFIG.format(data=data), encoding="utf-8")
    return p


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, f"synthetic: {{root: {tmp_path / 'shapes'}, num_train: 4, num_val: 2, "
                                  "image_size: 96, seed: 0}")


# ------------------------------------------------------------------------------------- command line
# (--help and its examples: tests/test_tools_help.py)
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


def test_bad_input_gives_one_line_and_exit_code_2(tiny_config: Path, tmp_path: Path) -> None:
    r = run_tool("--config", str(tiny_config), "train.batch_sise=2", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("benchmark.py: error: ")
    assert "train.batch_sise" in r.stderr and "train.batch_size" in r.stderr


# ------------------------------------------------------------------------------------- package
def test_synthetic_batches_without_data(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "class_names: [a, b]"))
    report = run_benchmark(cfg, BenchmarkOptions(iters=1, warmup=0, batch_size=1), config_name="nodata.yaml")
    training, inference, loader = (report.result(n) for n in ("training", "inference", "dataloader"))
    assert training is not None and training.value > 0 and "synthetic batches" in training.details
    assert training.details.startswith("batch 1 (")
    assert inference is not None and inference.value > 0 and "random 96x128 images" in inference.details
    assert loader is not None and loader.value is None and loader.throughput == "n/a"
    assert report.classes.names == ["a", "b"] and cfg.train.batch_size == 2  # the caller's cfg is not changed
    text = report.format()
    assert re.search(ROW.format(name="training", unit="it/s"), text, re.M)
    assert re.search(r"^dataloader\s+n/a\s", text, re.M) and "2 classes" in text
    assert text.splitlines()[0] == "benchmark of nodata.yaml: mask_rcnn resnet18-FPN, 2 classes"


def test_missing_val_files_fall_back_to_random_images_missing_train_files_are_an_error(tmp_path: Path) -> None:
    data = ("train: {annotations: nope/train.json, images: nope/train}\n"
            "  val: {annotations: nope/val.json, images: nope/val}\n  class_names: [a, b]")
    cfg = load_config(write_config(tmp_path, data, "nofiles.yaml"))
    # inference only: the val images are only samples -> random images, said in the output
    report = run_benchmark(cfg, BenchmarkOptions(iters=1, warmup=0, skip_train=True, skip_data=True), "nofiles.yaml")
    assert [r.name for r in report.results] == ["inference"] and report.results[0].value > 0
    assert "random 96x128 images" in report.results[0].details
    text = report.format()
    assert re.search(ROW.format(name="inference", unit="img/s"), text, re.M)
    assert "note: data.val.annotations nope/val.json not found" in text
    # the data-loader / training benchmarks need the training data: one line naming the file and the way out
    for opts in (FAST, BenchmarkOptions(iters=1, warmup=0, skip_data=True)):
        with pytest.raises(DatasetError) as e:
            run_benchmark(cfg, opts, "nofiles.yaml")
        msg = str(e.value)
        assert "\n" not in msg and "nope/train.json" in msg and "--skip-train --skip-data" in msg


def test_bad_options_are_usage_errors(tiny_config: Path) -> None:
    cfg = load_config(tiny_config)
    bad = [(dict(iters=0), "--iters 0"), (dict(warmup=-1), "--warmup -1"), (dict(batch_size=0), "--batch-size 0"),
           (dict(weights=str(tiny_config.parent / "none.pth")), "no such file"), (dict(device="gpu0"), "--device gpu0")]
    if not torch.cuda.is_available():
        bad.append((dict(device="cuda"), "CUDA is not available"))
    for kw, match in bad:
        with pytest.raises(UsageError, match=re.escape(match)):
            run_benchmark(cfg, BenchmarkOptions(**kw), "tiny.yaml")
    assert resolve_device("cpu") == torch.device("cpu")


def test_classes_default_to_a_coco_sized_head_and_are_pinned(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, "{}"))
    classes = benchmark_classes(cfg, None)  # nothing names the classes
    assert classes.num_classes == DEFAULT_NUM_CLASSES == 80 and classes.names[0] == "class_0"
    assert cfg.data.class_names == classes.names  # the Predictor finds the same
    cfg = load_config(write_config(tmp_path, "class_names: [a, b]"), ["model.num_classes=3"])
    with pytest.raises(ConfigError, match="model.num_classes=3"):
        benchmark_classes(cfg, None)  # named, but inconsistently: not replaced by the default


# ------------------------------------------------------------------------------------- machine
def test_machine_info_is_a_typed_record() -> None:
    info = machine.machine_info()
    assert info.cpu and info.logical_cpus >= info.usable_cpus >= 1
    assert set(info.speed_flags) <= set(machine.SPEED_FLAGS) and info.torch == torch.__version__
    assert info.bf16_native == machine.cpu_bf16_native() and isinstance(info.threads, int)
    assert info.cpu_summary().startswith(f"{info.cpu} ({info.logical_cpus} CPUs; ")


def test_cpuinfo_parsing(monkeypatch) -> None:
    lines = [("processor", "0"), ("model name", "Test CPU 9000"), ("physical id", "0"), ("core id", "0"),
             ("flags", "fpu avx2 avx512f avx512_bf16 amx_bf16"), ("processor", "1"), ("model name", "Test CPU 9000"),
             ("physical id", "0"), ("core id", "0"), ("processor", "2"), ("physical id", "0"), ("core id", "1")]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: tuple(lines))
    assert machine.cpu_model_name() == "Test CPU 9000"
    assert machine.cpu_speed_flags() == ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
    assert machine.physical_core_count() == 2
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ())  # no /proc/cpuinfo
    assert machine.cpu_flags() == frozenset() and machine.physical_core_count() is None
    assert machine.cpu_model_name()  # platform's answer, or "unknown"


def test_machine_rows_name_the_gpu() -> None:
    info = machine.machine_info()
    gpu = machine.GpuInfo(0, "Test GPU", 80.0)
    rows = machine_rows(dataclasses.replace(info, gpus=(gpu,)), torch.device("cpu"))
    assert list(rows) == ["cpu", "cores", "platform", "torch", "threads", "device", "gpu"]
    assert rows["gpu"] == "Test GPU (not used: --device cpu)"
    assert machine_rows(dataclasses.replace(info, gpus=()), torch.device("cpu"))["gpu"] == "none"
    rows = machine_rows(dataclasses.replace(info, gpus=(gpu,), cuda="12.4"), torch.device("cuda:0"))
    assert rows["device"] == "cuda:0" and rows["gpu"] == "Test GPU, 80.0 GiB, CUDA 12.4"
