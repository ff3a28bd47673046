"""ResNet image classifier used for backbone pretraining."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbones.resnet import ResNet, build_resnet

__all__ = ["ResNetClassifier", "build_classifier"]


class ResNetClassifier(nn.Module):
    """ResNet body, global average pooling and a linear layer ``fc``.

    Args:
        backbone: a :class:`ResNet` whose ``out_features`` include ``"res5"``.
        num_classes: number of output logits.
    """

    def __init__(self, backbone: ResNet, num_classes: int) -> None:
        super().__init__()
        if "res5" not in backbone.output_specs:
            raise ValueError("ResNetClassifier needs a backbone with 'res5' in out_features")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.fc = nn.Linear(backbone.output_specs["res5"].channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: [N, 3, H, W] normalized images -> logits [N, num_classes]."""
        feat = self.backbone(x)["res5"]
        # (N, C, h, w) -> (N, C)
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(feat, 1), 1)
        return self.fc(pooled)


def build_classifier(
    arch: str, num_classes: int, norm: str = "BN", zero_init_residual: bool = False
) -> ResNetClassifier:
    """Build a trainable classifier (nothing frozen) on ``build_resnet(arch)``.

    Its state dict keys are ``backbone.*`` (the ResNet) and ``fc.*``, so its
    checkpoints initialize detector backbones through :func:`detkit.load_weights`.
    """
    backbone = build_resnet(
        arch,
        norm=norm,
        freeze_at=0,
        zero_init_residual=zero_init_residual,
        out_features=("res5",),
    )
    return ResNetClassifier(backbone, num_classes)
