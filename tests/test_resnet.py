"""ResNet family: parity with torchvision, output specs, init options and freezing."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from detkit import load_weights
from detkit.layers import FrozenBatchNorm2d
from detkit.models import build_classifier
from detkit.models.backbones.resnet import ARCHS, Bottleneck, build_resnet

ALL_ARCHS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running stats and affine params so BN handling is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.6 + 0.3)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_arch_table_is_complete() -> None:
    assert sorted(ARCHS) == sorted(ALL_ARCHS)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_classifier_logits_match_torchvision(arch: str) -> None:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)
    _randomize_bn(tv)
    tv.eval()
    with torch.device("meta"):  # skip our random init: every tensor is loaded below
        ours = build_classifier(arch, 1000)
    ours = ours.to_empty(device="cpu").eval()
    report = load_weights(ours, tv.state_dict())
    assert report.source_format == "torchvision classification"
    assert report.missing == [] and report.mismatched == [] and report.dropped == []
    assert report.unexpected == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, out = tv(x), ours(x)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    assert _rel_diff(out, ref) <= 1e-4


def test_frozen_bn_backbone_matches_torchvision_features() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None)
    _randomize_bn(tv)
    tv.eval()
    body = create_feature_extractor(tv, {f"layer{i}": f"res{i + 1}" for i in range(1, 5)})
    ours = build_resnet("resnet50", norm="FrozenBN", freeze_at=2)
    report = load_weights(ours, tv.state_dict())
    assert report.dropped == ["fc.weight", "fc.bias"] and report.missing == []
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, out = body(x), ours(x)
    for k in ("res2", "res3", "res4", "res5"):
        assert _rel_diff(out[k], ref[k]) <= 1e-4, k


@pytest.mark.parametrize(
    "arch,channels", [("resnet18", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))]
)
def test_output_specs_and_shapes(arch: str, channels: tuple[int, ...]) -> None:
    model = build_resnet(arch, norm="FrozenBN", freeze_at=0)
    names = ["res2", "res3", "res4", "res5"]
    assert list(model.output_specs) == names
    assert [s.channels for s in model.output_specs.values()] == list(channels)
    assert [s.stride for s in model.output_specs.values()] == [4, 8, 16, 32]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert list(out) == names
    for k, spec in model.output_specs.items():
        assert out[k].shape == (1, spec.channels, 64 // spec.stride, 96 // spec.stride)


def test_stride_in_1x1_variant() -> None:
    default = build_resnet("resnet50", freeze_at=0)
    assert default.res3[0].conv1.stride == (1, 1) and default.res3[0].conv2.stride == (2, 2)
    msra = build_resnet("resnet50", freeze_at=0, stride_in_1x1=True)
    assert msra.res3[0].conv1.stride == (2, 2) and msra.res3[0].conv2.stride == (1, 1)
    assert msra.res2[0].conv1.stride == (1, 1)  # res2 keeps stride 1
    with torch.no_grad():
        out = msra(torch.randn(1, 3, 64, 64))
    for k, spec in msra.output_specs.items():
        assert out[k].shape == (1, spec.channels, 64 // spec.stride, 64 // spec.stride)


def test_projection_shortcuts_where_shape_changes() -> None:
    model = build_resnet("resnet18", freeze_at=0)
    assert model.res2[0].shortcut is None  # 64 -> 64, stride 1
    assert model.res3[0].shortcut is not None and model.res3[1].shortcut is None
    big = build_resnet("resnet50", freeze_at=0)
    assert big.res2[0].shortcut is not None  # 64 -> 256
    assert big.res5[0].shortcut.conv.stride == (2, 2)


def test_resnext_and_wide_widths() -> None:
    x101 = build_resnet("resnext101_32x8d", freeze_at=0, out_features=("res2",))
    assert x101.res2[0].conv2.groups == 32 and x101.res2[0].conv2.out_channels == 256
    wide = build_resnet("wide_resnet50_2", freeze_at=0, out_features=("res2",))
    assert wide.res2[0].conv2.out_channels == 128 and wide.res2[0].conv3.out_channels == 256


def test_unknown_name_and_bad_out_features() -> None:
    with pytest.raises(ValueError, match="resnext101_32x8d"):
        build_resnet("resnet51")
    with pytest.raises(ValueError, match="res2"):
        build_resnet("resnet18", out_features=("p3",))


def test_out_features_subset_builds_only_needed_stages() -> None:
    model = build_resnet("resnet18", freeze_at=0, out_features=("res3",))
    assert not hasattr(model, "res4") and not hasattr(model, "res5")
    out = model(torch.randn(1, 3, 32, 32))
    assert list(out) == ["res3"] and out["res3"].shape == (1, 128, 4, 4)


def test_init_and_zero_init_residual() -> None:
    torch.manual_seed(0)
    model = build_resnet("resnet50", norm="BN", freeze_at=0, zero_init_residual=True)
    blocks = [b for s in ("res2", "res3", "res4", "res5") for b in getattr(model, s)]
    assert all(isinstance(b, Bottleneck) for b in blocks)
    assert all(torch.all(b.bn3.weight == 0) for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for b in blocks)
    conv = model.res4[0].conv2  # kaiming normal, fan_out: std = sqrt(2 / (out * k * k))
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    plain = build_resnet("resnet18", norm="GN", freeze_at=0)
    assert all(torch.all(b.bn2.weight == 1) for b in plain.res2)
    zero18 = build_resnet("resnet18", norm="GN", freeze_at=0, zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in zero18.res2)


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def test_freeze_at_really_freezes() -> None:
    torch.manual_seed(0)
    model = build_resnet("resnet18", norm="BN", freeze_at=2)
    # frozen part: stem + res2, with FrozenBatchNorm2d; res3.. keep trainable BN
    for name in ("stem", "res2"):
        part = getattr(model, name)
        assert all(not p.requires_grad for p in part.parameters())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in part.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in part.modules())
    assert all(p.requires_grad for p in model.res3.parameters())
    assert isinstance(model.res3[0].bn1, nn.BatchNorm2d)

    frozen_before = {**{f"stem.{k}": v.clone() for k, v in model.stem.state_dict().items()},
                     **{f"res2.{k}": v.clone() for k, v in model.res2.state_dict().items()}}
    res3_stats = _bn_stats(model.res3)
    res3_w = model.res3[0].conv1.weight.detach().clone()

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    opt.step()

    after = {**{f"stem.{k}": v for k, v in model.stem.state_dict().items()},
             **{f"res2.{k}": v for k, v in model.res2.state_dict().items()}}
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), f"frozen {k} changed"
    assert not torch.equal(model.res3[0].conv1.weight, res3_w)
    new_stats = _bn_stats(model.res3)
    assert any(not torch.equal(new_stats[k], v) for k, v in res3_stats.items())


@pytest.mark.parametrize("freeze_at,frozen", [(0, []), (1, ["stem"]),
                                              (5, ["stem", "res2", "res3", "res4", "res5"])])
def test_freeze_at_levels(freeze_at: int, frozen: list[str]) -> None:
    model = build_resnet("resnet18", norm="BN", freeze_at=freeze_at)
    for name in ("stem", "res2", "res3", "res4", "res5"):
        grads = {p.requires_grad for p in getattr(model, name).parameters()}
        assert grads == ({False} if name in frozen else {True}), name
    with pytest.raises(ValueError, match="freeze_at"):
        build_resnet("resnet18", freeze_at=6)
