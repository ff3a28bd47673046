"""fp32 islands in a model trained under autocast.

Under ``train.amp`` (bf16 autocast on CPUs with native bf16) every convolution and linear layer
computes in bf16, whose 8 significant bits are 8 times coarser than fp16's, the precision the
references train their AMP recipes at (Detectron2, torchvision). The last layer of each head, the one
whose output is a loss's input (class logits, box deltas, mask logits), is cheap, so it runs in fp32
instead: :func:`fp32_forward`. Inference in bf16 keeps the same layers in fp32
(:mod:`detkit.inference.optimize`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["fp32_forward"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def fp32_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` in float32 when autocast is on for ``x``'s device; plain ``layer(x)`` otherwise
    (also under tracing and export, where autocast is off)."""
    device = x.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return layer(x.float())
    return layer(x)
