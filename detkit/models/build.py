"""Build a :class:`TwoStageDetector` from a :class:`DetectionConfig`, in explicit code."""

from __future__ import annotations

import logging
from typing import Union

from ..config.schema import DetectionConfig, ModelConfig
from .anchors import AnchorGenerator
from .backbones.resnet import build_resnet
from .box_coder import BoxCoder
from .detector import TwoStageDetector
from .matcher import Matcher
from .necks.fpn import FPN, BackboneWithFPN
from .poolers import MultiScaleRoIAlign
from .roi_heads.box_head import FastRCNNConvFCHead, FastRCNNPredictor
from .roi_heads.cascade import CascadeROIHeads
from .roi_heads.mask_head import MaskRCNNHead
from .roi_heads.standard import StandardROIHeads
from .rpn import RPN, RPNHead

__all__ = ["build_detector", "build_backbone", "build_rpn", "build_roi_heads"]

logger = logging.getLogger("detkit")


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """ResNet (``model.backbone``) + FPN (``model.fpn``)."""
    b = cfg.backbone
    bottom_up = build_resnet(
        b.name,
        norm=b.norm,
        freeze_at=b.freeze_at,
        stride_in_1x1=b.stride_in_1x1,
        zero_init_residual=b.zero_init_residual,
        out_features=tuple(b.out_features),
        shortcut=b.shortcut,
    )
    fpn = FPN(bottom_up.output_specs, out_channels=cfg.fpn.out_channels, norm=cfg.fpn.norm, top_block=cfg.fpn.top_block)
    return BackboneWithFPN(bottom_up, fpn)


def _specs_for(backbone: BackboneWithFPN, names: list[str], key: str) -> list:
    missing = [n for n in names if n not in backbone.output_specs]
    if missing:
        raise ValueError(
            f"model.{key}: features {missing} are not produced by the backbone (it gives "
            f"{list(backbone.output_specs)}); fix model.{key} or model.backbone.out_features/model.fpn.top_block"
        )
    return [backbone.output_specs[n] for n in names]


def build_rpn(cfg: ModelConfig, backbone: BackboneWithFPN) -> RPN:
    """RPN from ``model.anchors`` and ``model.rpn``.

    ``anchors.round_base`` selects torchvision's anchor conventions as a whole: rounded cell
    anchors and strides computed from the padded image size (see :class:`AnchorGenerator`).
    """
    r, a = cfg.rpn, cfg.anchors
    specs = _specs_for(backbone, r.in_features, "rpn.in_features")
    channels = {s.channels for s in specs}
    if len(channels) != 1:
        raise ValueError(f"model.rpn.in_features {r.in_features} have different channel counts {sorted(channels)}")
    anchor_generator = AnchorGenerator(
        sizes=a.sizes,
        aspect_ratios=a.aspect_ratios,
        strides=[s.stride for s in specs],
        offset=a.offset,
        round_base=a.round_base,
        torchvision_strides=a.round_base,
    )
    num_anchors = set(anchor_generator.num_anchors)
    if len(num_anchors) != 1:
        raise ValueError(
            f"model.anchors: every level needs the same number of anchors per location (sizes x ratios), got "
            f"{anchor_generator.num_anchors}"
        )
    lo, hi = r.iou_thresholds
    return RPN(
        head=RPNHead(channels.pop(), num_anchors.pop(), num_convs=r.num_convs),
        anchor_generator=anchor_generator,
        box_coder=BoxCoder(r.bbox_reg_weights),
        matcher=Matcher([lo, hi], [0, -1, 1], allow_low_quality_matches=r.allow_low_quality_matches),
        in_features=r.in_features,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
        post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test),
        nms_thresh=r.nms_thresh,
        min_size=r.min_size,
        score_thresh=r.score_thresh,
        smooth_l1_beta=r.smooth_l1_beta,
        loss_weight=r.loss_weight,
    )


def _box_head(cfg: ModelConfig, in_channels: int) -> FastRCNNConvFCHead:
    h = cfg.roi_heads.box_head
    if h.type == "2fc":
        conv_dims, fc_dims = (), (h.fc_dim, h.fc_dim)
    else:  # "4conv1fc"
        conv_dims, fc_dims = (h.conv_dim,) * 4, (h.fc_dim,)
    return FastRCNNConvFCHead(in_channels, h.pooler_resolution, conv_dims=conv_dims, fc_dims=fc_dims, norm=h.norm,
                              fc_init=h.fc_init)


