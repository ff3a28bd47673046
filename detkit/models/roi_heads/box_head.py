"""Fast R-CNN box head: RoI features -> class scores and class-specific box deltas.

Parameter names (the torchvision checkpoint conversion maps onto them):
    * :class:`FastRCNNConvFCHead`: ``convs.{i}`` (ConvNormAct: ``.conv``, ``.norm``), ``fcs.{i}`` (Linear);
    * :class:`FastRCNNPredictor`: ``cls_score`` Linear(in, K + 1; background is the LAST column),
      ``bbox_pred`` Linear(in, 4K) (or 4 when class-agnostic; no background slot).

Also here: the Fast R-CNN losses and the test-time post-processing (decode, clip,
score threshold, per-class NMS, top-k), done for the whole batch at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detkit.layers import ConvNormAct, fp32_forward

if TYPE_CHECKING:  # only for annotations; the coder is passed in by the caller
    from detkit.models.box_coder import BoxCoder

__all__ = ["FastRCNNConvFCHead", "FastRCNNPredictor", "fast_rcnn_losses", "fast_rcnn_inference"]


FC_INITS = ("c2_xavier", "pytorch")


class FastRCNNConvFCHead(nn.Module):
    """Convs then fully-connected layers on pooled RoI features (each followed by ReLU).

    ``conv_dims=(), fc_dims=(1024, 1024)`` is the standard "2fc" head (torchvision's
    ``TwoMLPHead``); ``conv_dims=(256,) * 4, fc_dims=(1024,), norm="GN"`` is "4conv1fc".

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (the pooler's output size).
        conv_dims: output channels of each 3x3 conv (``convs.{i}``).
        fc_dims: output size of each Linear (``fcs.{i}``).
        norm: :func:`detkit.layers.get_norm` name used in the convs ("" or "GN" typically).
        fc_init: the FCs' initialization: ``"c2_xavier"`` (Caffe2's XavierFill as in Detectron2: uniform
            with bound ``sqrt(3 / fan_in)``, zero bias) or ``"pytorch"`` (``nn.Linear``'s defaults, as in
            torchvision: bound ``1 / sqrt(fan_in)``, a third of the variance, bias too). The convs are
            Kaiming (fan-out) in both.

    Attributes:
        output_dim: size of the output feature vector.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        conv_dims: Sequence[int] = (),
        fc_dims: Sequence[int] = (1024, 1024),
        norm: str = "",
        fc_init: str = "c2_xavier",
    ) -> None:
        super().__init__()
        if fc_init not in FC_INITS:
            raise ValueError(f"FastRCNNConvFCHead: fc_init must be one of {FC_INITS}, got {fc_init!r}")
        if len(conv_dims) + len(fc_dims) == 0:
            raise ValueError("FastRCNNConvFCHead: conv_dims and fc_dims are both empty; give at least one layer.")
        self.convs = nn.ModuleList()
        channels = in_channels
        for dim in conv_dims:
            self.convs.append(ConvNormAct(channels, dim, 3, norm=norm, activation=True))
            channels = dim
        self.fcs = nn.ModuleList()
        in_dim = channels * resolution * resolution
        for dim in fc_dims:
            self.fcs.append(nn.Linear(in_dim, dim))
            in_dim = dim
        self.output_dim = in_dim if fc_dims else channels * resolution * resolution

        for block in self.convs:
            nn.init.kaiming_normal_(block.conv.weight, mode="fan_out", nonlinearity="relu")
            if block.conv.bias is not None:
                nn.init.zeros_(block.conv.bias)
        for fc in self.fcs:
            if fc_init == "c2_xavier":  # Caffe2 "XavierFill" as in Detectron2: uniform, a=1
                nn.init.kaiming_uniform_(fc.weight, a=1)
                nn.init.zeros_(fc.bias)
            else:  # nn.Linear's defaults, drawn after the convs' init as XavierFill is
                fc.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] pooled features -> [R, output_dim]."""
        for conv in self.convs:
            x = conv(x)
        # (R, C', S, S) -> (R, C'*S*S)
        x = torch.flatten(x, start_dim=1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


class FastRCNNPredictor(nn.Module):
    """Linear classifier (K + 1 classes, background last) and box regressor.

    Args:
        in_dim: size of the box head's output vector.
        num_classes: K foreground classes.
        cls_agnostic: one box regression for all classes (``bbox_pred`` outputs 4) instead of 4K.

    Init as Detectron2: weights normal with std 0.01 (classes) and 0.001 (boxes), zero bias (torchvision
    keeps ``nn.Linear``'s defaults here; on the shapes set that trained worse: docs/recipe.md).
    """

    def __init__(self, in_dim: int, num_classes: int, cls_agnostic: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"FastRCNNPredictor: num_classes={num_classes}; need at least one class.")
        self.num_classes = num_classes
        self.cls_agnostic = cls_agnostic
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, 4 if cls_agnostic else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[R, D] (or [R, C, S, S], flattened) -> (logits [R, K+1], deltas [R, 4K] or [R, 4])."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return fp32_forward(self.cls_score, x), fp32_forward(self.bbox_pred, x)  # fp32 under autocast


def _per_class_deltas(box_deltas: Tensor, gt_classes: Tensor) -> Tensor:
    """Pick each row's deltas for its class: [R, 4K] or [R, 4] -> [R, 4]."""
    if box_deltas.shape[1] == 4:
        return box_deltas
    # (R, 4K) -> (R, K, 4)
    deltas = box_deltas.view(box_deltas.shape[0], -1, 4)
    return deltas[torch.arange(deltas.shape[0], device=deltas.device), gt_classes]


def fast_rcnn_losses(
    class_logits: Tensor,
    box_deltas: Tensor,
    gt_classes: Tensor,
    box_targets: Tensor,
    smooth_l1_beta: float = 0.0,
) -> dict[str, Tensor]:
    """Fast R-CNN classification and box-regression losses over the sampled RoIs.

    Args:
        class_logits: [R, K+1] (background last).
        box_deltas: [R, 4K] class-specific or [R, 4] class-agnostic predictions.
        gt_classes: int64 [R] in ``[0, K]``; ``K`` is background.
        box_targets: [R, 4] encoded regression targets (only rows with ``gt_classes < K`` are used).
        smooth_l1_beta: smooth-L1 transition point; 0 means plain L1.

    Returns:
        ``loss_cls`` (cross-entropy averaged over the R RoIs) and ``loss_box_reg``
        (summed over foreground RoIs and divided by R, as torchvision and Detectron2 do).
    """
    num_rois, num_classes_bg = class_logits.shape
    if num_rois == 0:
        zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
        return {"loss_cls": zero, "loss_box_reg": zero.clone()}
    bg_label = num_classes_bg - 1
    loss_cls = F.cross_entropy(class_logits, gt_classes, reduction="mean")

    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < bg_label)).squeeze(1)
    if fg.numel() == 0:  # keep the graph so every parameter gets a (zero) gradient
        loss_box = box_deltas.sum() * 0.0
    else:
        pred = _per_class_deltas(box_deltas[fg], gt_classes[fg]).float()
        target = box_targets[fg].float()
        if smooth_l1_beta == 0.0:
            loss_box = F.l1_loss(pred, target, reduction="sum")
        else:
            loss_box = F.smooth_l1_loss(pred, target, beta=smooth_l1_beta, reduction="sum")
        loss_box = loss_box / num_rois
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box}


