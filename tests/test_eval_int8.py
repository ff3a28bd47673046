"""test.precision=int8 in evaluation: eval_det and train_det's evaluation score the int8 model the Predictor
runs (calibrated on data.train), or, on a CPU without int8 instructions, the fallback the Predictor runs,
with the same warning. Configs int8 cannot run are refused when they load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detkit.config import ConfigError, load_config
from detkit.data.synthetic import make_shapes_coco
from detkit.models.build import build_detector

from test_eval_det import DEMO, TINY_MODEL, eval_det

pytestmark = pytest.mark.usefixtures("one_thread")


def _int8_runs_here() -> bool:
    try:
        from detkit.inference.int8 import int8_supported
    except ImportError:
        return False
    return int8_supported("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("int8eval")
    paths = make_shapes_coco(root / "shapes", num_train=4, num_val=4, image_size=96, seed=2)
    data = ["data.synthetic=null", f"data.val.annotations={paths['val_annotations']}",
            f"data.val.images={paths['val_images']}", "input.min_size_test=96", "input.max_size_test=128",
            "model.backbone.norm=BN", "model.roi_heads.score_thresh_test=0.05", "test.int8_calibration_images=2"]
    cfg = load_config(DEMO, TINY_MODEL + data)
    torch.manual_seed(0)
    ckpt = root / "random.pth"
    torch.save({"model": build_detector(cfg, 4).state_dict()}, ckpt)
    train = [f"data.train.annotations={paths['train_annotations']}", f"data.train.images={paths['train_images']}"]
    return ["--config", str(DEMO), "--weights", str(ckpt), *TINY_MODEL, *data], train


def test_int8_with_openvino_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["test.precision=int8", "test.runtime=openvino"])
    assert "precision=int8" in str(e.value) and "runtime=pytorch" in str(e.value)
    assert "\n" not in str(e.value).strip()


def test_eval_det_int8_without_calibration_data_fails_in_one_line(setup, tmp_path: Path, capsys) -> None:
    argv, _ = setup
    out = tmp_path / "o"
    assert eval_det(["--output-dir", str(out), *argv, "test.precision=int8"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "data.train" in err[0] and "test.int8_quantized" in err[0]
    assert not (out / "results.json").exists()


def test_eval_det_scores_the_int8_model(setup, tmp_path: Path, capsys) -> None:
    argv, train = setup
    assert eval_det(["--output-dir", str(tmp_path / "fp32"), *argv]) == 0
    capsys.readouterr()
    assert eval_det(["--output-dir", str(tmp_path / "int8"), *argv, *train, "test.precision=int8"]) == 0
    printed = capsys.readouterr()
    log = printed.out + printed.err
    fp32 = json.loads((tmp_path / "fp32" / "metrics.json").read_text())
    int8 = json.loads((tmp_path / "int8" / "metrics.json").read_text())
    ref = json.loads((tmp_path / "fp32" / "results.json").read_text())
    got = json.loads((tmp_path / "int8" / "results.json").read_text())
    assert ref, "the random model detects something"
    if _int8_runs_here():
        assert "int8 inference is not available" not in log
        assert got and got != ref  # quantized: not the fp32 numbers
        assert abs(int8["bbox/AP"] - fp32["bbox/AP"]) < 5.0
    else:  # the Predictor's fallback, announced once, then the fp32 (or native bf16) model
        assert "int8 inference is not available" in log
        from detkit.machine import bf16_supported

        if not bf16_supported("cpu"):
            assert int8 == fp32 and got == ref


def test_train_det_evaluates_in_int8(setup, tmp_path: Path) -> None:
    from detkit.config import load_detection_config
    from detkit.engine.run_detection import train_detection

    argv, train = setup
    overrides = [a for a in argv[4:]] + train + [
        "test.precision=int8", "test.int8_quantized=not-used-while-training", "train.max_iters=1",
        "train.batch_size=2", "train.checkpoint_period=1", "train.num_vis_images=0", "train.warmup_iters=1"]
    cfg = load_detection_config(str(DEMO), overrides)
    metrics = train_detection(cfg, tmp_path / "run")
    assert "bbox/AP" in metrics and "segm/AP" in metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bbox/AP"] == metrics["bbox/AP"]
