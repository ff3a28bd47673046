"""Random torchvision Faster / Mask R-CNN weights that give varied detections (not a test module).

Shared by the parity tests (``from torchvision_reference import randomize_for_detections``; pytest
puts ``tests/`` on ``sys.path``) and by ``benchmarks/gpu_check.py``, which compares detkit with
torchvision on the same weights where no pretrained file can be downloaded.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def synthetic_image(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 [3, h, w]: smoothed noise with a few flat rectangles (some structure for the features)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, h, w, generator=g) * 255
    img = torch.nn.functional.avg_pool2d(img, 9, 1, 4)[0]
    for _ in range(6):
        y0, x0 = int(torch.randint(0, h - 32, (1,), generator=g)), int(torch.randint(0, w - 32, (1,), generator=g))
        bh, bw = int(torch.randint(24, h // 2, (1,), generator=g)), int(torch.randint(24, w // 2, (1,), generator=g))
        img[:, y0 : y0 + bh, x0 : x0 + bw] = torch.rand(3, 1, 1, generator=g) * 255
    return img.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def randomize_for_detections(model: nn.Module, seed: int) -> None:
    """Reproducible random weights under which torchvision's model produces varied detections."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):  # BatchNorm2d in eval mode acts like FrozenBN
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    head = model.rpn.head
    head.cls_logits.weight.normal_(0, 0.05, generator=g)  # spread objectness: no near-ties in top-k
    head.cls_logits.bias.normal_(0, 0.5, generator=g)
    head.bbox_pred.weight.normal_(0, 0.01, generator=g)
    for fc in (model.roi_heads.box_head.fc6, model.roi_heads.box_head.fc7):
        fc.weight.normal_(0, math.sqrt(2.0 / fc.in_features), generator=g)
        fc.bias.zero_()
    pred = model.roi_heads.box_predictor
    pred.cls_score.weight.normal_(0, 0.3, generator=g)
    pred.bbox_pred.weight.normal_(0, 0.002, generator=g)
    # Center the classifier on the mean box feature of a small calibration image, so that class
    # scores depend on the RoI instead of one class winning everywhere; then bias the background.
    feats: list[torch.Tensor] = []
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.append(o))
    model.eval()
    model.transform.min_size, model.transform.max_size = (128,), 1333
    model([synthetic_image(128, 160, seed).float() / 255])
    hook.remove()
    mu = feats[0].mean(0)
    w = pred.cls_score.weight
    w -= (w @ mu)[:, None] * mu[None, :] / mu.dot(mu)
    pred.cls_score.bias.normal_(0, 0.5, generator=g)
    pred.cls_score.bias[0] = 12.0
