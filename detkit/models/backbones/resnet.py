"""ResNet / ResNeXt / Wide ResNet backbones with named stage outputs res2..res5.

Module names follow the torchvision layout with Detectron2 stage names:
``stem.conv1``, ``stem.bn1``, ``res{2..5}.{i}.conv{1,2,3}``, ``res{2..5}.{i}.bn{1,2,3}`` and
``res{2..5}.{i}.shortcut.{conv,norm}`` for projection shortcuts (torchvision's
``downsample.{0,1}``). :func:`detkit.checkpoint.torchvision.convert_torchvision_resnet` maps
torchvision keys.

Shortcut options of the ResNet paper (He et al. 2015, Table 3), ``shortcut=`` on blocks and
networks:

* ``"A"``: identity everywhere; where the shape changes the identity is subsampled with the
  stride and zero-padded with the extra channels (:class:`PadShortcut`, no parameters).
* ``"B"`` (default, torchvision's ImageNet models): a 1x1 projection + norm where the shape
  changes, identity elsewhere.
* ``"C"``: a projection on every block. The blocks where B has an identity get theirs as
  ``res{k}.{i}.proj_shortcut.{conv,norm}``, so no B key changes meaning.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers import ConvNormAct, FrozenBatchNorm2d, get_norm
from ...structures import FeatureSpec

__all__ = [
    "SHORTCUTS",
    "PadShortcut",
    "BasicBlock",
    "Bottleneck",
    "Stem",
    "ResNet",
    "ARCHS",
    "STAGE_NAMES",
    "build_resnet",
]

STAGE_NAMES: tuple[str, ...] = ("res2", "res3", "res4", "res5")
SHORTCUTS: tuple[str, ...] = ("A", "B", "C")
ShortcutOption = Literal["A", "B", "C"]


class PadShortcut(nn.Module):
    """Option-A shortcut: identity subsampled by ``stride``, then zero-padded from ``in_ch`` to ``out_ch``
    channels (the new channels come last and are exactly zero). No parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"PadShortcut cannot reduce channels ({in_ch} -> {out_ch}); use a projection (B or C)")
        self.in_channels, self.out_channels, self.stride = in_ch, out_ch, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s))
        if self.out_channels > self.in_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))  # (N, C, ..) -> (N, C', ..)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _shortcuts(option: str, in_ch: int, out_ch: int, stride: int, norm: str) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """``(shortcut, proj_shortcut)`` of a block for shortcut ``option`` (at most one is not None)."""
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {option!r}; use 'A' (zero-padded identity), "
                         "'B' (projection where the shape changes) or 'C' (projection everywhere)")
    changes = stride != 1 or in_ch != out_ch
    if option == "A":
        return (PadShortcut(in_ch, out_ch, stride) if changes else None), None
    if not changes and option == "B":
        return None, None
    proj = ConvNormAct(in_ch, out_ch, 1, stride=stride, padding=0, norm=norm, activation=False)
    return (proj, None) if changes else (None, proj)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34). Expansion 1."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        shortcut: ShortcutOption = "B",
    ) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = get_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, out_ch, 3, padding=1, bias=False)
        self.bn2 = get_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut, self.proj_shortcut = _shortcuts(shortcut, in_ch, out_ch, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        """The norm at the end of the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    @property
    def skip(self) -> Optional[nn.Module]:
        """The module on the shortcut path (None: identity)."""
        return self.shortcut if self.shortcut is not None else self.proj_shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.skip
        identity = x if skip is None else skip(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped), 1x1 expand, with a residual connection. Expansion 4.

    The 3x3 has ``groups * int(planes * width_per_group / 64)`` channels (ResNeXt/Wide).
    ``stride_in_1x1`` puts the stride on the first 1x1 (MSRA/Caffe2 weights) instead of
    the 3x3 (torchvision, "ResNet v1.5").
    """

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        shortcut: ShortcutOption = "B",
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out_ch = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = get_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, groups=groups,
                               bias=False)
        self.bn2 = get_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = get_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut, self.proj_shortcut = _shortcuts(shortcut, in_ch, out_ch, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        """The norm at the end of the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    @property
    def skip(self) -> Optional[nn.Module]:
        """The module on the shortcut path (None: identity)."""
        return self.shortcut if self.shortcut is not None else self.proj_shortcut

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = self.skip
        identity = x if skip is None else skip(x)
        return self.relu(out + identity)


class Stem(nn.Module):
    """7x7/2 conv (64 channels), norm, ReLU, 3x3/2 max pool: stride 4."""

    def __init__(self, in_ch: int = 3, out_ch: int = 64, norm: str = "BN") -> None:
        super().__init__()
        self.out_channels = out_ch
        self.conv1 = nn.Conv2d(in_ch, out_ch, 7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


Block = Union[type[BasicBlock], type[Bottleneck]]

# name -> (block, blocks per stage, groups, width_per_group)
ARCHS: dict[str, tuple[Block, tuple[int, int, int, int], int, int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": (Bottleneck, (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
}


class ResNet(nn.Module):
    """ResNet body returning a dict of the requested stage outputs.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in res2..res5.
        groups, width_per_group: ResNeXt cardinality and per-group width (Wide: 128).
        norm: norm name for every layer (see :func:`detkit.layers.get_norm`).
        stride_in_1x1: put the stage stride on the first 1x1 of bottlenecks.
        zero_init_residual: zero the last norm's weight of each residual branch.
        out_features: which of res2..res5 ``forward`` returns; stages after the
            last requested one are not built.
        freeze_at: see :meth:`freeze`.
        shortcut: the paper's shortcut option, ``"A"``, ``"B"`` (default) or ``"C"`` (module docstring).

    Attributes:
        output_specs: ``{name: FeatureSpec(channels, stride)}`` for ``out_features``.
        shortcut_option: the ``shortcut`` it was built with.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        groups: int = 1,
        width_per_group: int = 64,
        norm: str = "BN",
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        out_features: Sequence[str] = STAGE_NAMES,
        freeze_at: int = 0,
        shortcut: ShortcutOption = "B",
    ) -> None:
        super().__init__()
        out_features = tuple(out_features)
        bad = [f for f in out_features if f not in STAGE_NAMES]
        if bad or not out_features:
            raise ValueError(f"ResNet out_features {list(out_features)} invalid; choose from "
                             f"{list(STAGE_NAMES)}")
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {list(layers)}")
        self.out_features = out_features
        self.shortcut_option = shortcut
        self.stem = Stem(3, 64, norm)
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        self.stage_names: tuple[str, ...] = STAGE_NAMES[:num_stages]

        specs: dict[str, FeatureSpec] = {}
        in_ch, stride = self.stem.out_channels, 4
        for i, name in enumerate(self.stage_names):
            planes = 64 * 2**i
            first_stride = 1 if i == 0 else 2
            blocks = []
            for j in range(layers[i]):
                blocks.append(block(in_ch, planes, first_stride if j == 0 else 1, groups,
                                    width_per_group, norm, stride_in_1x1, shortcut))
                in_ch = planes * block.expansion
            stride *= first_stride
            self.add_module(name, nn.Sequential(*blocks))
            specs[name] = FeatureSpec(channels=in_ch, stride=stride)
        self.output_specs: dict[str, FeatureSpec] = {k: specs[k] for k in out_features}
        init_resnet_weights(self, zero_init_residual)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> "ResNet":
        """Freeze the first ``freeze_at`` parts of the backbone, numbered as Detectron2's FREEZE_AT.

        ``0`` freezes nothing, ``1`` the stem, ``k >= 2`` the stem and res2..res{k} (so ``2``,
        the build_resnet/config default, freezes stem + res2; ``5`` the whole body).

        Frozen parameters get ``requires_grad = False`` and their BatchNorms are replaced by
        :class:`FrozenBatchNorm2d`, so ``train()`` cannot change their statistics.
        Returns ``self``.
        """
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}")
        frozen = ["stem"] + list(STAGE_NAMES)
        for name in frozen[:freeze_at]:
            if not hasattr(self, name):
                continue
            module = getattr(self, name)
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, name, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: [N, 3, H, W] -> ``{name: [N, C, H / stride, W / stride]}`` for out_features."""
        if x.dim() != 4:
            raise ValueError(f"ResNet expects a [N, C, H, W] tensor, got shape {tuple(x.shape)}")
        outputs: dict[str, Tensor] = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.output_specs:
                outputs[name] = x
        return outputs


def init_resnet_weights(net: nn.Module, zero_init_residual: bool) -> None:
    """Kaiming normal (fan_out, ReLU) convs, unit/zero norms; optionally zero each block's last norm."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in net.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                norm = m.last_norm
                if isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, FrozenBatchNorm2d)):
                    with torch.no_grad():
                        norm.weight.zero_()


def build_resnet(
    name: str,
    norm: str = "FrozenBN",
    freeze_at: int = 2,
    stride_in_1x1: bool = False,
    zero_init_residual: bool = False,
    out_features: Sequence[str] = STAGE_NAMES,
    shortcut: ShortcutOption = "B",
) -> ResNet:
    """Build a named ResNet variant (torchvision names, e.g. ``resnet50``, ``resnext101_32x8d``).

    ``freeze_at`` follows Detectron2's FREEZE_AT numbering: 0 freezes nothing, 1 the stem,
    k >= 2 the stem and res2..res{k} (default 2: stem + res2); see :meth:`ResNet.freeze`.
    ``shortcut`` is the paper's option A, B (default; torchvision's weights need it) or C.
    Raises ValueError for an unknown name.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown ResNet architecture {name!r}; valid names are {list(ARCHS)}")
    block, layers, groups, width = ARCHS[name]
    return ResNet(
        block,
        layers,
        groups=groups,
        width_per_group=width,
        norm=norm,
        stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
        out_features=out_features,
        freeze_at=freeze_at,
        shortcut=shortcut,
    )
