"""Cascade R-CNN RoI heads: three box stages of rising IoU threshold, then (optionally) one mask head.

Semantics (Cai & Vasconcelos, "Cascade R-CNN"; as Detectron2's ``CascadeROIHeads``):

* stage ``k`` has its own box head, a class-agnostic :class:`FastRCNNPredictor` (K + 1 scores, 4
  deltas), a :class:`BoxCoder` (weights ``(10, 10, 5, 5)``, ``(20, 20, 10, 10)``, ``(30, 30, 15, 15)``
  usually) and a :class:`Matcher` with one IoU threshold (0.5, 0.6, 0.7) and no low-quality matches;
* training: stage 0 samples RoIs from the proposals (plus the GT boxes) as
  :class:`StandardROIHeads` does; stage ``k + 1`` takes the boxes stage ``k`` regressed from its RoIs,
  detached and clipped to the image, drops the empty ones, and labels them with its own matcher
  (no re-sampling, no GT boxes added). Losses ``loss_cls_stage{k}`` / ``loss_box_reg_stage{k}`` per
  stage, and ``loss_mask`` on the positives of stage 0. The pooled features' gradient is scaled by
  ``1 / num_stages`` in every stage (:class:`ScaleGradient`), so the shared FPN and backbone receive
  the average of the stages' gradients while each head receives its own in full;
* inference: every stage classifies and regresses the boxes of the previous one (clipped, nothing
  dropped, so rows stay aligned); the class probabilities are averaged over the stages and the boxes
  are the last stage's regression of the last stage's input boxes; the mask head runs on the final
  detections.

Submodule names (the Detectron2 conversion maps onto them): ``box_pooler``, ``box_head.{k}``
(:class:`FastRCNNConvFCHead`: ``convs`` / ``fcs``), ``box_predictor.{k}`` (``cls_score`` /
``bbox_pred``), ``mask_pooler``, ``mask_head``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.structures import Detections, Proposals, Targets

from ..poolers import MultiScaleRoIAlign
from .base import ROIHeadsBase, SampledRoIs, sampled_rois
from .box_head import FastRCNNPredictor

if TYPE_CHECKING:  # annotations only; instances are passed in by the builder
    from detkit.models.box_coder import BoxCoder
    from detkit.models.matcher import Matcher

__all__ = ["CascadeROIHeads", "ScaleGradient", "clip_boxes", "average_stage_scores"]

# log() of an averaged probability of exactly 0 would be -inf; this floor changes no score above ~1e-30
_PROB_FLOOR = 1e-30


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def clip_boxes(boxes: Tensor, image_size: tuple[Any, Any]) -> Tensor:
    """Clamp xyxy boxes [N, 4] into ``[0, w] x [0, h]``; ``image_size`` is (h, w), ints or (while
    tracing for export) 0-dim tensors, which stay in the graph."""
    h, w = image_size
    # traced sizes stay the graph's tensors; plain ints become tensors on the boxes' device
    limits = torch.stack([v if isinstance(v, Tensor) else torch.tensor(v, device=boxes.device) for v in (w, h, w, h)])
    return torch.minimum(boxes.clamp(min=0), limits.to(dtype=boxes.dtype, device=boxes.device))


def _split(x: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Rows of ``x`` split into consecutive parts with as many rows as each tensor of ``like``."""
    if torch.jit.is_tracing():  # slice with the traced sizes (split would freeze the counts)
        out, start = [], 0
        for part in like:
            end = start + part.shape[0]
            out.append(x[start:end])
            start = end
        return out
    return list(x.split([int(p.shape[0]) for p in like], dim=0))


def average_stage_scores(stage_logits: Sequence[Tensor]) -> Tensor:
    """f32 [R, K+1] mean over the stages of ``softmax(logits)`` (each [R, K+1], rows aligned)."""
    probs = [F.softmax(logits.float(), dim=-1) for logits in stage_logits]
    return torch.stack(probs).sum(dim=0) * (1.0 / len(probs))


