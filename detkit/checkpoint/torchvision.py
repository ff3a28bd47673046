"""The torchvision checkpoint formats: ResNet classifiers and Faster / Mask R-CNN ResNet-FPN detectors.

:data:`CLASSIFICATION` and :data:`DETECTION` recognize and convert them to detkit keys.

Key mapping (``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` v1 and their ``_v2`` versions;
current and legacy layouts). The legacy rows are the keys of files saved before torchvision's
``_version = 2`` modules, which its ``_load_from_state_dict`` hooks rename on load (FPN blocks, RPN
conv, mask head convs); here they are converted directly. v2 adds BatchNorm after the FPN convs
(``.1.*``, the convs then have no bias), a second RPN conv, a 4conv1fc box head with BatchNorm and
BatchNorm in the mask head; BN statistics and ``num_batches_tracked`` are converted like weights.

==========================================================  =============================================
torchvision                                                 detkit
==========================================================  =============================================
``backbone.body.*``                                         ``backbone.bottom_up.*`` (ResNet converter)
``backbone.fpn.inner_blocks.{i}.0`` / ``.1`` (v2 norm)      ``backbone.fpn.lateral_convs.{i}.conv`` / ``.norm``
``backbone.fpn.layer_blocks.{i}.0`` / ``.1`` (v2 norm)      ``backbone.fpn.output_convs.{i}.conv`` / ``.norm``
``backbone.fpn.inner_blocks.{i}.weight`` (legacy)           ``backbone.fpn.lateral_convs.{i}.conv.weight``
``rpn.head.conv.weight`` (legacy)                           ``rpn.head.convs.0.weight``
``rpn.head.conv.{i}.0.weight`` (v1: i = 0; v2: i = 0, 1)      ``rpn.head.convs.{i}.weight``
``rpn.head.cls_logits`` / ``rpn.head.bbox_pred``            ``rpn.head.objectness`` / ``rpn.head.anchor_deltas``
``roi_heads.box_head.fc6`` / ``fc7``                        ``roi_heads.box_head.fcs.0`` / ``fcs.1``
``roi_heads.box_head.{i}.0`` / ``.1`` (v2 conv / norm)      ``roi_heads.box_head.convs.{i}.conv`` / ``.norm``
``roi_heads.box_head.{i}`` (v2 Linear)                      ``roi_heads.box_head.fcs.{j}``
``roi_heads.box_predictor.cls_score``                       same name; background row moved last
``roi_heads.box_predictor.bbox_pred``                       same name; background rows dropped
``roi_heads.mask_head.{i}.0`` / legacy ``mask_fcn{i+1}``     ``roi_heads.mask_head.convs.{i}.conv``
``roi_heads.mask_head.{i}.1`` (v2 norm)                     ``roi_heads.mask_head.convs.{i}.norm``
``roi_heads.mask_predictor.conv5_mask``                     ``roi_heads.mask_head.deconv``
``roi_heads.mask_predictor.mask_fcn_logits``                ``roi_heads.mask_head.predictor``; background dropped
==========================================================  =============================================

torchvision puts the background at class index 0; detkit puts it last in ``cls_score`` and has
none in ``bbox_pred`` and the mask predictor, so detkit label = torchvision label - 1.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from .base import ForeignFormat
from .conventions import TORCHVISION, InputConvention

__all__ = [
    "CLASSIFICATION",
    "DETECTION",
    "DETECTION_V2",
    "convert_torchvision_detection",
    "convert_torchvision_fpn",
    "convert_torchvision_resnet",
]


_TV_LAYER = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def convert_torchvision_resnet(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision ResNet keys to detkit's.

    ``conv1/bn1`` -> ``stem.conv1/stem.bn1``; ``layer{k}.{i}.*`` -> ``res{k+1}.{i}.*`` with
    ``downsample.0/1`` -> ``shortcut.conv/shortcut.norm``; ``fc.*`` keeps its name (the
    classifier head). Other keys are passed through unchanged. Values are not copied.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        if key.startswith(("conv1.", "bn1.")):
            new = "stem." + key
        else:
            m = _TV_LAYER.match(key)
            if m:
                stage, idx, rest = m.groups()
                rest = re.sub(r"^downsample\.0\.", "shortcut.conv.", rest)
                rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
                new = f"res{int(stage) + 1}.{idx}.{rest}"
        out[new] = value
    return out


_TV_FPN = re.compile(r"^(inner_blocks|layer_blocks)\.(\d+)\.(?:(\d+)\.)?(weight|bias|running_mean|"
                     r"running_var|num_batches_tracked)$")


def convert_torchvision_fpn(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``torchvision.ops.FeaturePyramidNetwork`` keys to :class:`FPN` keys.

    ``inner_blocks.{i}.0.*`` (and the pre-0.13 ``inner_blocks.{i}.*``) ->
    ``lateral_convs.{i}.conv.*``; ``.1.*`` (a norm layer) -> ``.norm.*``; likewise
    ``layer_blocks`` -> ``output_convs``; ``extra_blocks.*`` -> ``top_block.*``.
    Other keys pass through unchanged.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key
        m = _TV_FPN.match(key)
        if m:
            block, idx, sub, leaf = m.groups()
            target = "lateral_convs" if block == "inner_blocks" else "output_convs"
            part = "norm" if sub == "1" else "conv"
            if sub not in (None, "0", "1"):
                part = sub  # unknown layout: keep the index so it is reported, not silently lost
            new = f"{target}.{idx}.{part}.{leaf}"
        elif key.startswith("extra_blocks."):
            new = "top_block." + key[len("extra_blocks."):]
        out[new] = value
    return out

_RPN_CONV_OLD = re.compile(r"^rpn\.head\.conv\.(weight|bias)$")
_RPN_CONV_NEW = re.compile(r"^rpn\.head\.conv\.(\d+)\.0\.(weight|bias)$")
_MASK_FCN_OLD = re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(.+)$")
_SEQ_BLOCK = re.compile(r"^roi_heads\.(mask_head|box_head)\.(\d+)\.([01])\.(.+)$")
_SEQ_LINEAR = re.compile(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$")
_BOX_FC_OLD = re.compile(r"^roi_heads\.box_head\.fc(6|7)\.(weight|bias)$")


def _background_last(t: Tensor) -> Tensor:
    """[K+1, ...] rows with background first -> background last."""
    return torch.cat([t[1:], t[:1]], dim=0)


def _sub_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def convert_torchvision_detection(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and re-order class rows of) a torchvision Faster/Mask R-CNN ResNet-FPN state dict.

    Args:
        state_dict: e.g. ``torchvision.models.detection.maskrcnn_resnet50_fpn(...).state_dict()``.

    Returns:
        a new dict with detkit :class:`TwoStageDetector` keys. Keys it does not know are passed
        through unchanged, so :func:`detkit.load_weights` reports them instead of losing them.
    """
    out: dict[str, Tensor] = {}
    for k, v in convert_torchvision_resnet(_sub_prefix(state_dict, "backbone.body.")).items():
        out["backbone.bottom_up." + k] = v
    for k, v in convert_torchvision_fpn(_sub_prefix(state_dict, "backbone.fpn.")).items():
        out["backbone.fpn." + k] = v

    # v2 box head: Linear layers sit at arbitrary Sequential indices; number them in order
    linear_idx = sorted({int(m.group(1)) for k in state_dict if (m := _SEQ_LINEAR.match(k))})
    fc_of = {i: j for j, i in enumerate(linear_idx)}

    for key, value in state_dict.items():
        if key.startswith(("backbone.body.", "backbone.fpn.")):
            continue
        new, val = key, value
        if m := _RPN_CONV_OLD.match(key):
            new = f"rpn.head.convs.0.{m.group(1)}"
        elif m := _RPN_CONV_NEW.match(key):
            new = f"rpn.head.convs.{m.group(1)}.{m.group(2)}"
        elif key.startswith("rpn.head.cls_logits."):
            new = "rpn.head.objectness." + key[len("rpn.head.cls_logits."):]
        elif key.startswith("rpn.head.bbox_pred."):
            new = "rpn.head.anchor_deltas." + key[len("rpn.head.bbox_pred."):]
        elif m := _BOX_FC_OLD.match(key):
            new = f"roi_heads.box_head.fcs.{int(m.group(1)) - 6}.{m.group(2)}"
        elif m := _SEQ_LINEAR.match(key):
            new = f"roi_heads.box_head.fcs.{fc_of[int(m.group(1))]}.{m.group(2)}"
        elif m := _SEQ_BLOCK.match(key):
            head, idx, part, leaf = m.groups()
            new = f"roi_heads.{head}.convs.{idx}.{'conv' if part == '0' else 'norm'}.{leaf}"
        elif m := _MASK_FCN_OLD.match(key):
            new = f"roi_heads.mask_head.convs.{int(m.group(1)) - 1}.conv.{m.group(2)}"
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            val = _background_last(value)
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            # (4*(K+1), ...) -> (4K, ...): drop the background's 4 rows (class-agnostic 8 -> 4 likewise)
            val = value[4:]
        elif key.startswith("roi_heads.mask_predictor.conv5_mask."):
            new = "roi_heads.mask_head.deconv." + key[len("roi_heads.mask_predictor.conv5_mask."):]
        elif key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
            new = "roi_heads.mask_head.predictor." + key[len("roi_heads.mask_predictor.mask_fcn_logits."):]
            val = value[1:]
        out[new] = val
    return out


