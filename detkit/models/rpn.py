"""Region Proposal Network: head, proposal selection and losses."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from ..layers import fp32_forward
from ..structures import Proposals, Targets
from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .matcher import Matcher, subsample_labels

__all__ = ["RPNHead", "RPN", "crowd_overlap"]


class RPNHead(nn.Module):
    """Shared conv tower followed by per-anchor objectness and box-delta predictors.

    Args:
        in_channels: channels of every input feature level.
        num_anchors: anchors per location (the same at every level).
        num_convs: number of 3x3 conv + ReLU layers before the predictors.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1) for _ in range(num_convs)
        )
        self.objectness = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4 * num_anchors, kernel_size=1)
        for layer in [*self.convs, self.objectness, self.anchor_deltas]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits [N, A, Hi, Wi] and deltas [N, 4A, Hi, Wi]."""
        logits, deltas = [], []
        for x in features:
            for conv in self.convs:
                x = F.relu(conv(x), inplace=True)
            logits.append(fp32_forward(self.objectness, x))  # fp32 under autocast
            deltas.append(fp32_forward(self.anchor_deltas, x))
        return logits, deltas


def crowd_overlap(anchors: Tensor, crowd_boxes: Tensor) -> Tensor:
    """Float [N]: the largest intersection-over-anchor-area of each anchor with any crowd box."""
    if crowd_boxes.numel() == 0:
        return anchors.new_zeros(anchors.shape[0])
    crowd_boxes = crowd_boxes.to(anchors)
    lt = torch.max(anchors[:, None, :2], crowd_boxes[None, :, :2])  # (N, M, 2)
    rb = torch.min(anchors[:, None, 2:], crowd_boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (N, M)
    area = (anchors[:, 2:] - anchors[:, :2]).clamp(min=0).prod(dim=1)
    return (inter / area.clamp(min=1e-6)[:, None]).max(dim=1).values


class RPN(nn.Module):
    """Region Proposal Network over several feature levels.

    Args:
        head: the :class:`RPNHead`.
        anchor_generator: anchors for ``in_features`` (same order).
        box_coder: anchor <-> proposal deltas.
        matcher: anchor labelling (e.g. thresholds ``[0.3, 0.7]``, labels ``[0, -1, 1]``).
        in_features: feature names used, e.g. ``["p2", ..., "p6"]``.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: maximum fraction of positives among them.
        pre_nms_topk: ``(train, test)`` top-scoring anchors kept per level and image before NMS.
        post_nms_topk: ``(train, test)`` proposals kept per image after NMS.
        nms_thresh: NMS IoU threshold (applied per level).
        min_size: proposals with a side shorter than this (pixels) are dropped.
        score_thresh: proposals with objectness probability below this are dropped.
        smooth_l1_beta: box loss beta; 0 means L1.
        loss_weight: multiplies both RPN losses.
        crowd_ioa_thresh: anchors whose intersection-over-anchor-area with a crowd box reaches
            this, and that are not positive, are ignored instead of negative.
    """

    def __init__(
        self,
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        box_coder: BoxCoder,
        matcher: Matcher,
        in_features: Sequence[str],
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_topk: tuple[int, int],
        post_nms_topk: tuple[int, int],
        nms_thresh: float,
        min_size: float,
        score_thresh: float,
        smooth_l1_beta: float,
        loss_weight: float,
        crowd_ioa_thresh: float = 0.5,
    ) -> None:
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.matcher = matcher
        self.in_features = list(in_features)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.pre_nms_topk = (int(pre_nms_topk[0]), int(pre_nms_topk[1]))
        self.post_nms_topk = (int(post_nms_topk[0]), int(post_nms_topk[1]))
        self.nms_thresh = float(nms_thresh)
        self.min_size = float(min_size)
        self.score_thresh = float(score_thresh)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loss_weight = float(loss_weight)
        self.crowd_ioa_thresh = float(crowd_ioa_thresh)

    def forward(
        self,
        image_sizes: list[tuple[int, int]],
        features: dict[str, Tensor],
        targets: Optional[list[Targets]] = None,
    ) -> tuple[list[Proposals], dict[str, Tensor]]:
        """Propose regions, and compute the RPN losses when ``targets`` are given.

        Args:
            image_sizes: per image, ``(h, w)`` of the valid (unpadded) area.
            features: feature maps ``[N, C, Hi, Wi]`` by name; ``in_features`` are used.
            targets: per-image ground truth, or None.

        Returns:
            per-image :class:`Proposals` sorted by decreasing objectness (boxes detached), and a
            dict with ``loss_rpn_cls`` and ``loss_rpn_loc`` (empty without targets).
        """
        missing = [k for k in self.in_features if k not in features]
        if missing:
            raise KeyError(f"RPN: features {missing} missing; got {sorted(features)}")
        feats = [features[k] for k in self.in_features]
        anchors = self.anchor_generator(feats)  # per level (Hi*Wi*A, 4)
        logits, deltas = self.head(feats)
        num_images = feats[0].shape[0]
        # (N, A, Hi, Wi) -> (N, Hi, Wi, A) -> (N, Hi*Wi*A)
        logits = [x.permute(0, 2, 3, 1).flatten(1).float() for x in logits]
        # (N, A*4, Hi, Wi) -> (N, A, 4, Hi, Wi) -> (N, Hi, Wi, A, 4) -> (N, Hi*Wi*A, 4)
        deltas = [
            x.view(num_images, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4).float()
            for x in deltas
        ]
        proposals = self._select_proposals(anchors, logits, deltas, image_sizes)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            losses = self._losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), targets)
        return proposals, losses

    @torch.no_grad()
    def _select_proposals(
        self, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Proposals]:
        topk = self.pre_nms_topk[0] if self.training else self.pre_nms_topk[1]
        post = self.post_nms_topk[0] if self.training else self.post_nms_topk[1]
        num_images = logits[0].shape[0]
        device = logits[0].device
        batch_idx = torch.arange(num_images, device=device)[:, None]
        sel_boxes, sel_logits, sel_levels = [], [], []
        for lvl, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            if torch.jit.is_tracing():  # k = min(topk, num_anchors) as a graph value, not a frozen int
                k = torch.as_tensor(lg.shape[1]).clamp(max=topk)
            else:
                k = min(topk, lg.shape[1])
            top_logits, idx = lg.topk(k, dim=1)  # (N, k)
            top_deltas = dl[batch_idx, idx]  # (N, k, 4)
            top_anchors = anc[idx]  # (N, k, 4)
            boxes = self.box_coder.decode(top_deltas.reshape(-1, 4), top_anchors.reshape(-1, 4))
            sel_boxes.append(boxes.view(num_images, -1, 4))  # (N*k, 4) -> (N, k, 4)
            sel_logits.append(top_logits)
            sel_levels.append(torch.full_like(top_logits, lvl, dtype=torch.int64))
        boxes_all = torch.cat(sel_boxes, dim=1)
        logits_all = torch.cat(sel_logits, dim=1)
        levels_all = torch.cat(sel_levels, dim=1)

        results = []
        for boxes, lg, lvl, size in zip(boxes_all, logits_all, levels_all, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            probs = torch.sigmoid(lg)
            wh = boxes[:, 2:] - boxes[:, :2]
            keep = (wh >= self.min_size).all(dim=1) & (probs >= self.score_thresh) & torch.isfinite(boxes).all(dim=1)
            boxes, lg, probs, lvl = boxes[keep], lg[keep], probs[keep], lvl[keep]
            keep = batched_nms(boxes, probs, lvl, self.nms_thresh)[:post]  # sorted by score
            results.append(Proposals(boxes=boxes[keep], objectness=lg[keep]))
        return results

    @torch.no_grad()
    def label_anchors(self, anchors: Tensor, targets: list[Targets]) -> tuple[Tensor, Tensor]:
        """Per image, anchor labels (-1 ignore, 0 negative, 1 positive) and matched GT boxes.

        Returns:
            labels: int8 [N, R]; gt_boxes: float [N, R, 4] (meaningful where labels == 1).
        """
        labels, gt_boxes = [], []
        for t in targets:
            gt = t.boxes.to(anchors)
            matched_idx, lab = self.matcher(box_iou(gt, anchors))
            if t.ignore_boxes.numel() > 0:
                crowd = crowd_overlap(anchors, t.ignore_boxes)
                lab[(crowd >= self.crowd_ioa_thresh) & (lab != 1)] = -1
            labels.append(lab)
            gt_boxes.append(gt[matched_idx] if gt.shape[0] > 0 else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(gt_boxes)

    def _losses(self, anchors: Tensor, logits: Tensor, deltas: Tensor, targets: list[Targets]) -> dict[str, Tensor]:
        labels, gt_boxes = self.label_anchors(anchors, targets)  # (N, R), (N, R, 4)
        sampled = torch.full_like(labels, -1)
        for i in range(labels.shape[0]):
            pos, neg = subsample_labels(labels[i], self.batch_size_per_image, self.positive_fraction, bg_label=0)
            sampled[i, pos] = 1
            sampled[i, neg] = 0
        pos_mask = sampled == 1
        valid = sampled >= 0
        num_sampled = max(int(valid.sum()), 1)

        loss_cls = F.binary_cross_entropy_with_logits(
            logits[valid], sampled[valid].to(logits.dtype), reduction="sum"
        ) / num_sampled
        pos_anchors = anchors[None].expand_as(gt_boxes)[pos_mask]  # (P, 4)
        target_deltas = self.box_coder.encode(gt_boxes[pos_mask], pos_anchors)
        pred = deltas[pos_mask]
        if self.smooth_l1_beta > 0:
            loss_loc = F.smooth_l1_loss(pred, target_deltas, beta=self.smooth_l1_beta, reduction="sum")
        else:
            loss_loc = F.l1_loss(pred, target_deltas, reduction="sum")
        loss_loc = loss_loc / num_sampled
        return {"loss_rpn_cls": loss_cls * self.loss_weight, "loss_rpn_loc": loss_loc * self.loss_weight}
