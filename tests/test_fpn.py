"""FPN: parity with torchvision.ops.FeaturePyramidNetwork, top blocks, norms, wrapper."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from detkit.models.backbones.resnet import build_resnet
from detkit.checkpoint.torchvision import convert_torchvision_fpn
from detkit.models.necks.fpn import FPN, BackboneWithFPN
from detkit.structures import FeatureSpec

CHANNELS = (64, 128, 256, 512)
SPECS = {f"res{i + 2}": FeatureSpec(c, 4 * 2**i) for i, c in enumerate(CHANNELS)}
# odd sizes: the top-down path must interpolate to the lateral's exact size
SIZES = [(33, 47), (17, 24), (9, 12), (5, 6)]


def _features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(1, c, *hw, generator=g) for (k, c), hw in
            zip(((k, s.channels) for k, s in SPECS.items()), SIZES)}


def _tv_forward(tv: nn.Module, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(tv(OrderedDict(feats)).values())


def test_fpn_matches_torchvision_maxpool() -> None:
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(list(CHANNELS), 64, extra_blocks=LastLevelMaxPool()).eval()
    with torch.no_grad():  # non-zero biases so they are checked too
        for name, p in tv.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    ours = FPN(SPECS, out_channels=64, norm="", top_block="maxpool").eval()
    ours.load_state_dict(convert_torchvision_fpn(tv.state_dict()), strict=True)
    feats = _features()
    ref = _tv_forward(tv, feats)
    with torch.no_grad():
        out = ours(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert len(ref) == 5
    for (k, o), r in zip(out.items(), ref):
        assert o.shape == r.shape, k
        assert (o - r).abs().max().item() <= 1e-5, k
    assert out["p6"].shape[-2:] == (3, 3)


def test_convert_handles_pre_013_keys() -> None:
    tv = FeaturePyramidNetwork(list(CHANNELS), 64)
    old = {k.replace(".0.", "."): v for k, v in tv.state_dict().items()}
    assert "inner_blocks.0.weight" in old
    ours = FPN(SPECS, out_channels=64, top_block="none")
    ours.load_state_dict(convert_torchvision_fpn(old), strict=True)
    assert torch.equal(ours.lateral_convs[0].conv.weight, tv.inner_blocks[0][0].weight)
    assert torch.equal(ours.output_convs[3].conv.bias, tv.layer_blocks[3][0].bias)


def test_fpn_with_bn_matches_torchvision() -> None:
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(list(CHANNELS), 64, norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    tv.eval()
    ours = FPN(SPECS, out_channels=64, norm="BN", top_block="none").eval()
    ours.load_state_dict(convert_torchvision_fpn(tv.state_dict()), strict=True)
    feats = _features(1)
    ref = _tv_forward(tv, feats)
    with torch.no_grad():
        out = list(ours(feats).values())
    for o, r in zip(out, ref, strict=True):
        assert (o - r).abs().max().item() <= 1e-5


@pytest.mark.parametrize("source", ["p", "res"])
def test_p6p7_matches_torchvision(source: str) -> None:
    torch.manual_seed(0)
    in_ch = 64 if source == "p" else CHANNELS[-1]  # torchvision uses p5 when in == out
    tv = FeaturePyramidNetwork(list(CHANNELS), 64, extra_blocks=LastLevelP6P7(in_ch, 64)).eval()
    ours = FPN(SPECS, out_channels=64, top_block="p6p7", top_block_in=source).eval()
    ours.load_state_dict(convert_torchvision_fpn(tv.state_dict()), strict=True)
    feats = _features(2)
    ref = _tv_forward(tv, feats)
    with torch.no_grad():
        out = ours(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    assert out["p6"].shape == (1, 64, 3, 3) and out["p7"].shape == (1, 64, 2, 2)
    for o, r in zip(out.values(), ref, strict=True):
        assert (o - r).abs().max().item() <= 1e-5
    assert ours.output_specs["p7"] == FeatureSpec(64, 128)


def test_p6p7_from_res3_to_res5_shapes() -> None:
    specs = {k: v for k, v in SPECS.items() if k != "res2"}  # RetinaNet style: p3..p7
    fpn = FPN(specs, out_channels=32, top_block="p6p7", top_block_in="res")
    feats = {k: v for k, v in _features().items() if k != "res2"}
    out = fpn(feats)
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in fpn.output_specs.values()] == [8, 16, 32, 64, 128]
    for k, v in out.items():
        assert v.shape[1] == 32, k
    assert fpn.top_block.p6.in_channels == CHANNELS[-1]


def test_gn_variant_runs_and_trains() -> None:
    fpn = FPN(SPECS, out_channels=64, norm="GN", top_block="maxpool")
    assert isinstance(fpn.lateral_convs[0].norm, nn.GroupNorm)
    assert fpn.lateral_convs[0].conv.bias is None and fpn.output_convs[0].conv.bias is None
    out = fpn(_features())
    sum(v.mean() for v in out.values()).backward()
    assert fpn.output_convs[0].norm.weight.grad is not None
    for k, spec in fpn.output_specs.items():
        assert out[k].shape[1] == spec.channels


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="top_block"):
        FPN(SPECS, top_block="p6")
    with pytest.raises(ValueError, match="consecutive"):
        FPN({"res2": FeatureSpec(64, 4), "res4": FeatureSpec(256, 16)})
    with pytest.raises(KeyError, match="res5"):
        FPN(SPECS, out_channels=16)({k: v for k, v in _features().items() if k != "res5"})


def test_backbone_with_fpn() -> None:
    bottom_up = build_resnet("resnet18", norm="FrozenBN", freeze_at=2)
    model = BackboneWithFPN(bottom_up, FPN(bottom_up.output_specs, out_channels=32))
    assert model.size_divisibility == 64
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        out = model(x)
    assert list(out) == list(model.output_specs) == ["p2", "p3", "p4", "p5", "p6"]
    for k, spec in model.output_specs.items():
        assert out[k].shape == (1, 32, 128 // spec.stride, 192 // spec.stride), k
    keys = set(model.state_dict())
    assert "bottom_up.stem.conv1.weight" in keys and "fpn.lateral_convs.3.conv.weight" in keys
