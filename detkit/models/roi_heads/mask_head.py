"""Mask R-CNN mask head, its loss, test-time mask selection and mask pasting.

Parameter names of :class:`MaskRCNNHead` (the torchvision checkpoint conversion maps onto them):
``convs.{i}`` (ConvNormAct: ``.conv``, ``.norm``), ``deconv`` (ConvTranspose2d 2x2, stride 2),
``predictor`` (Conv2d 1x1 to K channels, or 1 when class-agnostic).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detkit.layers import ConvNormAct, fp32_forward

__all__ = [
    "MaskRCNNHead", "mask_rcnn_loss", "mask_rcnn_inference", "paste_masks", "paste_masks_detectron2",
    "paste_masks_in_image",
]


class MaskRCNNHead(nn.Module):
    """``len(conv_dims)`` 3x3 ConvNormAct, a 2x upsampling deconv + ReLU, and a 1x1 mask predictor.

    Maps [R, C, S, S] pooled features to [R, K, 2S, 2S] mask logits (K = 1 if class-agnostic).

    Args:
        in_channels: channels of the pooled features.
        num_classes: K foreground classes.
        conv_dims: output channels of each 3x3 conv (four 256 in the standard head).
        norm: :func:`detkit.layers.get_norm` name for the convs ("" or "GN" typically).
        cls_agnostic: predict one mask for all classes.
        target_aligned: the frame of the M x M grid the head learns to predict, i.e. how
            :func:`mask_rcnn_loss` crops its targets. ``True``: cell ``j`` of a box ``[x0, x1)`` is
            centred at ``x0 + (j + 0.5) * (x1 - x0) / M`` in pixel-edge coordinates (pixel ``i``
            spans ``[i, i + 1)``), the frame of an ``aligned=True`` pooler and of Detectron2's
            paste (``model.mask_paste=detectron2``), as in Detectron2. ``False``: torchvision's
            targets (``roi_align(..., aligned=False)``), half a pixel off that frame, which a model
            whose pooler is aligned cannot learn for every box size (0.5 px is 0.9 cells of a 16-px
            box at M=28, 0.07 of a 200-px one).

    Init: Kaiming normal (fan_out, ReLU) convs and deconv, as torchvision and Detectron2; the
    1x1 predictor is normal with std 0.001 (Detectron2), so every mask logit starts near 0 and the
    first mask loss is about ln 2. Kaiming init there (torchvision's choice) gives the predictor a
    std of sqrt(2 / K): its logits start with a magnitude of tens, the first losses are ~10, and
    their large gradients reach the shared FPN and backbone while those are still training.
    All biases start at zero.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv_dims: Sequence[int] = (256, 256, 256, 256),
        norm: str = "",
        cls_agnostic: bool = False,
        target_aligned: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"MaskRCNNHead: num_classes={num_classes}; need at least one class.")
        self.num_classes = num_classes
        self.cls_agnostic = cls_agnostic
        self.target_aligned = bool(target_aligned)
        self.convs = nn.ModuleList()
        channels = in_channels
        for dim in conv_dims:
            self.convs.append(ConvNormAct(channels, dim, 3, norm=norm, activation=True))
            channels = dim
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(channels, 1 if cls_agnostic else num_classes, kernel_size=1)

        for conv in [block.conv for block in self.convs] + [self.deconv]:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] -> mask logits [R, K or 1, 2S, 2S]."""
        for conv in self.convs:
            x = conv(x)
        x = F.relu(self.deconv(x))
        return fp32_forward(self.predictor, x)  # fp32 under autocast


def _select_class(mask_logits: Tensor, classes: Tensor) -> Tensor:
    """[R, K, M, M] logits and int64 [R] classes -> [R, M, M] (channel 0 if class-agnostic)."""
    if mask_logits.shape[1] == 1:
        return mask_logits[:, 0]
    return mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), classes]


def mask_rcnn_loss(
    mask_logits: Tensor,
    proposal_boxes: Sequence[Tensor],
    gt_masks: Sequence[Tensor],
    matched_idxs: Sequence[Tensor],
    gt_classes: Tensor,
    aligned: bool = False,
) -> Tensor:
    """Per-pixel binary cross-entropy of the GT class's mask, averaged over pixels and RoIs.

    The target of each positive proposal is its matched GT mask cropped and resized to
    the head's M x M output with ``roi_align`` (adaptive sampling; ``aligned=False`` as
    torchvision's ``project_masks_on_boxes``, ``aligned=True`` as Detectron2's bit masks: see
    :class:`MaskRCNNHead`'s ``target_aligned``); soft values in [0, 1] are used as-is.

    Args:
        mask_logits: [P, K or 1, M, M] for the positive proposals of all images (in image order).
        proposal_boxes: per image [Pi, 4] positive proposal boxes.
        gt_masks: per image uint8/bool [Gi, H, W] GT masks at image resolution.
        matched_idxs: per image int64 [Pi] index of each proposal's GT in ``gt_masks[i]``.
        gt_classes: int64 [P] class of each positive proposal's GT, in [0, K).
        aligned: the ``roi_align`` frame of the targets.

    Returns:
        Scalar loss; ``0 * mask_logits.sum()`` (keeps the graph) when there are no positives.
    """
    mask_size = mask_logits.shape[-1]
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    targets = []
    for boxes, masks, idxs in zip(proposal_boxes, gt_masks, matched_idxs):
        if boxes.shape[0] == 0:
            continue
        rois = torch.cat([idxs.to(boxes.dtype)[:, None], boxes], dim=1)  # (Pi, 5)
        # (Gi, H, W) -> (Gi, 1, H, W): each GT mask is its own "image" for roi_align
        masks = masks[:, None].to(device=boxes.device, dtype=boxes.dtype)
        targets.append(roi_align(masks, rois, (mask_size, mask_size), 1.0, 0, aligned)[:, 0])
    target = torch.cat(targets, dim=0).float()
    logits = _select_class(mask_logits, gt_classes).float()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="mean")


def mask_rcnn_inference(mask_logits: Tensor, labels: Sequence[Tensor]) -> list[Tensor]:
    """Probabilities of each detection's predicted class.

    Args:
        mask_logits: [D, K or 1, M, M] for the detections of all images (in image order).
        labels: per image int64 [Di] predicted classes.

    Returns:
        Per image f32 [Di, 1, M, M] sigmoid probabilities.
    """
    classes = torch.cat(list(labels), dim=0)
    probs = _select_class(mask_logits, classes).float().sigmoid()[:, None]  # (D, M, M) -> (D, 1, M, M)
    if torch.jit.is_tracing():  # slice with the traced sizes (split would freeze the counts)
        out, start = [], 0
        for lab in labels:
            end = start + lab.shape[0]
            out.append(probs[start:end])
            start = end
        return out
    return list(probs.split([len(lab) for lab in labels], dim=0))


def _interp_weights(start: Tensor, length: Tensor, src_size: int, out_size: int) -> Tensor:
    """Bilinear resize weights along one axis, as ``F.interpolate(align_corners=False)``.

    Row n maps a source of ``src_size`` samples onto the integer span
    ``[start[n], start[n] + length[n])`` of an output axis of ``out_size`` pixels;
    pixels outside the span get all-zero weights.

    Args:
        start: int64 [N] first output pixel of each span (may be negative or beyond the axis).
        length: int64 [N] span lengths; a span of length <= 0 gets no pixels.

    Returns:
        float32 [N, out_size, src_size].
    """
    n = start.shape[0]
    pix = torch.arange(out_size, device=start.device)
    dst = pix[None, :] - start[:, None]  # (N, out) position inside the span
    inside = (dst >= 0) & (dst < length[:, None])
    scale = float(src_size) / length.clamp(min=1).to(torch.float32)  # same float32 scale as interpolate
    src = ((dst.to(torch.float32) + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=src_size - 1)
    i1 = (i0 + 1).clamp(max=src_size - 1)
    lam1 = (src - i0.to(torch.float32)).clamp(0, 1)
    lam0 = 1.0 - lam1
    zero = torch.zeros((), device=start.device)
    weights = torch.zeros((n, out_size, src_size), device=start.device)
    weights.scatter_add_(2, i0[..., None], torch.where(inside, lam0, zero)[..., None])
    weights.scatter_add_(2, i1[..., None], torch.where(inside, lam1, zero)[..., None])
    return weights


def paste_masks_in_image(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    max_chunk_pixels: int = 1 << 22,
) -> Tensor:
    """Resize M x M mask probabilities into their boxes on an h x w image and binarize.

    Reproduces ``torchvision.models.detection.roi_heads.paste_masks_in_image``: each mask
    is zero-padded by one pixel and its box enlarged by ``(M + 2) / M`` around its center,
    the box is truncated to integers, the padded mask is bilinearly resized to
    ``(y2 - y1 + 1, x2 - x1 + 1)`` pixels (align_corners=False) and placed at
    ``(x1, y1)``, clipped to the image.

    Instead of torchvision's loop over masks, masks are sorted by the size of their
    visible box and processed in chunks: the separable bilinear resize of a chunk is two
    batched matrix products ``Wy @ mask @ Wx^T`` over crops of the chunk's largest box
    (work grows with box area, not image area), and the crops are scattered into the
    output with one indexed write per chunk.

    Args:
        masks: float [N, M, M] (or [N, 1, M, M]) probabilities.
        boxes: [N, 4] xyxy boxes in the image's pixels.
        image_size: (h, w) of the output.
        threshold: a pixel is in the mask when its probability is > threshold.
        max_chunk_pixels: bound on the crop pixels (masks x crop area) computed at once.

    Returns:
        bool [N, h, w] on the masks' device.
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.dim() != 3 or masks.shape[-1] != masks.shape[-2] or tuple(boxes.shape) != (masks.shape[0], 4):
        raise ValueError(
            f"paste_masks_in_image: expected masks [N, M, M] and boxes [N, 4], got {tuple(masks.shape)} "
            f"and {tuple(boxes.shape)}."
        )
    im_h, im_w = int(image_size[0]), int(image_size[1])
    num = masks.shape[0]
    device = masks.device
    out = torch.zeros((num, im_h, im_w), dtype=torch.bool, device=device)
    if num == 0 or im_h == 0 or im_w == 0:
        return out

    padding = 1
    size = masks.shape[-1]
    src_size = size + 2 * padding
    padded = F.pad(masks.float(), (padding,) * 4)  # (N, M, M) -> (N, M+2, M+2)
    scale = float(src_size) / size
    boxes = boxes.to(device=device, dtype=torch.float32)
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    ctr_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    ctr_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    # (N, 4) expanded boxes, truncated toward zero like torchvision's .to(int64)
    ib = torch.stack([ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h], dim=1).to(torch.int64)
    widths = ib[:, 2] - ib[:, 0] + 1  # <= 0 only for invalid (x2 < x1) boxes: nothing is pasted
    heights = ib[:, 3] - ib[:, 1] + 1
    # visible part of each box: [x0, x0 + cw) x [y0, y0 + ch)
    x0 = ib[:, 0].clamp(0, im_w)
    y0 = ib[:, 1].clamp(0, im_h)
    cw = (ib[:, 2] + 1).clamp(0, im_w) - x0
    ch = (ib[:, 3] + 1).clamp(0, im_h) - y0
    cw = torch.where(widths > 0, cw.clamp(min=0), torch.zeros_like(cw))
    ch = torch.where(heights > 0, ch.clamp(min=0), torch.zeros_like(ch))

    order = torch.argsort(cw * ch)
    sizes = torch.stack([ch[order], cw[order]], dim=1).tolist()  # one host sync for the chunking
    begin = 0
    while begin < num:
        max_h, max_w = max(sizes[begin][0], 1), max(sizes[begin][1], 1)
        end = begin + 1
        while end < num:
            nh, nw = max(max_h, sizes[end][0]), max(max_w, sizes[end][1])
            if (end - begin + 1) * nh * nw > max_chunk_pixels:
                break
            max_h, max_w, end = nh, nw, end + 1
        idx = order[begin:end]
        begin = end
        # weights over the crop axes: crop pixel p is image pixel y0 + p, box pixel y0 + p - y1
        wy = _interp_weights(ib[idx, 1] - y0[idx], heights[idx], src_size, max_h)  # (n, Hc, M+2)
        wx = _interp_weights(ib[idx, 0] - x0[idx], widths[idx], src_size, max_w)  # (n, Wc, M+2)
        # (n, Hc, M+2) @ (n, M+2, M+2) @ (n, M+2, Wc) -> (n, Hc, Wc)
        crops = torch.bmm(torch.bmm(wy, padded[idx]), wx.transpose(1, 2)) > threshold
        rows = torch.arange(max_h, device=device)
        cols = torch.arange(max_w, device=device)
        valid = (rows[None, :, None] < ch[idx, None, None]) & (cols[None, None, :] < cw[idx, None, None])
        valid &= crops  # only True pixels need writing; out is already False elsewhere
        n_i, r_i, c_i = torch.nonzero(valid, as_tuple=True)
        flat = (idx[n_i] * im_h + y0[idx][n_i] + r_i) * im_w + x0[idx][n_i] + c_i
        out.view(-1)[flat] = True
    return out


