"""Standard RoI heads: sample proposals, run the box head (and mask head), losses or detections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_area, box_iou

from detkit.structures import Detections, Proposals, Targets

from ..matcher import subsample_labels
from ..poolers import MultiScaleRoIAlign
from .box_head import FastRCNNPredictor, fast_rcnn_inference, fast_rcnn_losses
from .mask_head import mask_rcnn_inference, mask_rcnn_loss

if TYPE_CHECKING:  # annotations only; instances are passed in by the builder
    from detkit.models.box_coder import BoxCoder
    from detkit.models.matcher import Matcher

__all__ = ["StandardROIHeads", "SampledRoIs", "ioa"]


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


class StandardROIHeads(nn.Module):
    """Box (and optional mask) branch of Faster/Mask R-CNN on pooled FPN features.

    Training (``targets`` given): GT boxes are appended to the proposals, each proposal
    is matched to a GT by IoU (``proposal_matcher``, e.g. ``Matcher([0.5], [0, 1], False)``),
    proposals that are not positive and lie mostly (IoA >= ``crowd_ioa_threshold``) inside
    a crowd region (``Targets.ignore_boxes``) are ignored, and ``batch_size_per_image``
    RoIs with at most ``positive_fraction`` positives are sampled per image. Losses:
    ``loss_cls``, ``loss_box_reg`` and, with a mask head, ``loss_mask``.

    Inference: boxes, scores and labels per image after per-class NMS; with a mask head,
    ``Detections.masks`` holds f32 [N, 1, M, M] sigmoid probabilities of the predicted class
    (pasting into the image is the detector's job).

    Submodule names: ``box_pooler``, ``box_head`` (``convs``/``fcs``), ``box_predictor``
    (``cls_score``/``bbox_pred``), ``mask_pooler``, ``mask_head`` (``convs``/``deconv``/``predictor``).

    Args:
        box_pooler: pools box features from ``in_features``.
        box_head: pooled features -> vector (e.g. :class:`FastRCNNConvFCHead`).
        box_predictor: :class:`FastRCNNPredictor`; its ``num_classes`` sets K.
        box_coder: encodes/decodes box deltas (weights (10, 10, 5, 5) usually).
        proposal_matcher: labels proposals 1 (positive) / 0 (negative) by IoU.
        batch_size_per_image: RoIs sampled per image in training.
        positive_fraction: maximum fraction of positives among them.
        score_thresh: test-time minimum class score.
        nms_thresh: test-time per-class NMS IoU threshold.
        detections_per_image: test-time maximum detections per image.
        min_box_size: test-time minimum side of a detected box.
        smooth_l1_beta: box-loss smooth-L1 beta; 0 is L1.
        cls_agnostic_bbox_reg: the predictor regresses one box for all classes.
        mask_pooler, mask_head: the mask branch (both or neither).
        proposal_append_gt: add GT boxes to the proposals in training.
        in_features: feature map names given to the poolers, finest first.
        crowd_ioa_threshold: IoA with a crowd region above which non-positive proposals are ignored.
    """

    def __init__(
        self,
        box_pooler: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        box_coder: "BoxCoder",
        proposal_matcher: "Matcher",
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_image: int,
        min_box_size: float,
        smooth_l1_beta: float = 0.0,
        cls_agnostic_bbox_reg: bool = False,
        mask_pooler: Optional[MultiScaleRoIAlign] = None,
        mask_head: Optional[nn.Module] = None,
        proposal_append_gt: bool = True,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        crowd_ioa_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("StandardROIHeads: give both mask_pooler and mask_head, or neither.")
        if cls_agnostic_bbox_reg != getattr(box_predictor, "cls_agnostic", cls_agnostic_bbox_reg):
            raise ValueError(
                f"StandardROIHeads: cls_agnostic_bbox_reg={cls_agnostic_bbox_reg} but the box predictor was "
                f"built with cls_agnostic={box_predictor.cls_agnostic}; build both the same way."
            )
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.box_coder = box_coder
        self.proposal_matcher = proposal_matcher
        self.num_classes = int(box_predictor.num_classes)
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

    @property
    def has_mask(self) -> bool:
        """True for Mask R-CNN."""
        return self.mask_head is not None

    # ------------------------------------------------------------------ training targets
    def _label_proposals(self, boxes: Tensor, target: Targets) -> tuple[Tensor, Tensor]:
        """Class label (K = background, -1 = ignored) and matched GT index of each proposal."""
        gt_boxes = target.boxes.to(boxes)
        iou = box_iou(gt_boxes, boxes)  # (G, N)
        matched_idx, match_labels = self.proposal_matcher(iou)
        gt_classes = torch.full_like(matched_idx, self.num_classes)
        pos = match_labels == 1
        gt_classes[pos] = target.labels.to(matched_idx.device)[matched_idx[pos]]
        gt_classes[match_labels == -1] = -1
        crowd = target.ignore_boxes
        if crowd.numel() > 0:
            in_crowd = ioa(boxes, crowd.to(boxes)).max(dim=1).values >= self.crowd_ioa_threshold
            gt_classes[in_crowd & ~pos] = -1
        return gt_classes, matched_idx

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
            boxes, gt_classes, matched_idx = boxes[keep], gt_classes[keep], matched_idx[keep]
            gt_boxes = boxes.clone()
            num_pos = pos_idx.numel()
            if num_pos > 0:
                gt_boxes[:num_pos] = target.boxes.to(boxes)[matched_idx[:num_pos]]
            samples.append(SampledRoIs(boxes, gt_classes, matched_idx, gt_boxes, num_pos))
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
                f"StandardROIHeads: features {missing} (in_features={list(self.in_features)}) are not among the "
                f"given maps {sorted(features)}; set roi_heads.in_features to names the FPN produces."
            )
        feats = [features[f] for f in self.in_features]
        if targets is not None:
            return [], self._forward_train(feats, proposals, targets)
        return self._forward_test(feats, proposals, image_sizes), {}

    def _forward_train(
        self, feats: list[Tensor], proposals: Sequence[Proposals], targets: Sequence[Targets]
    ) -> dict[str, Tensor]:
        if len(targets) != len(proposals):
            raise ValueError(
                f"StandardROIHeads: {len(targets)} targets for {len(proposals)} images; give one Targets per image."
            )
        if self.mask_head is not None:
            for i, t in enumerate(targets):
                if t.masks is None:
                    raise ValueError(
                        f"StandardROIHeads: image {i} of the batch has no GT masks (Targets.masks is None) but the "
                        "model has a mask head; load masks in the dataset or set model.meta_architecture: faster_rcnn."
                    )
        samples = self.sample_proposals(proposals, targets)
        boxes = [s.boxes for s in samples]
        box_features = self.box_head(self.box_pooler(feats, boxes))
        class_logits, box_deltas = self.box_predictor(box_features)

        proposal_boxes = torch.cat(boxes, dim=0)
        gt_classes = torch.cat([s.gt_classes for s in samples], dim=0)
        box_targets = self.box_coder.encode(torch.cat([s.gt_boxes for s in samples], dim=0), proposal_boxes)
        losses = fast_rcnn_losses(class_logits, box_deltas, gt_classes, box_targets, self.smooth_l1_beta)

        if self.mask_head is not None:
            assert self.mask_pooler is not None
            pos_boxes = [s.boxes[: s.num_pos] for s in samples]
            pos_matched = [s.matched_idx[: s.num_pos] for s in samples]
            pos_classes = torch.cat([s.gt_classes[: s.num_pos] for s in samples], dim=0)
            gt_masks = [t.masks for t in targets]
            mask_logits = self.mask_head(self.mask_pooler(feats, pos_boxes))
            losses["loss_mask"] = mask_rcnn_loss(mask_logits, pos_boxes, gt_masks, pos_matched, pos_classes)
        return losses

    def _forward_test(
        self, feats: list[Tensor], proposals: Sequence[Proposals], image_sizes: Sequence[tuple[int, int]]
    ) -> list[Detections]:
        if len(image_sizes) != len(proposals):
            raise ValueError(
                f"StandardROIHeads: {len(image_sizes)} image sizes for {len(proposals)} images."
            )
        boxes = [p.boxes for p in proposals]
        box_features = self.box_head(self.box_pooler(feats, boxes))
        class_logits, box_deltas = self.box_predictor(box_features)
        results = fast_rcnn_inference(
            class_logits,
            box_deltas,
            boxes,
            image_sizes,
            self.box_coder,
            self.score_thresh,
            self.nms_thresh,
            self.detections_per_image,
            self.min_box_size,
        )
        detections = [Detections(boxes=b, scores=s, labels=lab) for b, s, lab in results]
        if self.mask_head is not None:
            assert self.mask_pooler is not None
            det_boxes = [d.boxes for d in detections]
            mask_logits = self.mask_head(self.mask_pooler(feats, det_boxes))
            for det, probs in zip(detections, mask_rcnn_inference(mask_logits, [d.labels for d in detections])):
                det.masks = probs
        return detections
