"""Forward-only RoIAlign over channels-last features, for CPU inference.

Each output bin is a bag of (pixel, weight) pairs reduced by ``F.embedding_bag`` over the
``[N*H*W, C]`` view of the features, so the work is vectorized over channels (torchvision's CPU
kernel loops over scalars). Sample points and the bilinear rule are torchvision's. Used by
:class:`detkit.inference.optimize.FastMultiScaleRoIAlign`; training uses :func:`detkit.ops.roi_align`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["roi_align_nhwc", "roi_align_nhwc_into"]

_ROI_CHUNK = 256  # RoIs per embedding_bag call: bounds the temporary index/weight tables


def _axis_taps(start: Tensor, bin_size: Tensor, pooled: int, grid: int, length: int) -> tuple[Tensor, Tensor]:
    """Bilinear taps of RoIAlign sample points along one axis, computed as torchvision does.

    Args:
        start, bin_size: [R] RoI start and bin size in feature pixels (fp32).
        pooled: bins along the axis; grid: samples per bin; length: feature size along the axis.

    Returns:
        int64 indices and weights, both [R, pooled, grid, 2] (low and high pixel); samples outside
        ``[-1, length]`` get zero weights.
    """
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)
    sub = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    # (R, P, 1) + (R, P, G): start + p * bin + (g + 0.5) * bin / grid, in torchvision's order
    pos = (start[:, None] + bins[None, :] * bin_size[:, None])[:, :, None] + (
        sub[None, None, :] * bin_size[:, None, None]) / grid
    valid = ((pos >= -1.0) & (pos <= length)).to(pos.dtype)
    pos = pos.clamp(min=0)
    low = pos.to(torch.int64).clamp(max=length - 1)  # floor (pos >= 0); Tensor.floor is slow on small CPU tensors
    at_end = low >= length - 1
    pos = torch.where(at_end, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    high = torch.where(at_end, low, low + 1)
    return torch.stack([low, high], dim=-1), torch.stack([(1.0 - frac) * valid, frac * valid], dim=-1)


def roi_align_nhwc_into(out: Tensor, rows: Tensor, features: Tensor, rois: Tensor, spatial_scale: float,
                        sampling_ratio: int, aligned: bool) -> None:
    """Pool ``rois`` [K, 5] from ``features`` into ``out[rows]`` (``out``: [M, S, S, C])."""
    n, c, h, w = features.shape
    s = out.shape[1]
    table = features.permute(0, 2, 3, 1).reshape(n * h * w, c).to(out.dtype)  # a view for channels_last
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale - offset - x1, rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / s, roi_h / s
    if sampling_ratio > 0:
        grids = torch.full((rois.shape[0], 2), sampling_ratio, dtype=torch.int64, device=rois.device)
    else:  # adaptive: ceil(roi_size / S) samples per bin side, one gather per distinct grid
        size = torch.stack([roi_h, roi_w], dim=1) / s
        grids = size.to(torch.int64)
        grids += grids < size  # ceil of positive sizes
    for gh, gw in torch.unique(grids, dim=0).tolist():
        group = torch.nonzero((grids[:, 0] == gh) & (grids[:, 1] == gw)).squeeze(1)
        if gh <= 0 or gw <= 0:  # empty sampling grid: zeros, as torchvision
            out[rows[group]] = 0
            continue
        for sel in group.split(_ROI_CHUNK):
            yi, yw = _axis_taps(y1[sel], bin_h[sel], s, gh, h)  # (K, S, gh, 2)
            xi, xw = _axis_taps(x1[sel], bin_w[sel], s, gw, w)  # (K, S, gw, 2)
            base = rois[sel, 0].to(torch.int64) * (h * w)
            # (K, S, 1, gh*2, 1) + (K, 1, S, 1, gw*2) -> (K, S, S, gh*2, gw*2): one bag of pixels per bin
            idx = (base[:, None, None] + yi.flatten(2) * w)[:, :, None, :, None] + xi.flatten(2)[:, None, :, None, :]
            wts = (yw.flatten(2) / float(gh * gw))[:, :, None, :, None] * xw.flatten(2)[:, None, :, None, :]
            offsets = torch.arange(0, idx.numel(), 4 * gh * gw, dtype=torch.int64, device=idx.device)
            pooled = F.embedding_bag(idx.reshape(-1), table, offsets, mode="sum",
                                     per_sample_weights=wts.reshape(-1).to(table.dtype))
            out.index_copy_(0, rows[sel], pooled.view(-1, s, s, c))  # (K*S*S, C) -> (K, S, S, C)


def roi_align_nhwc(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                   aligned: bool) -> Tensor:
    """RoIAlign (forward only) as a gather-sum of channels-last feature rows.

    Same sample points and bilinear rule as :func:`torchvision.ops.roi_align`, but each output bin
    is a bag of (pixel, weight) pairs reduced by ``F.embedding_bag`` over the ``[N*H*W, C]`` view of
    the features: vectorized over channels, unlike torchvision's scalar CPU loop (about 4x less CPU
    time for 1000 RoIs on a 256-channel p2 map).
    Sample positions and weights are computed in fp32 from fp32 ``rois``; the gather runs in the
    features' dtype (bf16 features: bf16 weights and output).

    Args:
        features: [N, C, H, W] (channels_last is read without a copy).
        rois: [R, 5] ``(batch_index, x1, y1, x2, y2)`` in input pixels.
        output_size: side S of the pooled square.
        spatial_scale: 1 / stride of ``features``.
        sampling_ratio: samples per bin side; <= 0 is adaptive (``ceil(roi_size / S)``).
        aligned: shift by -0.5 px (Detectron2's ROIAlignV2).

    Returns:
        [R, S, S, C] in the features' dtype (``.permute(0, 3, 1, 2)`` gives torchvision's layout).
    """
    out = features.new_empty((rois.shape[0], output_size, output_size, features.shape[1]))
    rows = torch.arange(rois.shape[0], device=features.device)
    roi_align_nhwc_into(out, rows, features, rois.float(), spatial_scale, sampling_ratio, aligned)
    return out
