"""detkit.checkpoint: atomic save, safe load, format detection, prefix alignment, report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from detkit.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from detkit.models import build_classifier
from detkit.models.backbones.resnet import build_resnet
from detkit.models.necks.fpn import FPN, BackboneWithFPN


class NotATensor:
    """A custom class: loading it needs arbitrary code, which weights_only refuses."""

    def __init__(self) -> None:
        self.payload = 1


class ExplodesWhenPickled:
    def __reduce__(self):
        raise RuntimeError("simulated failure while writing")


class TinyDetector(nn.Module):
    """Key layout of a detkit detector's backbone (backbone.bottom_up / backbone.fpn)."""

    def __init__(self) -> None:
        super().__init__()
        bottom_up = build_resnet("resnet18", norm="FrozenBN", freeze_at=2)
        self.backbone = BackboneWithFPN(bottom_up, FPN(bottom_up.output_specs, out_channels=32))


def test_save_load_roundtrip(tmp_path: Path) -> None:
    obj = {"model": {"w": torch.arange(4.0)}, "iter": 7}
    path = save_checkpoint(obj, tmp_path / "sub" / "ckpt.pth")
    loaded = load_checkpoint(path)
    assert loaded["iter"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert os.listdir(tmp_path / "sub") == ["ckpt.pth"]


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"version": torch.tensor(1)}, path)
    big = torch.zeros(1000)  # written before the failing object: a partial temp file exists
    with pytest.raises(RuntimeError, match="simulated failure"):
        save_checkpoint({"a": big, "b": ExplodesWhenPickled()}, path)
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp files left behind
    assert load_checkpoint(path)["version"].item() == 1


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"model": NotATensor()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "unsafe" in msg and "weights_only" in msg and str(path) in msg
    assert "NotATensor" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="unsafe"):
        load_weights(build_resnet("resnet18"), path)


def test_missing_and_non_torch_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    for name, data in (("text.pth", b"hello, not a checkpoint"), ("empty.pth", b""),
                       ("json.pth", b'{"a": 1}')):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


def test_classifier_checkpoint_into_bare_resnet_drops_fc(tmp_path: Path) -> None:
    cls = build_classifier("resnet18", 10)
    path = save_checkpoint({"model": cls.state_dict(), "epoch": 3}, tmp_path / "cls.pth")
    resnet = build_resnet("resnet18", norm="FrozenBN", freeze_at=2)
    report = load_weights(resnet, path)
    assert report.source_format == "detkit (training checkpoint)"
    assert report.prefix_map == ("backbone.", "")
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.mismatched == [] and report.unexpected == []
    assert len(report.loaded) == len(resnet.state_dict())
    assert torch.equal(resnet.res4[1].bn2.running_var, cls.backbone.res4[1].bn2.running_var)
    assert torch.equal(resnet.stem.conv1.weight, cls.backbone.stem.conv1.weight)
    assert str(path) in report.summary() and "dropped 2" in str(report)


def test_classifier_and_torchvision_into_detector_backbone() -> None:
    cls = build_classifier("resnet18", 5)
    det = TinyDetector()
    report = load_weights(det, cls.state_dict())
    assert report.prefix_map == ("backbone.", "backbone.bottom_up.")
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert all(k.startswith("backbone.fpn.") for k in report.missing) and report.missing
    assert torch.equal(det.backbone.bottom_up.res5[0].conv2.weight, cls.backbone.res5[0].conv2.weight)

    tv = torchvision.models.resnet18(weights=None)
    report = load_weights(det, {f"module.{k}": v for k, v in tv.state_dict().items()})  # DDP prefix
    assert report.source_format == "torchvision classification"
    assert report.prefix_map == ("", "backbone.bottom_up.")
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]
    assert torch.equal(det.backbone.bottom_up.res3[0].shortcut.conv.weight, tv.layer2[0].downsample[0].weight)
    assert torch.equal(det.backbone.bottom_up.stem.bn1.running_mean, tv.bn1.running_mean)


def test_torchvision_classifier_into_classifier_loads_fc() -> None:
    tv = torchvision.models.resnet18(weights=None)
    cls = build_classifier("resnet18", 1000)
    report = load_weights(cls, {"model": tv.state_dict(), "epoch": 1})  # torchvision references layout
    assert report.source_format == "torchvision classification (training checkpoint)"
    assert report.missing == [] and report.dropped == []
    assert torch.equal(cls.fc.weight, tv.fc.weight)


