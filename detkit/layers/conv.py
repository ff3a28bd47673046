"""Conv + norm + activation block, and folding of frozen norms into convolutions."""

from __future__ import annotations

import torch
from torch import nn

from .batch_norm import FrozenBatchNorm2d, get_norm

__all__ = ["ConvNormAct", "fold_frozen_bn"]


class ConvNormAct(nn.Module):
    """``Conv2d -> norm -> ReLU`` with named parts ``.conv``, ``.norm`` and ``.act``.

    Args:
        in_ch, out_ch, kernel_size, stride, dilation, groups: as in ``nn.Conv2d``.
        padding: ``None`` gives "same" padding for odd kernels: ``dilation * (k - 1) // 2``.
        norm: a :func:`detkit.layers.get_norm` name; ``""`` means no norm, and only
            then does the conv get a bias.
        activation: apply ReLU after the norm.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        groups: int = 1,
        norm: str = "",
        activation: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=norm == "",
        )
        self.norm = get_norm(norm, out_ch)
        self.act: nn.Module = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _foldable(norm: nn.Module) -> bool:
    """True for norms that are a fixed per-channel affine map right now."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return (not norm.training) and norm.track_running_stats and norm.running_mean is not None
    return False


def _scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_shift()
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.affine:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.affine:
        shift = shift + norm.bias
    return scale, shift


def _conv_norm_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Children of ``parent`` that form (conv, norm) pairs by detkit's naming convention.

    ``conv`` is followed by ``norm`` (ConvNormAct), and ``convK`` by ``bnK``
    (ResNet stem and blocks). These are the only pairs detkit modules create.
    """
    children = dict(parent.named_children())
    pairs = []
    for name, child in children.items():
        if not isinstance(child, nn.Conv2d):
            continue
        if name == "conv":
            norm_name = "norm"
        elif name.startswith("conv") and name[4:].isdigit():
            norm_name = "bn" + name[4:]
        else:
            continue
        if norm_name in children:
            pairs.append((name, norm_name))
    return pairs


@torch.no_grad()
def fold_frozen_bn(module: nn.Module) -> nn.Module:
    """Fold frozen or eval-mode BatchNorms into the preceding convolution, in place.

    Every ``(conv, norm)``/``(convK, bnK)`` child pair (the naming used by
    :class:`ConvNormAct` and the ResNet modules) whose norm is a
    :class:`FrozenBatchNorm2d` or a BatchNorm in eval mode is replaced by a conv
    with scaled weights and a bias, and the norm by ``nn.Identity``. Norms in
    training mode, GroupNorm and other layers are left alone. Intended for
    inference: call after ``model.eval()`` and weight loading. Returns ``module``.
    """
    for parent in list(module.modules()):
        for conv_name, norm_name in _conv_norm_pairs(parent):
            conv: nn.Conv2d = getattr(parent, conv_name)
            norm = getattr(parent, norm_name)
            if not _foldable(norm):
                continue
            scale, shift = _scale_shift(norm)
            w = conv.weight
            scale = scale.to(device=w.device, dtype=torch.float32)
            shift = shift.to(device=w.device, dtype=torch.float32)
            # (C_out, C_in/g, kh, kw) * (C_out, 1, 1, 1)
            new_w = (w.float() * scale.reshape(-1, 1, 1, 1)).to(w.dtype)
            old_b = conv.bias.float() if conv.bias is not None else torch.zeros_like(scale)
            new_b = (old_b * scale + shift).to(w.dtype)
            conv.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)
            conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
            setattr(parent, norm_name, nn.Identity())
    return module
