"""Exponential moving average of model weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    Floating-point parameters and buffers are averaged; integer buffers (e.g.
    BatchNorm's ``num_batches_tracked``) are copied. The averaged copy lives in
    :attr:`module` (same device as the model, never trained directly) and is the
    model used for evaluation when EMA is enabled.

    Args:
        model: the trained model (unwrapped from DDP).
        decay: the averaging factor per update.
        warmup: if > 0, the effective decay ramps up as
            ``decay * (1 - exp(-updates / warmup))`` so early averages are not
            dominated by the random initialization.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    def current_decay(self) -> float:
        """The decay used by the next :meth:`update`."""
        if self.warmup > 0:
            return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        d = self.current_decay()
        src = model.state_dict()
        for name, ema_v in self.module.state_dict().items():
            v = src[name].detach()
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(d).add_(v.to(ema_v.dtype), alpha=1.0 - d)
            else:
                ema_v.copy_(v)
        self.updates += 1

    def state_dict(self) -> dict:
        """``{"model": averaged state dict, "updates": n, "decay": d}`` for checkpoints."""
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state.get("updates", 0))