def paste_masks_detectron2(masks: Tensor, boxes: Tensor, image_size: tuple[int, int],
                           threshold: float = 0.5) -> Tensor:
    """Paste M x M mask probabilities into their boxes the way Detectron2 does, and binarize.

    Each output pixel ``(x, y)`` near box ``(x1, y1, x2, y2)`` samples the mask bilinearly at its
    centre: ``u = ((x + 0.5) - x1) / (x2 - x1) * 2 - 1`` (likewise ``v``), ``grid_sample`` with
    ``align_corners=False`` and zeros outside the mask; a pixel is in the mask when its value is
    ``>= threshold``. Unlike :func:`paste_masks_in_image` the box is not enlarged or truncated, so
    small objects' masks differ by a pixel or so at their borders.

    Args:
        masks: float [N, M, M] (or [N, 1, M, M]) probabilities.
        boxes: [N, 4] xyxy boxes in the image's pixels.
        image_size: (h, w) of the output.
        threshold: a pixel is in the mask when its value is >= threshold.

    Returns:
        bool [N, h, w] on the masks' device.
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    im_h, im_w = int(image_size[0]), int(image_size[1])
    out = torch.zeros((masks.shape[0], im_h, im_w), dtype=torch.bool, device=masks.device)
    boxes = boxes.to(device=masks.device, dtype=torch.float32)
    for i in range(masks.shape[0]):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        # only the pixels around the box can be inside it (one pixel of margin each way)
        c0, r0 = max(int(math.floor(x1)) - 1, 0), max(int(math.floor(y1)) - 1, 0)
        c1, r1 = min(int(math.ceil(x2)) + 1, im_w), min(int(math.ceil(y2)) + 1, im_h)
        if c1 <= c0 or r1 <= r0:
            continue
        u = (torch.arange(c0, c1, device=masks.device, dtype=torch.float32) + 0.5 - x1) / max(x2 - x1, 1e-12) * 2 - 1
        v = (torch.arange(r0, r1, device=masks.device, dtype=torch.float32) + 0.5 - y1) / max(y2 - y1, 1e-12) * 2 - 1
        # (rows, cols, 2) grid of (u, v) -> (1, rows, cols, 2)
        grid = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], dim=-1)[None]
        sampled = F.grid_sample(masks[i][None, None].float(), grid, mode="bilinear", align_corners=False)[0, 0]
        out[i, r0:r1, c0:c1] = sampled >= threshold
    return out


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5,
                style: str = "torchvision") -> Tensor:
    """:func:`paste_masks_in_image` (``style="torchvision"``) or :func:`paste_masks_detectron2`."""
    if style == "detectron2":
        return paste_masks_detectron2(masks, boxes, image_size, threshold)
    return paste_masks_in_image(masks, boxes, image_size, threshold)
