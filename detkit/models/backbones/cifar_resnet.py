"""The CIFAR-10 ResNets of the ResNet paper (He et al. 2015, Section 4.2): ResNet-20/32/44/56/110/1202.

A 3x3 stem with 16 channels, then three stages of ``n`` :class:`BasicBlock` each with 16, 32 and 64
channels (stride 1, 2, 2), so depth = 6n + 2; the classifier (:mod:`detkit.models.classifier`) adds
global average pooling and a linear layer. The paper's networks use option-A shortcuts (zero-padded
identity, no parameters), which give its parameter counts: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M and
19.4M for depths 20, 32, 44, 56, 110 and 1202.

Module names follow :class:`detkit.models.backbones.resnet.ResNet`: ``stem.conv1``, ``stem.bn1``,
``res{2,3,4}.{i}.conv{1,2}`` / ``bn{1,2}`` and, for options B and C, ``shortcut`` /
``proj_shortcut``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...layers import get_norm
from ...structures import FeatureSpec
from .resnet import BasicBlock, ShortcutOption, init_resnet_weights

__all__ = ["CIFAR_DEPTHS", "CifarStem", "CifarResNet", "build_cifar_resnet"]

CIFAR_DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110, 1202)
_WIDTHS = (16, 32, 64)
_STAGES = ("res2", "res3", "res4")


class CifarStem(nn.Module):
    """3x3 conv (16 channels), norm, ReLU: stride 1."""

    def __init__(self, in_ch: int = 3, out_ch: int = 16, norm: str = "BN") -> None:
        super().__init__()
        self.out_channels = out_ch
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn1 = get_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class CifarResNet(nn.Module):
    """Stem and three stages of ``(depth - 2) / 6`` BasicBlocks; ``forward`` returns ``{"res4": [N, 64, H/4, W/4]}``.

    Args:
        depth: 6n + 2 (the paper's are :data:`CIFAR_DEPTHS`).
        norm: norm name for every layer.
        shortcut: ``"A"`` (the paper's choice for these networks), ``"B"`` or ``"C"``.
        zero_init_residual: zero the last norm's weight of each residual branch.

    Attributes:
        output_specs: ``{"res4": FeatureSpec(64, 4)}``.
        shortcut_option: the ``shortcut`` it was built with.
    """

    def __init__(self, depth: int, norm: str = "BN", shortcut: ShortcutOption = "A",
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (e.g. {CIFAR_DEPTHS}), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.shortcut_option = shortcut
        self.stem = CifarStem(3, _WIDTHS[0], norm)
        in_ch, stride = _WIDTHS[0], 1
        for i, (name, width) in enumerate(zip(_STAGES, _WIDTHS)):
            first_stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, width, first_stride if j == 0 else 1, norm=norm, shortcut=shortcut))
                in_ch = width
            stride *= first_stride
            self.add_module(name, nn.Sequential(*blocks))
        self.stage_names = _STAGES
        self.output_specs: dict[str, FeatureSpec] = {"res4": FeatureSpec(channels=in_ch, stride=stride)}
        init_resnet_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: [N, 3, H, W] -> ``{"res4": [N, 64, H / 4, W / 4]}``."""
        if x.dim() != 4:
            raise ValueError(f"CifarResNet expects a [N, C, H, W] tensor, got shape {tuple(x.shape)}")
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return {"res4": x}


def build_cifar_resnet(depth: int, norm: str = "BN", shortcut: ShortcutOption = "A",
                       zero_init_residual: bool = False) -> CifarResNet:
    """The CIFAR ResNet of ``depth`` layers (see :class:`CifarResNet`)."""
    return CifarResNet(depth, norm=norm, shortcut=shortcut, zero_init_residual=zero_init_residual)
