"""Feature Pyramid Network: res2..res5 -> p2..p6 (or p7), and the backbone+FPN wrapper."""

from __future__ import annotations

import math
from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import ConvNormAct
from ...structures import FeatureSpec

__all__ = ["FPN", "LastLevelMaxPool", "LastLevelP6P7", "BackboneWithFPN"]


def _level(stride: int, name: str) -> int:
    level = int(round(math.log2(stride)))
    if 2**level != stride:
        raise ValueError(f"FPN input {name!r} has stride {stride}, which is not a power of 2")
    return level


class LastLevelMaxPool(nn.Module):
    """Extra level from the coarsest FPN output: ``max_pool2d(kernel 1, stride 2)``."""

    num_levels = 1
    in_feature = "p"

    def forward(self, top_p: Tensor) -> list[Tensor]:
        return [F.max_pool2d(top_p, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    """RetinaNet extra levels: ``p6 = conv3x3/2(x)``, ``p7 = conv3x3/2(relu(p6))``.

    ``x`` is the coarsest FPN output (``in_feature="p"``) or the coarsest backbone
    feature (``in_feature="res"``).
    """

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "p") -> None:
        super().__init__()
        if in_feature not in ("p", "res"):
            raise ValueError(f"LastLevelP6P7 in_feature must be 'p' or 'res', got {in_feature!r}")
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        p6 = self.p6(x)
        p7 = self.p7(F.relu(p6))
        return [p6, p7]


class FPN(nn.Module):
    """Top-down feature pyramid with lateral 1x1 and output 3x3 convs.

    Args:
        in_specs: backbone features to use, e.g. ``{"res2": FeatureSpec(256, 4), ...}``;
            each output is named ``p{log2(stride)}``.
        out_channels: channels of every pyramid level.
        norm: norm for lateral and output convs (``""`` for none; convs then have a bias).
        top_block: ``"maxpool"`` adds one level by stride-2 subsampling of the coarsest
            output (torchvision's LastLevelMaxPool); ``"p6p7"`` adds two conv levels
            (RetinaNet); ``"none"`` adds nothing.
        top_block_in: for ``"p6p7"``, take the input from the coarsest FPN output
            (``"p"``, e.g. p5) or from the coarsest backbone feature (``"res"``, e.g. res5).

    Submodules: ``lateral_convs.{i}``, ``output_convs.{i}`` (i follows ``in_specs``
    sorted by stride) and ``top_block`` (absent for ``"none"``).
    """

    def __init__(
        self,
        in_specs: Mapping[str, FeatureSpec],
        out_channels: int = 256,
        norm: str = "",
        top_block: str = "maxpool",
        top_block_in: str = "p",
    ) -> None:
        super().__init__()
        if not in_specs:
            raise ValueError("FPN needs at least one input feature")
        self.in_features: list[str] = sorted(in_specs, key=lambda k: in_specs[k].stride)
        strides = [in_specs[k].stride for k in self.in_features]
        levels = [_level(s, k) for s, k in zip(strides, self.in_features)]
        for a, b in zip(levels, levels[1:]):
            if b != a + 1:
                raise ValueError(f"FPN inputs must have consecutive strides, got {strides}")
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for k in self.in_features:
            lat = ConvNormAct(in_specs[k].channels, out_channels, 1, padding=0, norm=norm,
                              activation=False)
            out = ConvNormAct(out_channels, out_channels, 3, padding=1, norm=norm,
                              activation=False)
            for conv in (lat.conv, out.conv):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
            self.lateral_convs.append(lat)
            self.output_convs.append(out)

        self.top_block: nn.Module | None
        if top_block == "maxpool":
            self.top_block = LastLevelMaxPool()
        elif top_block == "p6p7":
            top_in = in_specs[self.in_features[-1]].channels if top_block_in == "res" else out_channels
            self.top_block = LastLevelP6P7(top_in, out_channels, in_feature=top_block_in)
        elif top_block == "none":
            self.top_block = None
        else:
            raise ValueError(f"unknown FPN top_block {top_block!r}; valid: 'maxpool', 'p6p7', 'none'")

        self.output_specs: dict[str, FeatureSpec] = {}
        for lvl in levels:
            self.output_specs[f"p{lvl}"] = FeatureSpec(out_channels, 2**lvl)
        extra = 0 if self.top_block is None else self.top_block.num_levels
        for lvl in range(levels[-1] + 1, levels[-1] + 1 + extra):
            self.output_specs[f"p{lvl}"] = FeatureSpec(out_channels, 2**lvl)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{res_k: [N, C_k, H_k, W_k]}`` -> ``{p_k: [N, out_channels, H_k, W_k]}`` plus extras."""
        missing = [k for k in self.in_features if k not in features]
        if missing:
            raise KeyError(f"FPN input is missing features {missing}; got {list(features)}")
        xs = [features[k] for k in self.in_features]
        last_inner = self.lateral_convs[-1](xs[-1])
        outs = [self.output_convs[-1](last_inner)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.lateral_convs[i](xs[i])
            # nearest upsample of the coarser level to this lateral's exact size (2x, odd sizes ok)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            outs.insert(0, self.output_convs[i](last_inner))
        if self.top_block is not None:
            src = xs[-1] if self.top_block.in_feature == "res" else outs[-1]
            outs.extend(self.top_block(src))
        return dict(zip(self.output_specs, outs))


class BackboneWithFPN(nn.Module):
    """A bottom-up backbone (returning res*) followed by an :class:`FPN` (returning p*)."""

    def __init__(self, bottom_up: nn.Module, fpn: FPN) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        self.fpn = fpn
        self.output_specs: dict[str, FeatureSpec] = dict(fpn.output_specs)

    @property
    def size_divisibility(self) -> int:
        """Largest output stride: padded input sizes should be a multiple of it."""
        return max(s.stride for s in self.output_specs.values())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: [N, 3, H, W] -> ``{p_k: [N, C, H / 2^k, W / 2^k]}``."""
        return self.fpn(self.bottom_up(x))
