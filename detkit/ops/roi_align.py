"""RoIAlign with a fast CPU path, a drop-in for :func:`torchvision.ops.roi_align`.

torchvision's CPU kernels loop over RoIs, channels and samples one scalar at a time, on one
thread; in CPU training the backward pass alone can cost more than the convolutions around it.
This module computes the same numbers from a few ATen operations that work on whole feature
rows ``[C]`` of a channels-last view of the input:

1. *Plan* (cheap, per RoI): RoIAlign is separable. Each output bin averages bilinear samples
   whose weight on pixel ``(y, x)`` factorises into a row weight and a column weight, and the
   validity test of torchvision's ``bilinear_interpolate`` (sample outside
   ``[-1, H] x [-1, W]`` -> 0) factorises too. So per RoI we build, for each output row
   ``ph``, a short table of feature rows and weights (``L_y`` entries), and likewise for
   columns. Samples that hit the same pixel row are merged into one entry ("window" tables of
   ``span + 2`` rows instead of ``2 * grid`` pairs), which shrinks the work below
   torchvision's ``4 * grid_h * grid_w`` loads per bin when samples are denser than a pixel
   (always the case for adaptive sampling, ``sampling_ratio <= 0``).
2. *Forward*: the outer product of the row and column tables gives, per bin, a bag of
   ``L_y * L_x`` (pixel, weight) pairs; ``F.embedding_bag(mode="sum", per_sample_weights)``
   over the ``[N*H*W, C]`` view does the weighted gather-sum, vectorised over channels and
   multi-threaded over bags.
3. *Backward*: the transpose of that sparse map, ``grad_features = M^T @ grad_bins``, as
   ``dense.addmm_(sparse_coo, grad_bins)`` with an uncoalesced COO matrix: one vectorised axpy
   of ``C`` channels per entry, no sort (sorting the entries to build CSR costs more than the
   product), deterministic.

The plan is built in chunks of at most ``_MAX_ENTRIES`` entries, and both passes walk the RoIs
in blocks of about ``_BLOCK_ELEMS`` output values, so temporaries stay bounded and cache-sized.
On CUDA (and any other non-CPU device) and while tracing, exporting or compiling, the call goes
to torchvision's registered operator. Inputs are computed in fp32 (fp64 for fp64 inputs) and
returned in their dtype.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["roi_align", "roi_align_plan_stats"]

# Upper bound on (pixel, weight) entries built at once; RoIs are processed in chunks above it.
_MAX_ENTRIES = 1 << 22
# Output values (RoIs x bins x channels) handled per block in the forward and backward passes.
_BLOCK_ELEMS = 1 << 22


def _pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"roi_align: output_size={size} must be an int or a pair (height, width).")
    return size[0], size[1]


def _to_rois(boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """``[K, 5]`` rois from a tensor or a per-image list of ``[L, 4]`` boxes (torchvision's rule)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"roi_align: boxes tensor has shape {tuple(boxes.shape)}; expected [K, 5] "
                "(batch_index, x1, y1, x2, y2) or a list of [L, 4] tensors, one per image."
            )
        return boxes
    boxes = list(boxes)
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"roi_align: boxes[{i}] has shape {shape}; expected [L, 4] xyxy boxes.")
    if not boxes:
        raise ValueError("roi_align: boxes is an empty list; pass one [L, 4] tensor per image.")
    concat = torch.cat(boxes, dim=0)
    counts = torch.tensor([b.shape[0] for b in boxes], device=concat.device)
    batch = torch.repeat_interleave(torch.arange(len(boxes), device=concat.device), counts)
    # (K,) + (K, 4) -> (K, 5)
    return torch.cat([batch.to(concat.dtype)[:, None], concat], dim=1)