class CascadeROIHeads(ROIHeadsBase):
    """Cascade (Mask) R-CNN box stages and optional mask branch on pooled FPN features.

    Same call and results as :class:`StandardROIHeads`: ``forward(features, proposals, image_sizes,
    targets)`` returns ``([], losses)`` in training (``targets`` given) and ``(detections, {})`` at
    inference, with ``Detections.masks`` f32 [N, 1, M, M] probabilities of the predicted class.

    Args:
        box_pooler: pools box features from ``in_features`` (shared by the stages).
        box_heads: one box head per stage (e.g. :class:`FastRCNNConvFCHead`).
        box_predictors: one class-agnostic :class:`FastRCNNPredictor` per stage, all with the same K.
        box_coders: one :class:`BoxCoder` per stage (its regression weights).
        proposal_matchers: one :class:`Matcher` per stage, labelling boxes 1 (positive) / 0 (negative).
        batch_size_per_image: RoIs sampled per image for stage 0 in training.
        positive_fraction: maximum fraction of positives among them.
        score_thresh: test-time minimum (averaged) class score.
        nms_thresh: test-time per-class NMS IoU threshold.
        detections_per_image: test-time maximum detections per image.
        min_box_size: test-time minimum side of a detected box.
        smooth_l1_beta: box-loss smooth-L1 beta; 0 is L1.
        mask_pooler, mask_head: the mask branch (both or neither).
        proposal_append_gt: add GT boxes to the stage-0 proposals in training.
        in_features: feature map names given to the poolers, finest first.
        crowd_ioa_threshold: IoA with a crowd region above which non-positive boxes are ignored.
    """

    def __init__(
        self,
        box_pooler: MultiScaleRoIAlign,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[FastRCNNPredictor],
        box_coders: Sequence["BoxCoder"],
        proposal_matchers: Sequence["Matcher"],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_image: int,
        min_box_size: float,
        smooth_l1_beta: float = 0.0,
        mask_pooler: Optional[MultiScaleRoIAlign] = None,
        mask_head: Optional[nn.Module] = None,
        proposal_append_gt: bool = True,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        crowd_ioa_threshold: float = 0.5,
    ) -> None:
        counts = {len(box_heads), len(box_predictors), len(box_coders), len(proposal_matchers)}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                f"CascadeROIHeads: need one box head, predictor, coder and matcher per stage, got {len(box_heads)}, "
                f"{len(box_predictors)}, {len(box_coders)} and {len(proposal_matchers)}."
            )
        self._check_mask_branch(mask_pooler, mask_head)
        if not all(getattr(p, "cls_agnostic", False) for p in box_predictors):
            raise ValueError("CascadeROIHeads: every box predictor must be class-agnostic (cls_agnostic=True).")
        classes = {int(p.num_classes) for p in box_predictors}
        if len(classes) != 1:
            raise ValueError(f"CascadeROIHeads: the stages' predictors have different class counts {sorted(classes)}.")
        super().__init__(
            box_pooler, nn.ModuleList(box_heads), nn.ModuleList(box_predictors), mask_pooler, mask_head,
            classes.pop(), batch_size_per_image, positive_fraction, score_thresh, nms_thresh, detections_per_image,
            min_box_size, smooth_l1_beta, True, proposal_append_gt, in_features, crowd_ioa_threshold,
        )
        self.box_coders = list(box_coders)
        self.proposal_matchers = list(proposal_matchers)
        self.num_stages = len(box_heads)

    def class_layers(self) -> tuple[str, ...]:
        """Names (relative to this module) of the layers whose shapes depend on the class count."""
        layers = [f"box_predictor.{k}.cls_score" for k in range(self.num_stages)]
        return tuple(layers + (["mask_head.predictor"] if self.mask_head is not None else []))

    # ------------------------------------------------------------------ training targets
    def label_boxes(self, boxes: Tensor, target: Targets, stage: int) -> tuple[Tensor, Tensor]:
        """Class label (K = background, -1 = ignored) and matched GT index of each box, by ``stage``'s matcher.

        Args:
            boxes: f32 [N, 4] xyxy boxes in the image's pixels.
            target: the image's ground truth; non-positive boxes mostly inside a crowd region are ignored.

        Returns:
            int64 [N] labels in [-1, K] and int64 [N] GT indices (meaningful for positives).
        """
        return self._match(boxes, target, self.proposal_matchers[stage])

    def _rois(self, boxes: Tensor, gt_classes: Tensor, matched_idx: Tensor, target: Targets) -> SampledRoIs:
        """The labelled boxes as :class:`SampledRoIs` (positives first, ignored ones dropped)."""
        bg = self.num_classes
        pos = torch.nonzero((gt_classes >= 0) & (gt_classes != bg)).squeeze(1)
        neg = torch.nonzero(gt_classes == bg).squeeze(1)
        keep = torch.cat([pos, neg])
        return sampled_rois(boxes[keep], gt_classes[keep], matched_idx[keep], pos.numel(), target)

    def _label_proposals(self, boxes: Tensor, target: Targets) -> tuple[Tensor, Tensor]:
        """Stage 0's labels of the proposals (plus GT boxes); :meth:`sample_proposals` then samples RoIs."""
        return self.label_boxes(boxes, target, 0)

    @torch.no_grad()
    def relabel(self, boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[Targets], stage: int) -> list[SampledRoIs]:
        """Stage ``stage`` >= 1: the previous stage's regressed boxes, detached, clipped to the image and
        without empty ones, labelled by this stage's matcher (all kept: no sampling, no GT added)."""
        out = []
        for b, size, target in zip(boxes, image_sizes, targets):
            b = clip_boxes(b.detach(), size)
            wh = b[:, 2:] - b[:, :2]
            b = b[(wh > 0).all(dim=1)]
            gt_classes, matched_idx = self.label_boxes(b, target, stage)
            out.append(self._rois(b, gt_classes, matched_idx, target))
        return out

    # ------------------------------------------------------------------ forward
    def run_stage(self, feats: list[Tensor], boxes: Sequence[Tensor], stage: int) -> tuple[Tensor, Tensor]:
        """Logits [R, K+1] and class-agnostic deltas [R, 4] of ``stage`` for the per-image boxes."""
        x = self.box_pooler(feats, list(boxes))
        if self.training and torch.is_grad_enabled():
            x = ScaleGradient.apply(x, 1.0 / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](x))

    def _check_train_inputs(self, proposals: Sequence[Proposals], image_sizes: Sequence[tuple[int, int]],
                            targets: Sequence[Targets]) -> None:
        """The image sizes too (the stages' boxes are clipped to them in training), then the targets."""
        self._check_image_sizes(proposals, image_sizes)
        super()._check_train_inputs(proposals, image_sizes, targets)

    def _forward_train(self, feats: list[Tensor], proposals: Sequence[Proposals],
                       image_sizes: Sequence[tuple[int, int]], targets: Sequence[Targets]) -> dict[str, Tensor]:
        first = samples = self.sample_proposals(proposals, targets)
        losses: dict[str, Tensor] = {}
        next_boxes: list[Tensor] = []  # per image, the boxes the current stage regressed
        for k in range(self.num_stages):
            if k > 0:
                samples = self.relabel(next_boxes, image_sizes, targets, k)
            boxes = [s.boxes for s in samples]
            class_logits, box_deltas = self.run_stage(feats, boxes, k)
            rois = torch.cat(boxes, dim=0)
            coder = self.box_coders[k]
            stage = self._box_losses(class_logits, box_deltas, samples, rois, coder)
            losses.update({f"{name}_stage{k}": value for name, value in stage.items()})
            if k + 1 < self.num_stages:
                next_boxes = _split(coder.decode(box_deltas.detach(), rois), boxes)

        if self.mask_head is not None:  # on the positives of stage 0, as Detectron2
            losses["loss_mask"] = self._mask_loss(feats, first, targets)
        return losses

    def _forward_test(self, feats: list[Tensor], proposals: Sequence[Proposals],
                      image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        boxes = [p.boxes for p in proposals]
        stage_logits, box_deltas = [], None
        for k in range(self.num_stages):
            if box_deltas is not None:  # stage k > 0: the previous stage's boxes, clipped, rows kept aligned
                decoded = self.box_coders[k - 1].decode(box_deltas, torch.cat(boxes, dim=0))
                boxes = [clip_boxes(b, size) for b, size in zip(_split(decoded, boxes), image_sizes)]
            class_logits, box_deltas = self.run_stage(feats, boxes, k)
            stage_logits.append(class_logits)
        scores = average_stage_scores(stage_logits)
        # fast_rcnn_inference takes logits: softmax(log p) = p for rows of p summing to 1
        log_probs = torch.log(scores.clamp(min=_PROB_FLOOR))
        return self._detections(feats, log_probs, box_deltas, boxes, image_sizes, self.box_coders[-1])
