"""fp32 islands in a model trained under autocast.

Under ``train.amp`` (bf16 autocast on CPUs with native bf16) every convolution and linear layer
computes in bf16, whose 8 significant bits are 8 times coarser than fp16's, the precision the
references train their AMP recipes at (Detectron2, torchvision). The last layer of each head, the one
whose output is a loss's input (class logits, box deltas, mask logits), is cheap, so under bf16 it
runs in fp32 instead: :func:`fp32_forward` (docs/recipe.md: segm AP75 +1.6 on the shapes set). Its
fp32 input is a copy: for the mask predictor of a full-size model, [positive RoIs, 256, 28, 28], about
200 MB at batch 2. Optimized bf16 inference keeps the box predictor in fp32 too
(:mod:`detkit.inference.optimize`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["fp32_forward"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def fp32_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` in float32 under bf16 autocast on ``x``'s device; plain ``layer(x)`` otherwise: without
    autocast (tracing and export included) and under fp16 autocast, the references' own AMP recipe."""
    device = x.device.type
    if (device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.bfloat16):
        with torch.autocast(device, enabled=False):
            return layer(x.float())
    return layer(x)
