"""Multi-level RoIAlign: pool each RoI from the FPN level that suits its size.

Level assignment follows Eqn. (1) of the FPN paper (Lin et al., 2017): a box of
``canonical_box_size`` pixels (224, the ImageNet crop) maps to ``canonical_level``
(4, i.e. stride 16), and every doubling of ``sqrt(area)`` moves one level up::

    k = floor(k0 + log2(sqrt(area) / s0) + 1e-6), clamped to the available levels

which is the rule torchvision's ``LevelMapper`` implements, so results agree
exactly with ``torchvision.ops.MultiScaleRoIAlign`` for the same scales.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn
from ..ops import roi_align
from ..ops.roi_align import _use_torchvision

__all__ = ["MultiScaleRoIAlign", "assign_boxes_to_levels", "convert_boxes_to_rois"]

_LEVEL_EPS = 1e-6  # same epsilon as torchvision's LevelMapper


def assign_boxes_to_levels(
    boxes: Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> Tensor:
    """Index (0-based from ``min_level``) of the pyramid level each box is pooled from.

    Args:
        boxes: [R, 4] xyxy boxes in input-image pixels.
        min_level: level of the finest feature map given (e.g. 2 for p2, stride 4).
        max_level: level of the coarsest feature map given (e.g. 5 for p5).
        canonical_box_size: box size (sqrt of area) that maps to ``canonical_level``.
        canonical_level: level for boxes of ``canonical_box_size``.

    Returns:
        int64 [R] in ``[0, max_level - min_level]``.
    """
    wh = boxes[:, 2:] - boxes[:, :2]
    box_sizes = torch.sqrt(wh[:, 0] * wh[:, 1])
    eps = torch.tensor(_LEVEL_EPS, dtype=box_sizes.dtype, device=box_sizes.device)
    levels = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size) + eps)
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def _rois_for_roi_align(rois: Tensor, feature: Tensor) -> Tensor:
    """``rois`` in the dtype that ``roi_align(feature, rois, ...)`` needs.

    Only torchvision's operator (where :func:`detkit.ops.roi_align` hands over to it: off CPU,
    tracing, export, compiling) needs rois in the features' dtype, and only outside autocast
    (autocast casts for itself). detkit's CPU op takes fp32 rois whatever the features' dtype,
    so they are not cast for it: bf16 would round 512-1024 px coordinates to multiples of 4 px.
    """
    if rois.dtype != feature.dtype and _use_torchvision(feature) and not torch.is_autocast_enabled(feature.device.type):
        return rois.to(feature.dtype)
    return rois


def convert_boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Concatenate per-image boxes into the ``[R, 5]`` ``(batch_index, x1, y1, x2, y2)`` format.

    The batch-index column is built from the boxes' own shapes (no Python counts), so the
    function stays dynamic under ``torch.jit.trace`` / ONNX export.
    """
    concat = torch.cat(list(boxes), dim=0)
    # per image (Ri, 1) filled with its index -> (R, 1)
    batch_idx = torch.cat([torch.full_like(b[:, :1], i, dtype=concat.dtype) for i, b in enumerate(boxes)], dim=0)
    # (R, 1) + (R, 4) -> (R, 5)
    return torch.cat([batch_idx, concat], dim=1)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over a feature pyramid, each RoI pooled from one level.

    Args:
        output_size: side ``S`` of the pooled square (7 for the box head, 14 for the mask head).
        scales: ``1 / stride`` of each feature map passed to :meth:`forward`, finest first,
            each a power of two half the previous one (e.g. ``[1/4, 1/8, 1/16, 1/32]``).
        sampling_ratio: sampling points per bin side for ``roi_align`` (0: adaptive).
        aligned: shift boxes by -0.5 px before pooling (Detectron2's ``ROIAlignV2``);
            False reproduces torchvision's v1 models.
        canonical_box_size: box size (sqrt of area) that maps to ``canonical_level``.
        canonical_level: pyramid level (log2 of stride) for boxes of ``canonical_box_size``.
    """

    def __init__(
        self,
        output_size: Union[int, tuple[int, int]],
        scales: Sequence[float],
        sampling_ratio: int,
        aligned: bool,
        canonical_box_size: float = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if len(scales) == 0:
            raise ValueError("MultiScaleRoIAlign: `scales` is empty; give 1/stride for each feature map.")
        levels = [-math.log2(s) if s > 0 else float("nan") for s in scales]
        for s, lvl in zip(scales, levels):
            if not (lvl == lvl) or abs(lvl - round(lvl)) > 1e-5:
                raise ValueError(
                    f"MultiScaleRoIAlign: scale {s} in scales={list(scales)} is not 1/2**k; "
                    "pass 1/stride of each feature map (e.g. [0.25, 0.125, 0.0625, 0.03125])."
                )
        int_levels = [int(round(lvl)) for lvl in levels]
        if any(b - a != 1 for a, b in zip(int_levels, int_levels[1:])):
            raise ValueError(
                f"MultiScaleRoIAlign: scales={list(scales)} must be consecutive pyramid levels, finest first."
            )
        self.output_size: tuple[int, int] = (int(output_size[0]), int(output_size[1]))
        self.scales: list[float] = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)
        self.min_level = int_levels[0]
        self.max_level = int_levels[-1]

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Pool every box from its level.

        Args:
            features: one [N, C, Hi, Wi] map per entry of ``scales``, in the same order.
            boxes: N tensors [Ri, 4] of xyxy boxes in input-image pixels, one per image.

        Returns:
            [R, C, S, S] with R = sum(Ri): image 0's boxes first, each image in its input order.
        """
        if len(features) != len(self.scales):
            raise ValueError(
                f"MultiScaleRoIAlign: got {len(features)} feature maps but {len(self.scales)} scales "
                f"({self.scales}); pass exactly one feature map per scale."
            )
        if len(boxes) != features[0].shape[0]:
            raise ValueError(
                f"MultiScaleRoIAlign: got boxes for {len(boxes)} images but features have batch size "
                f"{features[0].shape[0]}."
            )
        ref = features[0]
        num_channels = ref.shape[1]
        rois = convert_boxes_to_rois(boxes).to(device=ref.device)
        # Levels are assigned on the boxes as given (fp32); the rois handed to roi_align are cast
        # to the features' dtype only where torchvision's operator needs it.
        pool_rois = _rois_for_roi_align(rois, ref)
        num_rois = rois.shape[0]
        tracing = torch.jit.is_tracing()  # export: no data-dependent Python branches (they would be frozen)
        if num_rois == 0 and not tracing:
            return ref.new_zeros((0, num_channels) + self.output_size)

        if len(features) == 1:
            return roi_align(
                features[0], pool_rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned
            )

        level_idx = assign_boxes_to_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        output = ref.new_zeros((num_rois, num_channels) + self.output_size)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            inds = torch.nonzero(level_idx == level).squeeze(1)
            if tracing:  # every level, even one that is empty for the sample input
                pooled = roi_align(feature, pool_rois[inds], self.output_size, scale, self.sampling_ratio,
                                   self.aligned)
                output = output.index_put((inds,), pooled.to(output.dtype))
                continue
            if inds.numel() == 0:
                continue
            pooled = roi_align(feature, pool_rois[inds], self.output_size, scale, self.sampling_ratio, self.aligned)
            # Levels may differ in dtype under autocast; index_copy_ needs the output's dtype.
            output.index_copy_(0, inds, pooled.to(output.dtype))
        return output

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, scales={self.scales}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned}, canonical=({self.canonical_box_size}, {self.canonical_level})"
        )