def fast_rcnn_inference(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    box_coder: "BoxCoder",
    score_thresh: float,
    nms_thresh: float,
    detections_per_image: int,
    min_box_size: float,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Turn head outputs into detections for every image of the batch at once.

    Same steps (and results) as torchvision's ``RoIHeads.postprocess_detections``: softmax,
    decode each class's box, clip to the image, drop the background column, keep
    ``score > score_thresh``, drop boxes with a side ``< min_box_size``, NMS per class,
    keep the ``detections_per_image`` best. NMS runs once for the batch with
    ``idxs = image_index * K + class`` so no two images or classes suppress each other.

    Args:
        class_logits: [R, K+1] logits, background last.
        box_deltas: [R, 4K] (or [R, 4] class-agnostic).
        proposals: per-image [Ri, 4] boxes that the R rows came from (images in order).
        image_sizes: per-image (h, w) to clip to.
        box_coder: decodes deltas relative to the proposals.

    Returns:
        Per image ``(boxes f32[Di, 4], scores f32[Di], labels i64[Di] in [0, K))``, sorted by
        decreasing score (computed in float32 whatever the inputs' dtype).
    """
    num_images = len(proposals)
    device = class_logits.device
    num_classes = class_logits.shape[1] - 1
    tracing = torch.jit.is_tracing()  # export: sizes are traced tensors, no Python counts
    proposal_boxes = torch.cat(list(proposals), dim=0).float()
    num_rois = proposal_boxes.shape[0]
    # Post-process in fp32 even under autocast: bf16/fp16 boxes would be off by pixels.
    class_logits, box_deltas = class_logits.float(), box_deltas.float()

    scores = F.softmax(class_logits, dim=-1)[:, :num_classes]  # (R, K+1) -> (R, K), background dropped
    boxes = box_coder.decode(box_deltas, proposal_boxes)
    # (R, 4K) -> (R, K, 4); class-agnostic (R, 4) -> (R, 1, 4) -> (R, K, 4)
    boxes = boxes.view(num_rois, boxes.shape[1] // 4, 4).expand(num_rois, num_classes, 4)

    # per image (Ri,) filled with its index -> (R,)
    image_idx = torch.cat([torch.full_like(p[:, 0], i, dtype=torch.int64) for i, p in enumerate(proposals)]).to(device)
    if tracing:  # (h, w) are 0-dim tensors while tracing: keep them in the graph
        sizes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes])
        sizes = sizes.to(dtype=boxes.dtype, device=device)
    else:
        sizes = torch.tensor(list(image_sizes), dtype=boxes.dtype, device=device).view(num_images, 2)
    max_x = sizes[image_idx, 1].view(num_rois, 1)
    max_y = sizes[image_idx, 0].view(num_rois, 1)
    x1 = boxes[..., 0].clamp(min=0).minimum(max_x)
    y1 = boxes[..., 1].clamp(min=0).minimum(max_y)
    x2 = boxes[..., 2].clamp(min=0).minimum(max_x)
    y2 = boxes[..., 3].clamp(min=0).minimum(max_y)
    # 4 x (R, K) -> (R, K, 4) -> (R*K, 4); row-major so each RoI's classes stay together
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4)
    # (K,) -> (R, K) -> (R*K,), shaped like the scores so the count stays dynamic under tracing
    labels = torch.arange(num_classes, device=device).expand_as(scores).reshape(-1)
    scores = scores.reshape(-1)
    image_of = image_idx.repeat_interleave(num_classes)

    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (scores > score_thresh) & (wh >= min_box_size).all(dim=1)
    keep = torch.nonzero(keep).squeeze(1)
    boxes, scores, labels, image_of = boxes[keep], scores[keep], labels[keep], image_of[keep]

    keep = batched_nms(boxes, scores, image_of * num_classes + labels, nms_thresh)  # decreasing score
    if tracing:  # per-image masks instead of a host-side split (whose sizes would be frozen)
        results = []
        for i in range(num_images):
            kept = keep[image_of[keep] == i][:detections_per_image]
            results.append((boxes[kept], scores[kept], labels[kept]))
        return results
    # Stable sort by image keeps each image's detections in decreasing score order.
    image_sorted, order = torch.sort(image_of[keep], stable=True)
    keep = keep[order]
    per_image = torch.bincount(image_sorted, minlength=num_images)
    starts = torch.cumsum(per_image, 0) - per_image
    rank = torch.arange(keep.numel(), device=device) - starts[image_sorted]
    keep = keep[rank < detections_per_image]

    split = per_image.clamp(max=detections_per_image).tolist()
    return list(zip(boxes[keep].split(split), scores[keep].split(split), labels[keep].split(split)))
