"""What the standard and Cascade R-CNN RoI heads share: input checks, GT labelling, stage-0 sampling,
the box losses and post-processing, and the mask branch in training and inference.

:class:`ROIHeadsBase` holds the box/mask submodules and the sampling and test-time settings;
:class:`~detkit.models.roi_heads.standard.StandardROIHeads` and
:class:`~detkit.models.roi_heads.cascade.CascadeROIHeads` add their box coder(s) and matcher(s) and
implement ``_forward_train`` / ``_forward_test`` (and ``_label_proposals``, the stage-0 labelling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_area, box_iou

from detkit.structures import Detections, Proposals, Targets

from ..matcher import subsample_labels
from ..poolers import MultiScaleRoIAlign
from .box_head import fast_rcnn_inference, fast_rcnn_losses
from .mask_head import mask_rcnn_inference, mask_rcnn_loss

if TYPE_CHECKING:  # annotations only; instances are passed in by the builder
    from detkit.models.box_coder import BoxCoder
    from detkit.models.matcher import Matcher

__all__ = ["ROIHeadsBase", "SampledRoIs", "ioa", "sampled_rois"]


def ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of ``boxes``: [N, 4] x [M, 4] -> [N, M]."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    return inter / box_area(boxes).clamp(min=1e-6)[:, None]


@dataclass
class SampledRoIs:
    """Training RoIs of one image, positives first.

    Attributes:
        boxes: [S, 4] sampled proposal boxes.
        gt_classes: int64 [S] in [0, K]; K is background.
        matched_idx: int64 [S] index of the matched GT (meaningful for positives).
        gt_boxes: [S, 4] matched GT boxes for positives, the RoI itself for negatives.
        num_pos: number of positives (the first ``num_pos`` rows).
    """

    boxes: Tensor
    gt_classes: Tensor
    matched_idx: Tensor
    gt_boxes: Tensor
    num_pos: int


def sampled_rois(boxes: Tensor, gt_classes: Tensor, matched_idx: Tensor, num_pos: int, target: Targets) -> SampledRoIs:
    """:class:`SampledRoIs` of boxes already ordered positives first (the first ``num_pos`` rows).

    Args:
        boxes: f32 [S, 4] xyxy boxes; gt_classes, matched_idx: int64 [S] their labels and GT indices.
        num_pos: number of positives; target: the image's ground truth (its boxes are the regression
            targets of the positives; negatives regress onto themselves, their targets are unused).
    """
    gt_boxes = boxes.clone()
    if num_pos > 0:
        gt_boxes[:num_pos] = target.boxes.to(boxes)[matched_idx[:num_pos]]
    return SampledRoIs(boxes, gt_classes, matched_idx, gt_boxes, num_pos)


class ROIHeadsBase(nn.Module):
    """Box (and optional mask) branch on pooled FPN features: the part every RoI head shares.

    ``forward(features, proposals, image_sizes, targets)`` checks its inputs and returns ``([], losses)``
    in training (``targets`` given) or ``(detections, {})`` at inference; subclasses implement
    ``_forward_train(feats, proposals, image_sizes, targets) -> dict[str, Tensor]``,
    ``_forward_test(feats, proposals, image_sizes) -> list[Detections]`` and
    ``_label_proposals(boxes, target)`` (the labelling used by :meth:`sample_proposals`).

    Submodules are registered in this order (it is the state_dict's): ``box_pooler``, ``box_head``,
    ``box_predictor``, ``mask_pooler``, ``mask_head``.

    Args:
        box_pooler, box_head, box_predictor, mask_pooler, mask_head: the submodules, as registered (for the
            cascade, ``box_head`` and ``box_predictor`` are ModuleLists of one per stage).
        num_classes: K, the foreground classes (the predictors' ``num_classes``).
        batch_size_per_image, positive_fraction, score_thresh, nms_thresh, detections_per_image, min_box_size,
        smooth_l1_beta, cls_agnostic_bbox_reg, proposal_append_gt, in_features, crowd_ioa_threshold: the
            settings of the same names documented by :class:`StandardROIHeads` and :class:`CascadeROIHeads`.
    """

    def __init__(
        self,
        box_pooler: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_pooler: Optional[MultiScaleRoIAlign],
        mask_head: Optional[nn.Module],
        num_classes: int,
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_image: int,
        min_box_size: float,
        smooth_l1_beta: float,
        cls_agnostic_bbox_reg: bool,
        proposal_append_gt: bool,
        in_features: Sequence[str],
        crowd_ioa_threshold: float,
    ) -> None:
        super().__init__()
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.num_classes = int(num_classes)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_image = int(detections_per_image)
        self.min_box_size = float(min_box_size)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.cls_agnostic_bbox_reg = bool(cls_agnostic_bbox_reg)
        self.proposal_append_gt = bool(proposal_append_gt)
        self.in_features = tuple(in_features)
        self.crowd_ioa_threshold = float(crowd_ioa_threshold)

    def _check_mask_branch(self, mask_pooler: Optional[nn.Module], mask_head: Optional[nn.Module]) -> None:
        """Raise unless both or neither of the mask pooler and head are given (callable before ``__init__``)."""
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError(f"{type(self).__name__}: give both mask_pooler and mask_head, or neither.")

    @property
    def has_mask(self) -> bool:
        """True with a mask branch (Mask R-CNN, Cascade Mask R-CNN)."""
        return self.mask_head is not None

    # ------------------------------------------------------------------ training targets
    def _match(self, boxes: Tensor, target: Targets, matcher: "Matcher") -> tuple[Tensor, Tensor]:
        """Class label (K = background, -1 = ignored) and matched GT index of each box, by ``matcher``.

        Args:
            boxes: f32 [N, 4] xyxy boxes in the image's pixels.
            target: the image's ground truth; non-positive boxes mostly inside a crowd region are ignored.
            matcher: labels each box 1 (positive) / 0 (negative) / -1 (ignored) from the (G, N) IoU.

        Returns:
            int64 [N] labels in [-1, K] and int64 [N] GT indices (meaningful for positives).
        """
        gt_boxes = target.boxes.to(boxes)
        matched_idx, match_labels = matcher(box_iou(gt_boxes, boxes))  # (G, N) IoU
        gt_classes = torch.full_like(matched_idx, self.num_classes)
        pos = match_labels == 1
        gt_classes[pos] = target.labels.to(matched_idx.device)[matched_idx[pos]]
        gt_classes[match_labels == -1] = -1
        crowd = target.ignore_boxes
        if crowd.numel() > 0:
            in_crowd = ioa(boxes, crowd.to(boxes)).max(dim=1).values >= self.crowd_ioa_threshold
            gt_classes[in_crowd & ~pos] = -1
        return gt_classes, matched_idx

    def _label_proposals(self, boxes: Tensor, target: Targets) -> tuple[Tensor, Tensor]:
        """Stage-0 labels and GT indices of the proposals (:meth:`_match` with the first matcher)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_proposals(self, proposals: Sequence[Proposals], targets: Sequence[Targets]) -> list[SampledRoIs]:
        """Match proposals (plus GT boxes if ``proposal_append_gt``) to GT and sample RoIs per image."""
        samples = []
        for props, target in zip(proposals, targets):
            boxes = props.boxes.detach()
            if self.proposal_append_gt and len(target) > 0:
                boxes = torch.cat([boxes, target.boxes.to(boxes)], dim=0)
            gt_classes, matched_idx = self._label_proposals(boxes, target)
            pos_idx, neg_idx = subsample_labels(
                gt_classes, self.batch_size_per_image, self.positive_fraction, self.num_classes
            )
            keep = torch.cat([pos_idx, neg_idx])
            samples.append(sampled_rois(boxes[keep], gt_classes[keep], matched_idx[keep], pos_idx.numel(), target))
        return samples

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: dict[str, Tensor],
        proposals: Sequence[Proposals],
        image_sizes: Sequence[tuple[int, int]],
        targets: Optional[Sequence[Targets]] = None,
    ) -> tuple[list[Detections], dict[str, Tensor]]:
        """Losses (``targets`` given; detections are then ``[]``) or detections (``targets`` None).

        Args:
            features: FPN maps keyed like ``in_features`` (e.g. ``p2``..``p5``), [N, C, Hi, Wi].
            proposals: per image RPN proposals in the padded batch's pixel frame.
            image_sizes: per image (h, w) of the valid region (boxes are clipped to it).
            targets: per image ground truth, or None at inference.
        """
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise KeyError(
                f"{type(self).__name__}: features {missing} (in_features={list(self.in_features)}) are not among the "
                f"given maps {sorted(features)}; set roi_heads.in_features to names the FPN produces."
            )
        feats = [features[f] for f in self.in_features]
        if targets is not None:
            self._check_train_inputs(proposals, image_sizes, targets)
            return [], self._forward_train(feats, proposals, image_sizes, targets)
        self._check_image_sizes(proposals, image_sizes)
        return self._forward_test(feats, proposals, image_sizes), {}

    def _check_image_sizes(self, proposals: Sequence[Proposals], image_sizes: Sequence[tuple[int, int]]) -> None:
        if len(image_sizes) != len(proposals):
            raise ValueError(f"{type(self).__name__}: {len(image_sizes)} image sizes for {len(proposals)} images.")

    def _check_train_inputs(self, proposals: Sequence[Proposals], image_sizes: Sequence[tuple[int, int]],
                            targets: Sequence[Targets]) -> None:
        """One Targets per image, each with GT masks when the model has a mask head."""
        name = type(self).__name__
        if len(targets) != len(proposals):
            raise ValueError(
                f"{name}: {len(targets)} targets for {len(proposals)} images; give one Targets per image."
            )
        if self.mask_head is not None:
            for i, t in enumerate(targets):
                if t.masks is None:
                    raise ValueError(
                        f"{name}: image {i} of the batch has no GT masks (Targets.masks is None) but the "
                        "model has a mask head; load masks in the dataset or set model.meta_architecture: faster_rcnn."
                    )

    def _forward_train(self, feats: list[Tensor], proposals: Sequence[Proposals],
                       image_sizes: Sequence[tuple[int, int]], targets: Sequence[Targets]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _forward_test(self, feats: list[Tensor], proposals: Sequence[Proposals],
                      image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared steps
    def _box_losses(self, class_logits: Tensor, box_deltas: Tensor, samples: Sequence[SampledRoIs], rois: Tensor,
                    box_coder: "BoxCoder") -> dict[str, Tensor]:
        """``loss_cls`` and ``loss_box_reg`` of logits [R, K+1] and deltas [R, 4K or 4] predicted for the
        samples' boxes ``rois`` [R, 4] (all images concatenated), targets encoded by ``box_coder``."""
        gt_classes = torch.cat([s.gt_classes for s in samples], dim=0)
        box_targets = box_coder.encode(torch.cat([s.gt_boxes for s in samples], dim=0), rois)
        return fast_rcnn_losses(class_logits, box_deltas, gt_classes, box_targets, self.smooth_l1_beta)

    def _mask_loss(self, feats: list[Tensor], samples: Sequence[SampledRoIs], targets: Sequence[Targets]) -> Tensor:
        """``loss_mask`` of the mask head on the positives of ``samples`` against the targets' GT masks."""
        assert self.mask_head is not None and self.mask_pooler is not None
        pos_boxes = [s.boxes[: s.num_pos] for s in samples]
        pos_matched = [s.matched_idx[: s.num_pos] for s in samples]
        pos_classes = torch.cat([s.gt_classes[: s.num_pos] for s in samples], dim=0)
        gt_masks = [t.masks for t in targets]
        mask_logits = self.mask_head(self.mask_pooler(feats, pos_boxes))
        return mask_rcnn_loss(mask_logits, pos_boxes, gt_masks, pos_matched, pos_classes,
                              aligned=self.mask_head.target_aligned)

    def _detections(self, feats: list[Tensor], class_logits: Tensor, box_deltas: Tensor, boxes: Sequence[Tensor],
                    image_sizes: Sequence[tuple[int, int]], box_coder: "BoxCoder") -> list[Detections]:
        """Per image detections from logits [R, K+1] and deltas of the per-image ``boxes`` (decoded by
        ``box_coder``, then NMS), with the mask head's f32 [N, 1, M, M] probabilities when it has one."""
        results = fast_rcnn_inference(
            class_logits,
            box_deltas,
            boxes,
            image_sizes,
            box_coder,
            self.score_thresh,
            self.nms_thresh,
            self.detections_per_image,
            self.min_box_size,
        )
        detections = [Detections(boxes=b, scores=s, labels=lab) for b, s, lab in results]
        if self.mask_head is not None:
            assert self.mask_pooler is not None
            mask_logits = self.mask_head(self.mask_pooler(feats, [d.boxes for d in detections]))
            for det, probs in zip(detections, mask_rcnn_inference(mask_logits, [d.labels for d in detections])):
                det.masks = probs
        return detections
