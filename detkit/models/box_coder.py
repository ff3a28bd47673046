"""Box <-> regression-delta transform used by the RPN and the box head.

The math is that of R-CNN (and torchvision's ``BoxCoder``): deltas are
``(dx, dy, dw, dh) * weights`` with ``dx = (gx - px) / pw`` and
``dw = log(gw / pw)``; ``dw``/``dh`` are clamped before ``exp`` when decoding.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["BoxCoder"]

_DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _full_precision(x: Tensor) -> Tensor:
    """float16/bfloat16 (e.g. under autocast) -> float32; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class BoxCoder:
    """Encode target boxes as deltas relative to reference boxes, and decode them back.

    Args:
        weights: ``(wx, wy, ww, wh)`` multipliers of the deltas.
        scale_clamp: upper bound for ``dw``/``dh`` (after dividing by the weights) when decoding.
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = _DEFAULT_SCALE_CLAMP,
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder: weights must have 4 values (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, gt: Tensor, boxes: Tensor) -> Tensor:
        """Deltas that turn ``boxes`` into ``gt``.

        Args:
            gt: float [N, 4] xyxy target boxes.
            boxes: float [N, 4] xyxy reference boxes (anchors or proposals), same N.

        Returns:
            float [N, 4] deltas ``(dx, dy, dw, dh)`` (float32 for float16/bfloat16 boxes).
        """
        wx, wy, ww, wh = self.weights
        boxes = _full_precision(boxes)
        gt = gt.to(boxes.dtype)
        pw = boxes[:, 2] - boxes[:, 0]
        ph = boxes[:, 3] - boxes[:, 1]
        px = boxes[:, 0] + 0.5 * pw
        py = boxes[:, 1] + 0.5 * ph

        gw = gt[:, 2] - gt[:, 0]
        gh = gt[:, 3] - gt[:, 1]
        gx = gt[:, 0] + 0.5 * gw
        gy = gt[:, 1] + 0.5 * gh

        dx = wx * (gx - px) / pw
        dy = wy * (gy - py) / ph
        dw = ww * torch.log(gw / pw)
        dh = wh * torch.log(gh / ph)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply deltas to reference boxes.

        Args:
            deltas: float [N, 4k] deltas (k boxes per reference box, e.g. one per class).
            boxes: float [N, 4] xyxy reference boxes.

        Returns:
            float [N, 4k] decoded xyxy boxes (float32 for float16/bfloat16 deltas: pixel
            coordinates need the precision).
        """
        if deltas.shape[-1] % 4 != 0:
            raise ValueError(f"BoxCoder.decode: deltas last dim must be a multiple of 4, got {tuple(deltas.shape)}")
        deltas = _full_precision(deltas)
        boxes = boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        dx = deltas[:, 0::4] / wx  # (N, k)
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        # 4 x (N, k) -> (N, k, 4) -> (N, 4k)
        out = torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2
        )
        return out.flatten(1)