def build_roi_heads(
    cfg: ModelConfig, backbone: BackboneWithFPN, num_classes: int
) -> Union[StandardROIHeads, CascadeROIHeads]:
    """Box head(s) (and mask head for ``mask_rcnn``) from ``model.roi_heads``.

    ``roi_heads.name: standard`` builds :class:`StandardROIHeads`; ``cascade`` builds
    :class:`CascadeROIHeads` with one box head, class-agnostic predictor, box coder
    (``cascade.bbox_reg_weights[k]``) and matcher (``cascade.iou_thresholds[k]``, no low-quality
    matches) per stage; ``box_head.bbox_reg_weights`` is then unused.
    """
    rh = cfg.roi_heads
    bh, mh = rh.box_head, rh.mask_head
    specs = _specs_for(backbone, rh.in_features, "roi_heads.in_features")
    channels = {s.channels for s in specs}
    if len(channels) != 1:
        raise ValueError(f"model.roi_heads.in_features {rh.in_features} have different channel counts")
    in_channels = channels.pop()
    scales = [1.0 / s.stride for s in specs]
    box_pooler = MultiScaleRoIAlign(
        bh.pooler_resolution, scales, bh.pooler_sampling_ratio, bh.pooler_aligned,
        canonical_box_size=rh.canonical_box_size, canonical_level=rh.canonical_level,
    )
    # the box heads are made before the mask head: the order of the random initialization (seeded runs)
    num_box_heads = len(rh.cascade.iou_thresholds) if rh.name == "cascade" else 1
    box_heads = [_box_head(cfg, in_channels) for _ in range(num_box_heads)]
    mask_pooler = mask_head = None
    if cfg.meta_architecture == "mask_rcnn":
        mask_pooler = MultiScaleRoIAlign(
            mh.pooler_resolution, scales, mh.pooler_sampling_ratio, mh.pooler_aligned,
            canonical_box_size=rh.canonical_box_size, canonical_level=rh.canonical_level,
        )
        mask_head = MaskRCNNHead(in_channels, num_classes, conv_dims=(mh.conv_dim,) * mh.num_conv, norm=mh.norm,
                                 target_aligned=mh.target_aligned)
    common = dict(
        batch_size_per_image=rh.batch_size_per_image,
        positive_fraction=rh.positive_fraction,
        score_thresh=rh.score_thresh_test,
        nms_thresh=rh.nms_thresh_test,
        detections_per_image=rh.detections_per_image,
        min_box_size=rh.min_box_size_test,
        smooth_l1_beta=bh.smooth_l1_beta,
        mask_pooler=mask_pooler,
        mask_head=mask_head,
        in_features=rh.in_features,
    )
    if rh.name == "cascade":
        if not bh.cls_agnostic_bbox_reg:  # the schema refuses it; models built from code reach here
            raise ValueError("model.roi_heads.box_head.cls_agnostic_bbox_reg must be true with roi_heads.name=cascade")
        stages = list(zip(rh.cascade.iou_thresholds, rh.cascade.bbox_reg_weights))
        return CascadeROIHeads(
            box_pooler=box_pooler,
            box_heads=box_heads,
            box_predictors=[FastRCNNPredictor(h.output_dim, num_classes, cls_agnostic=True) for h in box_heads],
            box_coders=[BoxCoder(weights) for _, weights in stages],
            proposal_matchers=[Matcher([iou], [0, 1], allow_low_quality_matches=False) for iou, _ in stages],
            **common,
        )
    (box_head,) = box_heads
    return StandardROIHeads(
        box_pooler=box_pooler,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(box_head.output_dim, num_classes, cls_agnostic=bh.cls_agnostic_bbox_reg),
        box_coder=BoxCoder(bh.bbox_reg_weights),
        proposal_matcher=Matcher([rh.iou_threshold], [0, 1], allow_low_quality_matches=False),
        cls_agnostic_bbox_reg=bh.cls_agnostic_bbox_reg,
        **common,
    )


def build_detector(cfg: DetectionConfig, num_classes: int) -> TwoStageDetector:
    """Build Faster/Mask R-CNN (or their Cascade versions) from ``cfg.model`` with ``num_classes`` foreground classes.

    Builds only: the model has its fresh initialization. ``model.backbone.weights`` and
    ``model.weights`` are loaded afterwards by :func:`detkit.checkpoint.load_initial_weights`.
    """
    m = cfg.model
    if num_classes is None or int(num_classes) < 1:
        raise ValueError(f"build_detector: num_classes must be >= 1, got {num_classes} (set model.num_classes)")
    if m.num_classes is not None and m.num_classes != num_classes:
        raise ValueError(
            f"build_detector: model.num_classes={m.num_classes} but num_classes={num_classes} was given "
            "(e.g. from the dataset); make them agree or leave model.num_classes unset"
        )
    if m.size_divisibility % 32 != 0 and m.size_divisibility != 0:
        logger.warning("model.size_divisibility=%d is not a multiple of 32 (the largest FPN stride)", m.size_divisibility)
    backbone = build_backbone(m)
    model = TwoStageDetector(
        backbone=backbone,
        rpn=build_rpn(m, backbone),
        roi_heads=build_roi_heads(m, backbone, int(num_classes)),
        pixel_mean=m.pixel_mean,
        pixel_std=m.pixel_std,
        input_format=m.input_format,
        size_divisibility=m.size_divisibility,
        mask_threshold=m.mask_threshold,
        mask_paste=m.mask_paste,
    )
    return model