def _is_detection(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("backbone.body.") for k in state_dict)


def _is_detection_v2(state_dict: Mapping[str, Tensor]) -> bool:
    """The v2 models (``*_resnet50_fpn_v2``): normalized FPN convs and a two-conv RPN head."""
    return _is_detection(state_dict) and any(
        k.startswith(("backbone.fpn.inner_blocks.0.1.", "rpn.head.conv.1.")) for k in state_dict)


def _torchvision_convention(state_dict: Mapping[str, Tensor], source: str) -> InputConvention:
    """Every torchvision ResNet and detector was trained on RGB with ImageNet's mean and std."""
    return TORCHVISION


def _is_classification(state_dict: Mapping[str, Tensor]) -> bool:
    return "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in state_dict)


#: torchvision Faster / Mask R-CNN ResNet-FPN state dicts (v1 and v2 layouts)
DETECTION = ForeignFormat("torchvision detection", _is_detection, convert_torchvision_detection,
                          convention=_torchvision_convention)
#: the same layout family, named apart so that a v1/v2 mix-up says which file it is
DETECTION_V2 = ForeignFormat("torchvision detection v2", _is_detection_v2, convert_torchvision_detection,
                             convention=_torchvision_convention)
#: torchvision ResNet / ResNeXt / Wide ResNet classification state dicts
CLASSIFICATION = ForeignFormat("torchvision classification", _is_classification, convert_torchvision_resnet,
                               convention=_torchvision_convention)
