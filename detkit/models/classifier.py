"""ResNet image classifiers: the ImageNet family (backbone pretraining) and the paper's CIFAR ResNets."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .backbones.cifar_resnet import CIFAR_DEPTHS, CifarResNet, build_cifar_resnet
from .backbones.resnet import ARCHS, ResNet, build_resnet

__all__ = ["CIFAR_ARCHS", "CLASSIFIER_ARCHS", "ResNetClassifier", "build_classifier"]

CIFAR_ARCHS: tuple[str, ...] = tuple(f"cifar_resnet{d}" for d in CIFAR_DEPTHS)
CLASSIFIER_ARCHS: tuple[str, ...] = tuple(ARCHS) + CIFAR_ARCHS


class ResNetClassifier(nn.Module):
    """ResNet body, global average pooling of its last stage and a linear layer ``fc``.

    Args:
        backbone: a :class:`ResNet` whose ``out_features`` include ``"res5"``, or a :class:`CifarResNet`
            (last stage ``"res4"``).
        num_classes: number of output logits.
    """

    def __init__(self, backbone: Union[ResNet, CifarResNet], num_classes: int) -> None:
        super().__init__()
        self.feature = "res4" if isinstance(backbone, CifarResNet) else "res5"
        if self.feature not in backbone.output_specs:
            raise ValueError(f"ResNetClassifier needs a backbone with {self.feature!r} in out_features")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.fc = nn.Linear(backbone.output_specs[self.feature].channels, num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.fc.out_features)

    def class_layers(self) -> tuple[str, ...]:
        """Submodules whose shapes depend on the number of classes (see :func:`detkit.checkpoint.check_fit`)."""
        return ("fc",)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: [N, 3, H, W] normalized images -> logits [N, num_classes]."""
        feat = self.backbone(x)[self.feature]
        # (N, C, h, w) -> (N, C)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(feat, 1), 1)
        return self.fc(pooled)


def build_classifier(
    arch: str, num_classes: int, norm: str = "BN", zero_init_residual: bool = False, shortcut: Optional[str] = None
) -> ResNetClassifier:
    """Build a trainable classifier (nothing frozen).

    ``arch`` is an ImageNet ResNet name (``resnet18`` ... ``wide_resnet101_2``, on :func:`build_resnet`) or a
    CIFAR ResNet of the paper, ``cifar_resnet{20,32,44,56,110,1202}``. ``shortcut`` is the paper's option
    ``"A"``, ``"B"`` or ``"C"``; None takes the network's own: B for the ImageNet ResNets (torchvision's, which
    its weights need), A for the CIFAR ones. The state dict keys are ``backbone.*`` and ``fc.*``, so an
    ImageNet classifier's checkpoints initialize detector backbones through :func:`detkit.load_weights`.
    """
    if arch in CIFAR_ARCHS:
        backbone: Union[ResNet, CifarResNet] = build_cifar_resnet(
            int(arch[len("cifar_resnet"):]), norm=norm, shortcut=shortcut or "A", zero_init_residual=zero_init_residual
        )
    elif arch in ARCHS:
        backbone = build_resnet(arch, norm=norm, freeze_at=0, zero_init_residual=zero_init_residual,
                                out_features=("res5",), shortcut=shortcut or "B")
    else:
        raise ValueError(f"unknown classifier architecture {arch!r}; valid names are {list(CLASSIFIER_ARCHS)}")
    return ResNetClassifier(backbone, num_classes)
