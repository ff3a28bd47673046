"""Optimizers with per-parameter-kind weight decay."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

__all__ = ["param_groups", "build_sgd", "build_adamw", "set_lr"]

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    weight_decay_bias: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into groups by weight decay.

    Parameters of normalization layers get ``weight_decay_norm`` and other
    biases get ``weight_decay_bias`` (``None`` means: same as ``weight_decay``).
    Each group stores its ``base_lr`` so the LR schedule can scale it.
    Frozen parameters (``requires_grad=False``) are left out; shared parameters
    appear once.
    """
    wd_norm = weight_decay if weight_decay_norm is None else weight_decay_norm
    wd_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    groups: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if is_norm:
                wd = wd_norm
            elif name == "bias":
                wd = wd_bias
            else:
                wd = weight_decay
            groups.setdefault(float(wd), []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr": base_lr, "base_lr": base_lr}
        for wd, ps in sorted(groups.items(), reverse=True)
    ]


def build_sgd(
    model: nn.Module,
    base_lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    weight_decay_norm: Optional[float] = 0.0,
    weight_decay_bias: Optional[float] = None,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """SGD with momentum; norm parameters and biases may use their own weight decay."""
    groups = param_groups(model, base_lr, weight_decay, weight_decay_norm, weight_decay_bias)
    if not groups:
        raise ValueError("the model has no trainable parameters (check backbone.freeze_at)")
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, nesterov=nesterov)


def build_adamw(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    no_decay_norm_and_bias: bool = True,
) -> torch.optim.AdamW:
    """AdamW (for classification pretraining); by default no decay on norm parameters and biases."""
    wd_other = 0.0 if no_decay_norm_and_bias else weight_decay
    groups = param_groups(model, base_lr, weight_decay, wd_other, wd_other)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=base_lr, betas=betas)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to ``base_lr * factor``; returns the first group's lr."""
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
