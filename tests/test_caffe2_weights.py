"""Detectron2's MSRA / Caffe2 ImageNet ResNets (``{"blobs": ...}`` pickles), and the input-convention checks.

The Caffe2 file is written by the test from a torchvision ResNet-50 with random weights, with Caffe2's
blob names (spelled out here, independently of detkit.checkpoint.caffe2); the reference is that torchvision
network run in the same test.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import detkit
from detkit.checkpoint import CheckpointError, load_initial_weights
from detkit.checkpoint.hub import cached_path, parse_weights_name
from detkit.config import load_config
from detkit.models import build_detector
from detkit.models.backbones.resnet import build_resnet

REPO = Path(__file__).resolve().parents[1]
D2_MASK = REPO / "configs" / "detectron2" / "mask_rcnn_R_50_FPN_3x.yaml"
COCO_MASK = REPO / "configs" / "coco" / "mask_rcnn_R_50_FPN_1x.yaml"
MSRA_NAME = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"


def _c2_name(tv_key: str) -> str:
    """torchvision ResNet key -> Caffe2 blob name (Detectron's ImageNet models)."""
    parts = tv_key.split(".")
    leaf = {"weight": "w", "bias": "b"}
    if parts[0] == "conv1":
        return "conv1_w"
    if parts[0] == "bn1":
        return f"res_conv1_bn_{'s' if parts[1] == 'weight' else 'b'}"
    if parts[0] == "fc":
        return f"fc1000_{leaf[parts[1]]}"
    stage, block, module = int(parts[0][-1]) + 1, parts[1], parts[2]  # layer1.0.conv1.weight
    if module == "downsample":
        branch, is_norm = "branch1", parts[3] == "1"
    else:
        branch, is_norm = "branch2" + "abc"[int(module[-1]) - 1], module.startswith("bn")
    prefix = f"res{stage}_{block}_{branch}"
    return f"{prefix}_bn_{'s' if parts[-1] == 'weight' else 'b'}" if is_norm else f"{prefix}_w"


@pytest.fixture(scope="module")
def msra_file(tmp_path_factory) -> tuple[Path, torchvision.models.ResNet]:
    """A Caffe2 blobs file of a random ResNet-50 whose norms are pure affines (running mean 0, var 1), as
    Detectron's folded BatchNorms are, plus the solver's momentum blobs; and that network."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    blobs: "OrderedDict[str, np.ndarray]" = OrderedDict()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    for k, v in net.state_dict().items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # Caffe2's AffineChannel: a scale and a shift only
        blobs[_c2_name(k)] = v.numpy().copy()
    blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])
    blobs["res2_0_branch2a_w_momentum"] = np.zeros_like(blobs["res2_0_branch2a_w"])
    path = tmp_path_factory.mktemp("c2") / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    return path, net.eval()


def _place_in_cache(name: str, src: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put ``src`` where ``name`` is cached, and go offline: the name resolves without any network."""
    monkeypatch.setenv("DETKIT_HOME", str(home))
    monkeypatch.setenv("DETKIT_OFFLINE", "1")
    dest = cached_path(parse_weights_name(name).url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(src.read_bytes())
    return dest


def test_caffe2_names_load_every_tensor_and_give_torchvisions_features(msra_file) -> None:
    path, net = msra_file
    model = build_resnet("resnet50", freeze_at=0, stride_in_1x1=False).eval()  # torchvision strides in the 3x3
    report = detkit.load_weights(model, path)
    assert report.source_format == "Caffe2 ImageNet ResNet"
    assert not (report.missing or report.unexpected or report.mismatched), report.summary()
    assert sorted(report.ignored) == ["conv1_w_momentum", "res2_0_branch2a_w_momentum"]  # named, not lost
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"]  # the classifier: no such module in a backbone
    assert torch.equal(model.res4[5].conv2.weight, net.layer3[5].conv2.weight)
    assert torch.equal(model.res3[0].shortcut.norm.weight, net.layer2[0].downsample[1].weight)
    assert torch.equal(model.stem.bn1.running_var, torch.ones(64))  # an affine: mean 0, var 1 as Detectron2
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = model(x)["res5"]
        ref = create_feature_extractor(net, {"layer4": "res5"})(x)["res5"]
    scale = ref.abs().max().item()  # 16 random blocks: large activations, float-rounding differences scale with them
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * scale, (err, scale)


def test_msra_name_loads_into_detectron2_configs(msra_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, net = msra_file
    _place_in_cache(MSRA_NAME, path, tmp_path, monkeypatch)
    cfg = load_config(D2_MASK, [f"model.backbone.weights={MSRA_NAME}"])
    model = build_detector(cfg, 80)
    (report,) = load_initial_weights(model, cfg, training=True)
    assert report.source_format == "Caffe2 ImageNet ResNet" and not report.missing
    assert torch.equal(model.backbone.bottom_up.res5[2].conv3.weight, net.layer4[2].conv3.weight)
    assert model.backbone.bottom_up.res3[0].conv1.stride == (2, 2)  # stride_in_1x1, as MSRA trained it


def _msra_refusal(msra_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path,
                  stride_in_1x1: bool) -> str:
    """The one-line refusal of the MSRA name as ``model.backbone.weights`` of ``config``."""
    _place_in_cache(MSRA_NAME, msra_file[0], tmp_path, monkeypatch)
    cfg = load_config(config, [f"model.backbone.weights={MSRA_NAME}",
                               f"model.backbone.stride_in_1x1={str(stride_in_1x1).lower()}"])
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(build_detector(cfg, 80), cfg, training=True)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_msra_weights_into_an_rgb_config_are_refused(msra_file, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _msra_refusal(msra_file, tmp_path, monkeypatch, COCO_MASK, stride_in_1x1=True)
    assert "\n" not in msg and "model.backbone.weights" in msg and MSRA_NAME in msg, msg
    for part in ("BGR, 0-255 minus mean [103.53, 116.28, 123.675] (std 1)", "RGB, mean [123.675, 116.28, 103.53]",
                 "model.input_format=BGR", "model.pixel_mean=[103.53,116.28,123.675]", "model.pixel_std=[1,1,1]"):
        assert part in msg, (part, msg)


def test_msra_weights_without_stride_in_1x1_are_refused(msra_file, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _msra_refusal(msra_file, tmp_path, monkeypatch, D2_MASK, stride_in_1x1=False)
    assert "model.backbone.stride_in_1x1=true" in msg and "\n" not in msg


def test_unknown_caffe2_blob_is_named(msra_file, tmp_path: Path) -> None:
    with open(msra_file[0], "rb") as f:
        data = pickle.load(f)
    data["blobs"]["res5_2_branch2c_extra_w"] = np.zeros(3, np.float32)
    path = tmp_path / "extra.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    cfg = load_config(D2_MASK, [f"model.backbone.weights={path}"])
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(build_detector(cfg, 80), cfg, training=True)
    assert "res5_2_branch2c_extra_w" in str(e.value)


# --------------------------------------------------------------------------- conventions stated by files
def test_torchvision_imagenet_weights_into_a_bgr_config_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    cfg = load_config(D2_MASK, [f"model.backbone.weights={path}", "model.backbone.stride_in_1x1=false"])
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(build_detector(cfg, 80), cfg, training=True)
    msg = str(e.value)
    assert "\n" not in msg and "torchvision's ImageNet normalization" in msg and "model.input_format=RGB" in msg, msg
    assert "model.pixel_std=[58.395,57.12,57.375]" in msg
    # the same file into an RGB config with torchvision's normalization loads
    ok = load_config(COCO_MASK, [f"model.backbone.weights={path}"])
    (report,) = load_initial_weights(build_detector(ok, 80), ok, training=True)
    assert report.input_convention is not None and report.input_convention.channels == "RGB"


def _zoo_file_with_settings(path: Path, mean: list[float], std: list[float]) -> Path:
    """A Detectron2 zoo file of a (random) Mask R-CNN R50-FPN that states its pixel_mean / pixel_std."""
    from test_detectron2_format import detectron2_r50_fpn_shapes, random_arrays, write_zoo_pkl

    arrays = random_arrays(detectron2_r50_fpn_shapes(mask=True))
    arrays["pixel_mean"] = np.asarray(mean, np.float32).reshape(3, 1, 1)
    arrays["pixel_std"] = np.asarray(std, np.float32).reshape(3, 1, 1)
    return write_zoo_pkl(path, arrays)


def test_detectron2_file_states_its_convention(tmp_path: Path) -> None:
    path = _zoo_file_with_settings(tmp_path / "model_final_x.pkl", [103.53, 116.28, 123.675], [1.0, 1.0, 1.0])
    d2 = load_config(D2_MASK)
    (report,) = load_initial_weights(build_detector(d2, 80), d2, weights=str(path), training=False)
    assert report.input_convention is not None and report.input_convention.channels == "BGR"
    rgb = load_config(COCO_MASK)
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(build_detector(rgb, 80), rgb, weights=str(path), training=False)
    msg = str(e.value)
    assert "--weights" in msg and "pixel_mean/pixel_std stored in" in msg and "model.input_format=BGR" in msg, msg
    # other means in the same order: named too (here the X-101 configs' std against std 1)
    x101 = load_config(D2_MASK, ["model.pixel_std=[57.375,57.12,58.395]"])
    with pytest.raises(CheckpointError) as e:
        load_initial_weights(build_detector(x101, 80), x101, weights=str(path), training=False)
    assert "model.pixel_std=[1,1,1]" in str(e.value)


def test_classifier_config_checks_input_mean(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    cfg = load_config(REPO / "configs" / "classification" / "resnet18_imagefolder.yaml",
                      [f"model.weights={path}", "input.mean=[0,0,0]", "model.num_classes=1000"])
    from detkit.models import build_classifier

    with pytest.raises(CheckpointError) as e:
        load_initial_weights(build_classifier(cfg.model.arch, 1000), cfg, training=True)
    assert "input.mean=[123.675,116.28,103.53]" in str(e.value)