def _bucket(length: Tensor) -> Tensor:
    """Round table lengths up to 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, ... (fewer groups).

    The padding holds zero weights, which the plan drops, so it costs only transient memory.
    """
    length = length.clamp(min=2)
    p = torch.pow(2, torch.floor(torch.log2(length.to(torch.float64)))).to(torch.int64)
    cands = torch.stack([p, (5 * p + 3) // 4, (3 * p + 1) // 2, 2 * p], dim=-1)
    big = torch.iinfo(torch.int64).max
    return torch.where(cands >= length[..., None], cands, big).amin(dim=-1)


def _axis_tables(
    start: Tensor, bin_size: Tensor, grid: Tensor, size: int, pooled: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Row (or column) tables of one axis for all RoIs.

    Reproduces torchvision's sample placement and ``bilinear_interpolate`` along one axis:
    sample ``i`` of bin ``p`` sits at ``start + p * bin + (i + 0.5) * bin / grid``; it is
    dropped when outside ``[-1, size]`` (or NaN), clamped to ``[0, size - 1]`` otherwise, and
    splits weight ``1 - l`` / ``l`` between its low and high neighbours. Weights include the
    ``1 / grid`` of the bin average.

    Args:
        start, bin_size: [K] RoI start and bin size along the axis (feature pixels).
        grid: [K] int64 samples per bin along the axis (>= 0).
        size: feature map extent along the axis.
        pooled: output bins along the axis.

    Returns:
        ``(rows, weights, length)``: int64 [K, pooled, T] feature indices (always in range),
        [K, pooled, T] weights (0 past each RoI's ``length``) and int64 [K] bucketed lengths.
    """
    num, dtype, device = start.shape[0], start.dtype, start.device
    gmax = max(int(grid.max()), 1) if num > 0 else 1
    p = torch.arange(pooled, device=device, dtype=dtype)
    i = torch.arange(gmax, device=device)
    gridf = grid.clamp(min=1).to(dtype)
    # Same operation order as torchvision: (start + p * bin) + ((i + .5) * bin) / grid.
    bin_start = start[:, None] + p[None, :] * bin_size[:, None]  # (K, P)
    frac = ((i.to(dtype) + 0.5)[None, :] * bin_size[:, None]) / gridf[:, None]  # (K, G)
    coord = bin_start[:, :, None] + frac[:, None, :]  # (K, P, G)
    present = (i[None, :] < grid[:, None])[:, None, :]  # (K, 1, G)
    valid = (coord >= -1) & (coord <= size) & present  # NaN compares False
    # Clamping every sample (also the dropped ones) keeps rows monotone in the sample index.
    c = torch.nan_to_num(coord, nan=0.0, posinf=float(size - 1), neginf=0.0).clamp_(0, size - 1)
    low = c.floor().to(torch.int64)
    top = low >= size - 1
    high = torch.where(top, low, low + 1)
    frac_hi = torch.where(top, torch.zeros_like(c), c - low.to(dtype))
    scale = valid.to(dtype) / gridf[:, None, None]
    w_lo = (1.0 - frac_hi) * scale
    w_hi = frac_hi * scale

    # Rows of a bin run monotonically from its first to its last sample (the sample position
    # is affine in i, clamping is monotone), so they lie in [min(first, last), max(...) + 1].
    # Merge samples into such a window when it is no longer than the 2 * grid (low, high) pairs.
    last = (grid.clamp(min=1) - 1).view(num, 1, 1).expand(num, pooled, 1)
    first_low, last_low = low[:, :, 0], low.gather(2, last)[:, :, 0]
    base = torch.minimum(first_low, last_low)  # (K, P)
    span_roi = (last_low - first_low).abs().amax(dim=1)  # (K,)
    use_window = (span_roi + 2) <= 2 * grid
    length = _bucket(torch.where(use_window, span_roi + 2, 2 * grid))
    width = int(_bucket(torch.tensor([2 * gmax]))[0])

    # Slot of each (sample, low/high) contribution in the table.
    win_slot = torch.where(present, low - base[:, :, None], 0)
    window = use_window[:, None, None]
    slot_lo = torch.where(window, win_slot, 2 * i)
    slot_hi = torch.where(window, win_slot + 1, 2 * i + 1)
    slots = torch.stack([slot_lo, slot_hi], dim=3).reshape(num, pooled, 2 * gmax)  # (K,P,G,2) -> (K,P,2G)
    wvals = torch.stack([w_lo, w_hi], dim=3).reshape(num, pooled, 2 * gmax)
    weights = torch.zeros(num, pooled, width, dtype=dtype, device=device).scatter_add_(2, slots, wvals)

    # Window tables read rows base, base + 1, ...; pair tables the samples' own low/high rows.
    pair_rows = base[:, :, None].repeat(1, 1, width)
    pair_rows[:, :, : 2 * gmax] = torch.stack([low, high], dim=3).reshape(num, pooled, 2 * gmax)
    win_rows = (base[:, :, None] + torch.arange(width, device=device)).clamp_(max=size - 1)
    rows = torch.where(window, win_rows, pair_rows)
    return rows, weights, length


class _Plan:
    """Sparse bin <- pixel map of one call, in chunks of RoIs.

    Each chunk is ``(rois, pixels, weights, bag_start)``: ``rois`` int64 [k] original RoI
    indices in the chunk's bag order; ``pixels`` int64 [E] feature rows ``b*H*W + y*W + x``;
    ``weights`` [E]; ``bag_start`` int64 [k*Sh*Sw + 1], where the entries of bin
    ``(j, ph, pw)`` (the chunk's j-th RoI) are ``bag_start[q]:bag_start[q + 1]`` for
    ``q = (j*Sh + ph)*Sw + pw``.
    """

    def __init__(self) -> None:
        self.chunks: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.num_entries = 0
        self.num_groups = 0


def _build_plan(
    rois: Tensor,
    height: int,
    width: int,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> _Plan:
    device = rois.device
    num = rois.shape[0]
    plan = _Plan()
    if num == 0:
        return plan
    offset = 0.5 if aligned else 0.0
    # Same arithmetic as torchvision, in the compute dtype.
    coords = rois[:, 1:] * spatial_scale - offset  # (K, 4): x1, y1, x2, y2
    roi_w = coords[:, 2] - coords[:, 0]
    roi_h = coords[:, 3] - coords[:, 1]
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = torch.full((num,), sampling_ratio, dtype=torch.int64, device=device)
        grid_w = grid_h
    else:
        # ceil(nan) -> 0 samples; huge values are capped far above any feature map's size.
        grid_h = torch.nan_to_num(torch.ceil(bin_h), nan=0.0).clamp(0, 1 << 20).to(torch.int64)
        grid_w = torch.nan_to_num(torch.ceil(bin_w), nan=0.0).clamp(0, 1 << 20).to(torch.int64)
    rows_y, wy, len_y = _axis_tables(coords[:, 1], bin_h, grid_h, height, pooled_h)
    rows_x, wx, len_x = _axis_tables(coords[:, 0], bin_w, grid_w, width, pooled_w)
    batch = rois[:, 0].to(torch.int64)
    row_base = (batch * (height * width))[:, None, None] + rows_y * width  # (K, Sh, Ty)

    # Group RoIs by table lengths so each group is one dense broadcast.
    key = len_y * (int(len_x.max()) + 1) + len_x
    keys, inverse = torch.unique(key, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse, minlength=keys.numel()).tolist()
    lys = (keys // (int(len_x.max()) + 1)).tolist()
    lxs = (keys % (int(len_x.max()) + 1)).tolist()
    plan.num_groups = len(counts)
    bins = pooled_h * pooled_w

    segments: list[tuple[Tensor, int, int]] = []  # (roi indices, Ly, Lx), each within the limit
    start = 0
    for count, ly, lx in zip(counts, lys, lxs):
        idx = order[start : start + count]
        start += count
        per_roi = bins * ly * lx
        step = max(1, _MAX_ENTRIES // per_roi)
        for s in range(0, count, step):
            segments.append((idx[s : s + step], ly, lx))

    # Pack segments into chunks of at most _MAX_ENTRIES (a segment over it gets its own).
    pending: list[tuple[Tensor, int, int]] = []
    pending_entries = 0
    for seg in segments:
        n = seg[0].numel() * bins * seg[1] * seg[2]
        if pending and pending_entries + n > _MAX_ENTRIES:
            plan.chunks.append(_assemble_chunk(pending, row_base, rows_x, wy, wx, pooled_h, pooled_w))
            pending, pending_entries = [], 0
        pending.append(seg)
        pending_entries += n
    if pending:
        plan.chunks.append(_assemble_chunk(pending, row_base, rows_x, wy, wx, pooled_h, pooled_w))
    plan.num_entries = sum(chunk[1].numel() for chunk in plan.chunks)
    return plan


def _assemble_chunk(
    segments: list[tuple[Tensor, int, int]],
    row_base: Tensor,
    rows_x: Tensor,
    wy: Tensor,
    wx: Tensor,
    pooled_h: int,
    pooled_w: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outer products of the row and column tables of ``segments`` -> one chunk of the plan.

    Each segment is ``(roi indices, Ly, Lx)``: RoIs whose tables have these lengths.
    """
    bins = pooled_h * pooled_w
    total = sum(sel.numel() * bins * ly * lx for sel, ly, lx in segments)
    pixels = torch.empty(total, dtype=torch.int64, device=row_base.device)
    weights = torch.empty(total, dtype=wy.dtype, device=wy.device)
    pos = 0
    for sel, ly, lx in segments:
        n = sel.numel() * bins * ly * lx
        shape = (sel.numel(), pooled_h, pooled_w, ly, lx)
        # (k, Sh, 1, Ly, 1) + (k, 1, Sw, 1, Lx) -> (k, Sh, Sw, Ly, Lx): one bag per bin
        torch.add(
            row_base[sel, :, :ly][:, :, None, :, None],
            rows_x[sel, :, :lx][:, None, :, None, :],
            out=pixels[pos : pos + n].view(shape),
        )
        torch.mul(
            wy[sel, :, :ly][:, :, None, :, None],
            wx[sel, :, :lx][:, None, :, None, :],
            out=weights[pos : pos + n].view(shape),
        )
        pos += n
    # Drop zero-weight entries (padding, clamped or out-of-image samples): bags shrink.
    keep = weights != 0
    counts = []
    pos = 0
    for sel, ly, lx in segments:
        n = sel.numel() * bins * ly * lx
        counts.append(keep[pos : pos + n].view(-1, ly * lx).sum(dim=1))  # (k*Sh*Sw,)
        pos += n
    bag_start = torch.cat([pixels.new_zeros(1), torch.cumsum(torch.cat(counts), dim=0)])
    kept = torch.nonzero(keep).squeeze(1)
    rois = torch.cat([sel for sel, _, _ in segments])
    return rois, pixels.index_select(0, kept), weights.index_select(0, kept), bag_start


def _blocks(plan: _Plan, bins: int, channels: int) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Split the plan's chunks into RoI blocks of about ``_BLOCK_ELEMS`` output values.

    Yields ``(rois, pixels, weights, bag_start)`` like a chunk, with ``bag_start`` rebased
    to the block's first entry. Small blocks keep the per-block buffers in cache and reuse
    memory instead of faulting in fresh pages for a [K*Sh*Sw, C] temporary.
    """
    step = max(1, _BLOCK_ELEMS // max(bins * channels, 1))
    for sel, pixels, weights, bag_start in plan.chunks:
        starts = bag_start[:: bins].tolist()  # entry offset of each RoI, plus the end
        for j0 in range(0, sel.numel(), step):
            j1 = min(j0 + step, sel.numel())
            e0, e1 = starts[j0], starts[j1]
            yield sel[j0:j1], pixels[e0:e1], weights[e0:e1], bag_start[j0 * bins : j1 * bins + 1] - e0


class _RoIAlignCPU(torch.autograd.Function):
    """CPU RoIAlign: weighted gather (forward) and sparse transpose product (backward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        rois: Tensor,
        pooled_h: int,
        pooled_w: int,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        with torch.autocast(device_type="cpu", enabled=False):  # the compute dtype is chosen here
            return _RoIAlignCPU._forward(ctx, input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def _forward(
        ctx,
        input: Tensor,
        rois: Tensor,
        pooled_h: int,
        pooled_w: int,
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        num, channels, height, width = input.shape
        cdtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        k = rois.shape[0]
        bins = pooled_h * pooled_w
        plan = _Plan()
        if channels > 0 and height > 0 and width > 0:
            plan = _build_plan(
                rois.detach().to(cdtype), height, width, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
            )
        ready = bool(plan.chunks)
        # Every RoI is in exactly one chunk, so the output is fully written when ``ready``.
        alloc = torch.empty if ready else torch.zeros
        out = alloc(k, channels, pooled_h, pooled_w, dtype=cdtype, device=input.device)
        if ready:
            # (N, C, H, W) -> (N, H, W, C) -> (N*H*W, C); free when input is channels-last fp32
            feats = input.detach().permute(0, 2, 3, 1).to(cdtype).contiguous().view(-1, channels)
            for sel, pixels, weights, bag_start in _blocks(plan, bins, channels):
                pooled = F.embedding_bag(
                    pixels, feats, bag_start[:-1], mode="sum", per_sample_weights=weights
                )  # (k*Sh*Sw, C)
                # (k*Sh*Sw, C) -> (k, Sh, Sw, C) -> (k, C, Sh, Sw)
                out[sel] = pooled.view(-1, pooled_h, pooled_w, channels).permute(0, 3, 1, 2)
        ctx.plan = plan
        ctx.input_meta = (num, channels, height, width, input.dtype, input.is_contiguous())
        return out.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        num, channels, height, width, dtype, contiguous = ctx.input_meta
        plan: _Plan = ctx.plan
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        bins = grad_out.shape[2] * grad_out.shape[3]
        if not plan.chunks:
            return grad_out.new_zeros((num, channels, height, width), dtype=dtype), None, None, None, None, None, None
        device = grad_out.device
        grad_rows = torch.zeros(num * height * width, channels, dtype=cdtype, device=device)
        # (K, C, Sh, Sw) -> (K, C, Sh*Sw)
        grad_bins = grad_out.reshape(grad_out.shape[0], channels, bins)
        # Two buffers reused by every block: a gather then a transpose into preallocated memory
        # is several times faster than producing fresh tensors for each block.
        step = min(max(1, _BLOCK_ELEMS // (bins * channels)), grad_out.shape[0])
        gathered = torch.empty(step, channels, bins, dtype=grad_out.dtype, device=device)
        transposed = torch.empty(step, bins, channels, dtype=cdtype, device=device)
        for sel, pixels, weights, bag_start in _blocks(plan, bins, channels):
            k = sel.numel()
            torch.index_select(grad_bins, 0, sel, out=gathered[:k])
            # block's bins, (k, C, Sh*Sw) -> (k, Sh*Sw, C) -> (k*Sh*Sw, C)
            dense = transposed[:k].copy_(gathered[:k].transpose(1, 2)).view(-1, channels)
            # bin of each entry: entries are grouped by bin, bag_start delimits them
            local_bin = torch.repeat_interleave(torch.arange(k * bins, device=sel.device), bag_start.diff())
            m_t = torch.sparse_coo_tensor(
                torch.stack([pixels, local_bin]), weights, (grad_rows.shape[0], k * bins), check_invariants=False
            )
            grad_rows.addmm_(m_t, dense)  # += (N*H*W, k*Sh*Sw) @ (k*Sh*Sw, C)
        # (N*H*W, C) -> (N, H, W, C) -> (N, C, H, W) with channels-last strides
        grad_in = grad_rows.view(num, height, width, channels).permute(0, 3, 1, 2).to(dtype)
        if contiguous:
            grad_in = grad_in.contiguous()
        return grad_in, None, None, None, None, None, None


def _use_torchvision(input: Tensor) -> bool:
    """True off CPU, for quantized inputs, and while tracing / exporting / compiling, where
    torchvision's registered operator (with its ONNX symbolic and fake kernels) must appear."""
    if torch.jit.is_scripting() or input.device.type != "cpu" or input.is_quantized:
        return True
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def roi_align(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size: Union[int, Sequence[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN), same signature and numbers as :func:`torchvision.ops.roi_align`.

    Args:
        input: [N, C, H, W] features.
        boxes: [K, 5] ``(batch_index, x1, y1, x2, y2)`` rois, or a list of N [L, 4] boxes.
        output_size: ``S`` or ``(Sh, Sw)`` bins.
        spatial_scale: factor from box coordinates to feature pixels (1 / stride).
        sampling_ratio: samples per bin side; ``<= 0`` means ``ceil(roi_size / output_size)``.
        aligned: shift boxes by -0.5 pixel (Detectron2's ROIAlignV2).

    Returns:
        [K, C, Sh, Sw] in ``input.dtype``.

    On CPU this runs the gather / sparse-matmul implementation described in the module
    docstring (fp32 internally, fp64 for fp64 inputs; rois may have another float dtype than
    the input). Elsewhere (CUDA and other devices, quantized inputs, TorchScript, tracing, ONNX
    export, torch.compile) it calls torchvision.
    """
    rois = _to_rois(boxes)
    out_h, out_w = _pair(output_size)
    if _use_torchvision(input):
        return torchvision.ops.roi_align(input, rois, (out_h, out_w), spatial_scale, sampling_ratio, aligned)
    if input.dim() != 4:
        raise ValueError(f"roi_align: input has shape {tuple(input.shape)}; expected [N, C, H, W].")
    if not input.is_floating_point() or not rois.is_floating_point():
        raise TypeError(
            f"roi_align: input ({input.dtype}) and boxes ({rois.dtype}) must be floating point tensors."
        )
    if rois.device != input.device:
        raise ValueError(f"roi_align: boxes are on {rois.device} but input is on {input.device}.")
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"roi_align: output_size=({out_h}, {out_w}) must be positive.")
    if rois.shape[0] > 0:
        batch = rois[:, 0].to(torch.int64)  # truncated, as torchvision's kernel does
        if bool(((batch < 0) | (batch >= input.shape[0])).any()):
            raise ValueError(
                f"roi_align: batch index in boxes[:, 0] out of range [0, {input.shape[0]}) "
                f"(got min {batch.min().item()}, max {batch.max().item()})."
            )
    return _RoIAlignCPU.apply(input, rois, out_h, out_w, float(spatial_scale), int(sampling_ratio), bool(aligned))


def roi_align_plan_stats(
    rois: Tensor,
    feature_size: tuple[int, int],
    output_size: Union[int, Sequence[int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> dict[str, int]:
    """Size of the sparse map :func:`roi_align` builds on CPU (for benchmarks and tests).

    Returns ``{"entries", "torchvision_loads", "groups", "chunks"}``: (pixel, weight) entries
    per channel versus the ``4 * grid_h * grid_w`` loads per bin torchvision's loop makes.
    """
    out_h, out_w = _pair(output_size)
    rois = rois.detach().float()
    height, width = feature_size
    plan = _build_plan(rois, height, width, out_h, out_w, spatial_scale, sampling_ratio, aligned)
    size = rois[:, 3:5] * spatial_scale - rois[:, 1:3] * spatial_scale  # (K, 2): w, h
    if not aligned:
        size = size.clamp(min=1.0)
    if sampling_ratio > 0:
        loads = 4 * sampling_ratio * sampling_ratio * out_h * out_w * rois.shape[0]
    else:
        g = torch.ceil(size / torch.tensor([out_w, out_h])).clamp(min=0)
        loads = int(4 * (g[:, 0] * g[:, 1]).sum().item() * out_h * out_w)
    return {
        "entries": plan.num_entries,
        "torchvision_loads": int(loads),
        "groups": plan.num_groups,
        "chunks": len(plan.chunks),
    }
