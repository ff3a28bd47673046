"""Standard RoI heads: sample proposals, run the box head (and mask head), losses or detections."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor, nn

from detkit.structures import Detections, Proposals, Targets

from ..poolers import MultiScaleRoIAlign
from .base import ROIHeadsBase, SampledRoIs, ioa
from .box_head import FastRCNNPredictor

if TYPE_CHECKING:  # annotations only; instances are passed in by the builder
    from detkit.models.box_coder import BoxCoder
    from detkit.models.matcher import Matcher

__all__ = ["StandardROIHeads", "SampledRoIs", "ioa"]


class StandardROIHeads(ROIHeadsBase):
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
        self._check_mask_branch(mask_pooler, mask_head)
        if cls_agnostic_bbox_reg != getattr(box_predictor, "cls_agnostic", cls_agnostic_bbox_reg):
            raise ValueError(
                f"StandardROIHeads: cls_agnostic_bbox_reg={cls_agnostic_bbox_reg} but the box predictor was "
                f"built with cls_agnostic={box_predictor.cls_agnostic}; build both the same way."
            )
        super().__init__(
            box_pooler, box_head, box_predictor, mask_pooler, mask_head, int(box_predictor.num_classes),
            batch_size_per_image, positive_fraction, score_thresh, nms_thresh, detections_per_image, min_box_size,
            smooth_l1_beta, cls_agnostic_bbox_reg, proposal_append_gt, in_features, crowd_ioa_threshold,
        )
        self.box_coder = box_coder
        self.proposal_matcher = proposal_matcher

    # ------------------------------------------------------------------ training
    def _label_proposals(self, boxes: Tensor, target: Targets) -> tuple[Tensor, Tensor]:
        """Class label (K = background, -1 = ignored) and matched GT index of each proposal."""
        return self._match(boxes, target, self.proposal_matcher)

    def _forward_train(self, feats: list[Tensor], proposals: Sequence[Proposals],
                       image_sizes: Sequence[tuple[int, int]], targets: Sequence[Targets]) -> dict[str, Tensor]:
        samples = self.sample_proposals(proposals, targets)
        boxes = [s.boxes for s in samples]
        class_logits, box_deltas = self.box_predictor(self.box_head(self.box_pooler(feats, boxes)))
        losses = self._box_losses(class_logits, box_deltas, samples, torch.cat(boxes, dim=0), self.box_coder)
        if self.mask_head is not None:
            losses["loss_mask"] = self._mask_loss(feats, samples, targets)
        return losses

    # ------------------------------------------------------------------ inference
    def _forward_test(self, feats: list[Tensor], proposals: Sequence[Proposals],
                      image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        boxes = [p.boxes for p in proposals]
        class_logits, box_deltas = self.box_predictor(self.box_head(self.box_pooler(feats, boxes)))
        return self._detections(feats, class_logits, box_deltas, boxes, image_sizes, self.box_coder)
