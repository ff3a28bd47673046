"""Build, then load: build_detector loads nothing; load_initial_weights applies one partial-fit rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from detkit.checkpoint import CheckpointError, load_initial_weights
from detkit.config import load_config
from detkit.config import load_classification_config
from detkit.models import build_classifier
from detkit.models.build import build_detector

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
CLS = ROOT / "configs" / "classification" / "shapes_resnet18.yaml"
SMALL = ["model.fpn.out_channels=32", "model.roi_heads.box_head.fc_dim=64", "model.roi_heads.mask_head.conv_dim=16",
         "model.roi_heads.mask_head.num_conv=1"]
CLASS_LAYERS = ("roi_heads.box_predictor.", "roi_heads.mask_head.predictor.")

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*overrides: str):
    return load_config(DEMO, SMALL + list(overrides))


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save({"model": model.state_dict()}, path)
    return path


def test_build_detector_loads_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    cfg = _cfg(f"model.weights={missing}", f"model.backbone.weights={missing}")
    torch.manual_seed(0)
    a = build_detector(cfg, 4)
    torch.manual_seed(0)
    b = build_detector(_cfg(), 4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # fresh init, file untouched
    with pytest.raises(CheckpointError, match="nowhere.pth"):
        load_initial_weights(a, cfg, training=True)


def test_full_fit_loads_everything_in_every_mode(tmp_path: Path) -> None:
    src = _save(build_detector(_cfg(), 4), tmp_path / "four.pth")
    for training in (True, False):
        model = build_detector(_cfg(f"model.weights={src}"), 4)
        (report,) = load_initial_weights(model, _cfg(f"model.weights={src}"), training=training)
        assert report.fits and report.loaded
        ref = torch.load(src, weights_only=True)["model"]
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_new_class_count_reinitializes_class_layers_only_when_training(tmp_path: Path) -> None:
    seven = build_detector(_cfg(), 7)
    src = _save(seven, tmp_path / "seven.pth")
    cfg = _cfg(f"model.weights={src}")
    model = build_detector(cfg, 4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    (report,) = load_initial_weights(model, cfg, training=True)
    assert {k for k, _, _ in report.mismatched} and all(k.startswith(CLASS_LAYERS) for k, _, _ in report.mismatched)
    for k, v in model.state_dict().items():
        if k.startswith(CLASS_LAYERS) and v.shape != seven.state_dict()[k].shape:
            assert torch.equal(v, fresh[k]), k  # re-initialized (kept their fresh init)
        elif not k.startswith(CLASS_LAYERS):
            assert torch.equal(v, seven.state_dict()[k]), k

    with pytest.raises(CheckpointError) as err:  # for inference, random class layers would be silently wrong
        load_initial_weights(build_detector(cfg, 4), cfg, src, training=False)
    msg = str(err.value)
    assert "\n" not in msg and str(src) in msg and "does not fit this config with 4 classes" in msg
    assert "roi_heads.box_predictor.cls_score.weight (checkpoint (8, 64) vs model (5, 64))" in msg


def test_classifier_weights_initialize_the_backbone_with_fc_dropped(tmp_path: Path) -> None:
    tv = torchvision.models.resnet18(num_classes=10)
    src = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), src)
    cfg = _cfg(f"model.backbone.weights={src}")
    model = build_detector(cfg, 4)
    (report,) = load_initial_weights(model, cfg, training=True)
    assert report.dropped == ["fc.bias", "fc.weight"] or sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, tv.conv1.weight)

    # the same file as full detector weights is refused: FPN, RPN and heads would stay random
    cfg = _cfg(f"model.weights={src}")
    with pytest.raises(CheckpointError, match="set model.backbone.weights instead") as err:
        load_initial_weights(build_detector(cfg, 4), cfg, training=True)
    assert "model.weights:" in str(err.value) and "missing from the checkpoint" in str(err.value)


def test_faster_rcnn_weights_do_not_silently_leave_a_random_mask_head(tmp_path: Path) -> None:
    src = _save(build_detector(_cfg("model.meta_architecture=faster_rcnn"), 4), tmp_path / "faster.pth")
    cfg = _cfg(f"model.weights={src}")
    for training in (True, False):
        with pytest.raises(CheckpointError, match=r"roi_heads\.mask_head\..* missing|missing.*roi_heads\.mask_head"):
            load_initial_weights(build_detector(cfg, 4), cfg, training=training)


def test_explicit_weights_replace_the_config_weights(tmp_path: Path) -> None:
    src = _save(build_detector(_cfg(), 4), tmp_path / "four.pth")
    nowhere = tmp_path / "nowhere.pth"
    cfg = _cfg(f"model.weights={nowhere}", f"model.backbone.weights={nowhere}")
    reports = load_initial_weights(build_detector(cfg, 4), cfg, src, training=False, weights_key="--weights")
    assert [r.source for r in reports] == [str(src)]  # neither config file was opened


def test_classifier_new_class_count_reinitializes_fc(tmp_path: Path) -> None:
    src = tmp_path / "cls10.pth"
    torch.save({"model": build_classifier("resnet18", 10).state_dict()}, src)
    cfg = load_classification_config(CLS, [f"model.weights={src}"])
    model = build_classifier("resnet18", 4)
    (report,) = load_initial_weights(model, cfg, training=True)
    assert sorted(k for k, _, _ in report.mismatched) == ["fc.bias", "fc.weight"]
    with pytest.raises(CheckpointError, match="with 4 classes"):
        load_initial_weights(build_classifier("resnet18", 4), cfg, training=False)
