"""detkit.layers: norm factory, FrozenBatchNorm2d, ConvNormAct, fold_frozen_bn."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

from detkit.layers import ConvNormAct, FrozenBatchNorm2d, fold_frozen_bn, get_norm
from detkit.models.backbones.resnet import build_resnet


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)


@pytest.mark.parametrize(
    "name,cls", [("", nn.Identity), ("BN", nn.BatchNorm2d), ("FrozenBN", FrozenBatchNorm2d),
                 ("GN", nn.GroupNorm), ("SyncBN", nn.SyncBatchNorm)]
)
def test_get_norm_types(name: str, cls: type) -> None:
    norm = get_norm(name, 64)
    assert type(norm) is cls
    if name == "GN":
        assert norm.num_groups == 32 and norm.num_channels == 64


def test_get_norm_errors() -> None:
    with pytest.raises(ValueError, match="FrozenBN"):
        get_norm("LayerNorm", 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        get_norm("GN", 48)


def test_frozen_bn_matches_torchvision_and_eval_bn() -> None:
    bn = nn.BatchNorm2d(16)
    _randomize_bn(bn)
    bn.eval()
    ours, tv = FrozenBatchNorm2d(16), TVFrozenBN(16)
    ours.load_state_dict(bn.state_dict())  # carries num_batches_tracked: must be accepted
    tv.load_state_dict(bn.state_dict())
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-5, atol=1e-5)
    assert ours.eps == 1e-5 and list(ours.parameters()) == []
    assert set(ours.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    before = ours(x)
    ours.train()
    torch.testing.assert_close(ours(x), before, rtol=0, atol=0)
    assert ours(x.bfloat16()).dtype == torch.bfloat16


def test_convert_frozen_batchnorm_recursive() -> None:
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.Sequential(nn.BatchNorm2d(32)))
    _randomize_bn(model)
    model.eval()
    x = torch.randn(1, 3, 9, 9)
    ref = model(x)
    out = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    assert out is model
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[2][0], FrozenBatchNorm2d)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    top = FrozenBatchNorm2d.convert_frozen_batchnorm(nn.BatchNorm2d(8))
    assert isinstance(top, FrozenBatchNorm2d)


def test_conv_norm_act() -> None:
    plain = ConvNormAct(8, 16, 3)
    assert plain.conv.bias is not None and isinstance(plain.norm, nn.Identity)
    assert plain.conv.padding == (1, 1)
    normed = ConvNormAct(8, 64, 3, stride=2, dilation=2, norm="GN", activation=False)
    assert normed.conv.bias is None and isinstance(normed.norm, nn.GroupNorm)
    assert normed.conv.padding == (2, 2)
    x = torch.randn(1, 8, 10, 10)
    assert plain(x).shape == (1, 16, 10, 10) and (plain(x) >= 0).all()
    y = normed(x)
    assert y.shape == (1, 64, 5, 5) and (y < 0).any()  # no ReLU


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_fold_frozen_bn_equal_outputs(norm: str) -> None:
    torch.manual_seed(0)
    model = build_resnet("resnet18", norm=norm, freeze_at=0)
    _randomize_bn(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fold_frozen_bn(model)
        out = model(x)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms == []  # stem, blocks and shortcut norms were all folded
    for k in ref:
        scale = ref[k].abs().max().clamp(min=1.0)
        assert ((out[k] - ref[k]).abs().max() / scale).item() <= 1e-5, k


def test_fold_skips_training_bn_and_gn() -> None:
    block = nn.Sequential()
    block.add_module("a", ConvNormAct(4, 32, 3, norm="BN"))
    block.add_module("b", ConvNormAct(32, 32, 3, norm="GN"))
    block.train()
    fold_frozen_bn(block)
    assert isinstance(block.a.norm, nn.BatchNorm2d) and isinstance(block.b.norm, nn.GroupNorm)
    block.eval()
    fold_frozen_bn(block)
    assert isinstance(block.a.norm, nn.Identity) and isinstance(block.b.norm, nn.GroupNorm)


def test_fp32_forward_runs_fp32_under_bf16_autocast_only() -> None:
    """The heads' last layers: fp32 under bf16 autocast (8 significant bits); fp16 autocast (the references'
    AMP) and no autocast run the layer as it is."""
    from detkit.layers import fp32_forward

    torch.manual_seed(0)
    layer, x = nn.Linear(8, 3), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        out = fp32_forward(layer, x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layer(x.bfloat16().float()))  # the bf16 input, exactly, through fp32 weights
    with torch.autocast("cpu", dtype=torch.float16):
        assert fp32_forward(layer, x).dtype == torch.float16
    assert fp32_forward(layer, x).dtype == torch.float32
    assert fp32_forward(layer.to("meta"), x.to("meta")).device.type == "meta"  # no autocast on meta: plain call
