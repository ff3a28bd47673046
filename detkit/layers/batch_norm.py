"""Normalization layers: a frozen BatchNorm and a norm factory keyed by name."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "get_norm", "NORM_NAMES"]

NORM_NAMES: tuple[str, ...] = ("", "BN", "FrozenBN", "GN", "SyncBN")

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    The four buffers (``weight``, ``bias``, ``running_mean``, ``running_var``) use
    the same names as ``nn.BatchNorm2d`` so checkpoints load either way. The
    forward pass is a per-channel scale and shift folded from the buffers:
    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` (``eps = 1e-5`` as in torchvision).
    Nothing here is trainable and ``train()`` does not change the output.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` [C] equivalent to this layer."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift()
        # (C,) -> (1, C, 1, 1); cast so fp16/bf16 inputs stay in their dtype
        scale = scale.to(x.dtype).reshape(1, -1, 1, 1)
        shift = shift.to(x.dtype).reshape(1, -1, 1, 1)
        return x * scale + shift

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # BatchNorm checkpoints carry a step counter this layer does not need
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every ``BatchNorm2d``/``SyncBatchNorm`` in ``module`` by a frozen copy.

        Children are replaced in place; if ``module`` itself is a BatchNorm the new
        frozen module is returned (so always use the return value). Statistics and
        affine parameters are copied.
        """
        if isinstance(module, _BN_TYPES):
            tensors = list(module.parameters()) + list(module.buffers())
            frozen = cls(module.num_features, eps=module.eps)
            if tensors:
                frozen = frozen.to(tensors[0].device)
            with torch.no_grad():
                if module.affine:
                    frozen.weight.copy_(module.weight.detach())
                    frozen.bias.copy_(module.bias.detach())
                if module.track_running_stats:
                    frozen.running_mean.copy_(module.running_mean)
                    frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


def get_norm(name: str, channels: int) -> nn.Module:
    """Build a 2D normalization layer by name.

    Args:
        name: ``""`` (no norm, ``nn.Identity``), ``"BN"``, ``"FrozenBN"``, ``"GN"``
            (32 groups) or ``"SyncBN"``.
        channels: number of channels to normalize.
    """
    if name == "":
        return nn.Identity()
    if name == "BN":
        return nn.BatchNorm2d(channels)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if name == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if name == "GN":
        if channels % 32 != 0:
            raise ValueError(
                f"norm 'GN' uses 32 groups but got {channels} channels; use a channel count "
                "divisible by 32 or another norm"
            )
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown norm {name!r}; valid names are {list(NORM_NAMES)}")