def test_shape_mismatch_is_reported_not_loaded() -> None:
    src = build_classifier("resnet18", 1000)
    dst = build_classifier("resnet18", 10)
    fc_before = dst.fc.weight.detach().clone()
    report = load_weights(dst, src.state_dict())
    assert sorted(report.mismatched) == [("fc.bias", (1000,), (10,)),
                                         ("fc.weight", (1000, 512), (10, 512))]
    assert torch.equal(dst.fc.weight, fc_before)  # kept its initialization
    assert torch.equal(dst.backbone.res2[0].conv1.weight, src.backbone.res2[0].conv1.weight)
    assert "re-initialized" in report.summary()
    assert "fc.weight" not in report.missing


def test_unexpected_keys_and_nothing_matching() -> None:
    model = build_resnet("resnet18", norm="FrozenBN", freeze_at=0)
    sd = dict(model.state_dict())
    sd["res2.0.conv1.extra"] = torch.ones(1)
    sd["note"] = "not a tensor"
    report = load_weights(model, sd)
    assert report.unexpected == ["res2.0.conv1.extra", "note"]
    with pytest.raises(CheckpointError, match="format: detkit") as info:
        load_weights(model, {"some.other.weight": torch.ones(3)})
    assert "<state dict>" in str(info.value)
    with pytest.raises(CheckpointError, match="no tensors"):
        load_weights(model, {"epoch": 3})


def test_torchvision_detection_keys_go_through_its_format_module() -> None:
    det = TinyDetector()
    w = det.backbone.bottom_up.stem.conv1.weight
    report = load_weights(det, {"backbone.body.conv1.weight": torch.ones_like(w)})
    assert report.source_format == "torchvision detection"
    assert report.loaded == ["backbone.bottom_up.stem.conv1.weight"]
    assert torch.all(det.backbone.bottom_up.stem.conv1.weight == 1)


def test_training_checkpoint_with_ema_loads_the_ema_weights(tmp_path: Path) -> None:
    src = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    raw = {k: v.clone() for k, v in src.state_dict().items()}
    ema = {k: (v + 1.0 if v.is_floating_point() else v.clone()) for k, v in raw.items()}
    path = save_checkpoint({"model": raw, "optimizer": {}, "iteration": 5, "config": {},
                            "ema": {"model": ema, "updates": 5, "decay": 0.99}}, tmp_path / "best.pth")
    dst = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    report = load_weights(dst, path)
    assert report.weights == "ema" and report.source_format == "detkit (training checkpoint, EMA weights)"
    assert "EMA weights" in report.summary()
    assert torch.equal(dst[0].weight, ema["0.weight"]) and torch.equal(dst[1].running_var, ema["1.running_var"])
    assert report.fits and len(report.loaded) == len(raw)
    report = load_weights(dst, path, prefer_ema=False)  # the raw (last optimizer step) weights on request
    assert report.weights == "model" and report.source_format == "detkit (training checkpoint)"
    assert torch.equal(dst[0].weight, raw["0.weight"])
    # without EMA (ema: None, as saved by a run with train.ema=false) the model entry is used
    save_checkpoint({"model": raw, "ema": None, "iteration": 5}, tmp_path / "last.pth")
    assert load_weights(dst, tmp_path / "last.pth").weights == "model"


def test_compare_state_dict_and_problems_line() -> None:
    from detkit.checkpoint import compare_state_dict

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    sd = {k: torch.zeros(3, 2) if k.endswith("weight") else v for k, v in model.state_dict().items()}
    del sd["11.bias"]
    sd["extra.weight"] = torch.zeros(1)
    report = compare_state_dict(model, sd, "x.pth")
    assert not report.fits and report.source == "x.pth"
    assert len(report.mismatched) == 12 and report.missing == ["11.bias"] and report.unexpected == ["extra.weight"]
    assert len(report.loaded) == 11
    line = report.problems()
    assert "\n" not in line
    assert line.startswith("12 tensor(s) differ in shape: 0.weight (checkpoint (3, 2) vs model (2, 2)), ")
    assert "9.weight (checkpoint (3, 2) vs model (2, 2)), and 2 more;" in line and "10.weight" not in line
    assert "1 model tensor(s) missing from the checkpoint: 11.bias" in line
    assert "1 checkpoint tensor(s) unknown to the model: extra.weight" in line
    assert compare_state_dict(model, model.state_dict()).fits
    assert compare_state_dict(model, model.state_dict()).problems() == ""
