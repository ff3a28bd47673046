"""Initial weights from a config: the one way train, eval, export, infer and :class:`Predictor` load them.

``build_detector`` / ``build_classifier`` build and load nothing; :func:`load_initial_weights`
then loads, in this order:

1. ``model.backbone.weights`` (detectors) into the ResNet (``model.backbone.bottom_up``), unless
   explicit ``weights`` are given (a full detector's weights cover the backbone);
2. ``weights`` if given (``--weights``, ``Predictor(weights=...)``), else ``model.weights``, into
   the whole model.

Every load is checked by :func:`check_fit`, one rule for every caller: a partial fit is refused
with a one-line :class:`CheckpointError`, except the two expected ones, which the returned reports
and the log name:

* **class layers re-initialized**: the only tensors that differ in shape (or are absent) are the
  model's class layers (``model.class_layers()``: the box and mask predictors of a detector, the
  ``fc`` of a classifier), because the model has another number of classes. Expected only when
  training (fine-tuning on new classes); for inference (eval, export, infer, :class:`Predictor`)
  random class layers would give silently wrong results, so there it is refused too;
* **a classifier's ``fc`` dropped**: ImageNet weights loaded into a detector backbone.

Every source may also be a name (:mod:`detkit.checkpoint.hub`: ``torchvision://...``, ``detectron2://...``,
``http(s)://...``), downloaded once into the verified cache. After loading, the input convention the weights
state (their format, the file's ``pixel_mean``/``pixel_std``, or the named source) is checked against the
config (:func:`detkit.checkpoint.conventions.check_input_convention`): RGB against BGR, or another mean or std,
is refused in one line before anything runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Union

from torch import nn

from ..config.schema import ClassificationConfig, DetectionConfig
from .conventions import check_input_convention
from .files import CheckpointError
from .hub import WeightsName, fetch_weights, is_weights_name, parse_weights_name
from .loading import load_weights
from .report import LoadReport

__all__ = ["check_fit", "load_initial_weights"]

logger = logging.getLogger("detkit")

WeightsSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]

#: checkpoint modules that may be dropped without a word: a classifier's head, when its body
#: initializes a detector backbone
_DROPPABLE_HEADS = ("fc.",)


def _class_layer_keys(model: nn.Module, keys: list[str], prefix: str = "") -> tuple[list[str], list[str]]:
    """Split ``keys`` into (keys inside the model's class layers, the others)."""
    layers = tuple(f"{prefix}{name}." for name in model.class_layers()) if hasattr(model, "class_layers") else ()
    inside = [k for k in keys if layers and k.startswith(layers)]
    return inside, [k for k in keys if k not in inside]


def check_fit(report: LoadReport, model: nn.Module, key: str, training: bool) -> str:
    """Accept ``report`` if the weights fit ``model`` fully or in an expected way; else raise.

    ``key`` names the config key or argument the weights came from (for the message); ``training``
    allows re-initialized class layers (see the module doc). Returns a note on what was expected
    ("" for a full fit), e.g. ``"class layers re-initialized for 3 classes: roi_heads.box_predictor,
    roi_heads.mask_head.predictor"``.
    """
    mismatched_keys = [k for k, _, _ in report.mismatched]
    reinit_mismatched, other_mismatched = _class_layer_keys(model, mismatched_keys)
    reinit_missing, other_missing = _class_layer_keys(model, report.missing)
    dropped_heads = [k for k in report.dropped if k.startswith(_DROPPABLE_HEADS)]
    other_dropped = [k for k in report.dropped if k not in dropped_heads]

    bad = LoadReport(source_format=report.source_format, source=report.source,
                     missing=other_missing, unexpected=report.unexpected, dropped=other_dropped,
                     mismatched=[m for m in report.mismatched if m[0] in other_mismatched])
    class_misfit = bool(reinit_mismatched or reinit_missing)
    if bad.problems() or (class_misfit and not training):
        n = getattr(model, "num_classes", None)
        hint = ""
        if other_missing and not report.mismatched and hasattr(model, "backbone") and all(
                k.startswith("backbone.") for k in report.loaded):
            hint = "; they look like backbone weights: set model.backbone.weights instead"
        raise CheckpointError(
            f"{key}: {report.source} ({report.source_format}) does not fit this config"
            f"{f' with {n} classes' if n else ''}: {report.problems(max_items=10)}{hint}; the weights are for another "
            "architecture or class count: use the config they were trained with (its model settings and "
            "data.class_names / model.num_classes)"
        )
    notes = []
    if reinit_mismatched or reinit_missing:
        layers = sorted({k.rsplit(".", 1)[0] for k in reinit_mismatched + reinit_missing})
        n = getattr(model, "num_classes", None)
        notes.append(f"class layers re-initialized{f' for {n} classes' if n else ''}: {', '.join(layers)}")
    if dropped_heads:
        notes.append(f"classifier head dropped ({', '.join(sorted({k.rsplit('.', 1)[0] for k in dropped_heads}))})")
    return "; ".join(notes)


def _bare_torchvision_member(cfg: Union[DetectionConfig, ClassificationConfig], key: str) -> str | None:
    """What a bare ``torchvision://`` names for ``key``: the ImageNet weights torchvision calls ``DEFAULT`` for the
    backbone (or classifier) architecture, or the COCO weights of a ``configs/torchvision`` detector (ResNet-50
    with torchvision's rounded anchors; v2 when its RPN head has two convs). None: no such file."""
    from torchvision.models import get_model_weights

    model = cfg.model
    if key == "model.backbone.weights" or isinstance(cfg, ClassificationConfig):
        arch = model.backbone.name if key == "model.backbone.weights" else model.arch
        try:
            return f"{get_model_weights(arch).__name__}.DEFAULT"
        except ValueError:  # e.g. a CIFAR ResNet
            return None
    if model.backbone.name == "resnet50" and model.anchors.round_base and model.rpn.num_convs in (1, 2):
        kind = "MaskRCNN" if model.meta_architecture == "mask_rcnn" else "FasterRCNN"
        return f"{kind}_ResNet50_FPN{'_V2' if model.rpn.num_convs == 2 else ''}_Weights.COCO_V1"
    return None


def _resolve(source: WeightsSource, cfg: Union[DetectionConfig, ClassificationConfig],
             key: str) -> tuple[WeightsSource, WeightsName | None]:
    """A named source as its cached file (downloaded if needed) and its name record; others unchanged."""
    if not is_weights_name(source):
        return source, None
    name = str(source)
    default = _bare_torchvision_member(cfg, key) if name.rstrip("/") == "torchvision:" else None
    wn = parse_weights_name(name, default)
    return fetch_weights(wn), wn


def _check_stride(wn: WeightsName | None, cfg: Union[DetectionConfig, ClassificationConfig], key: str) -> None:
    """MSRA's Caffe2 ResNets stride in the 1x1 conv, FAIR's X-101 in the 3x3: a wrong choice fits every shape."""
    backbone = getattr(cfg.model, "backbone", None)
    if wn is None or wn.stride_in_1x1 is None or backbone is None or backbone.stride_in_1x1 == wn.stride_in_1x1:
        return
    raise CheckpointError(
        f"{key}: {wn.name} was trained with the stride in the {'1x1' if wn.stride_in_1x1 else '3x3'} conv of each "
        f"downsampling block, but the config has model.backbone.stride_in_1x1={str(backbone.stride_in_1x1).lower()}: "
        f"set model.backbone.stride_in_1x1={str(wn.stride_in_1x1).lower()} (as configs/detectron2/ do)"
    )


def _load(model: nn.Module, source: WeightsSource, key: str, training: bool,
          cfg: Union[DetectionConfig, ClassificationConfig]) -> LoadReport:
    path, wn = _resolve(source, cfg, key)
    report = load_weights(model, path)
    note = check_fit(report, model, key, training)
    named = f"{wn.name} ({path})" if wn is not None else report.source
    # what the named source is known to expect wins over what the file's format says
    convention = wn.convention if wn is not None and wn.convention is not None else report.input_convention
    check_input_convention(convention, cfg, key, named)
    _check_stride(wn, cfg, key)
    logger.info("%s: %s%s", key, report.summary(), f"\n  expected partial fit: {note}" if note else "")
    return report


def load_initial_weights(
    model: nn.Module,
    cfg: Union[DetectionConfig, ClassificationConfig],
    weights: Optional[WeightsSource] = None,
    *,
    training: bool,
    weights_key: str = "--weights",
) -> list[LoadReport]:
    """Load the initial weights that ``cfg`` (or ``weights``) names into ``model``; see the module doc.

    Args:
        model: a freshly built :class:`TwoStageDetector` or :class:`ResNetClassifier` (unwrapped).
        cfg: its config.
        weights: explicit weights (path or state dict) that replace ``model.weights`` and make
            ``model.backbone.weights`` unnecessary.
        training: the model is about to be trained: class layers may be re-initialized for a new
            class count (fine-tuning). False for evaluation and inference, where they must fit.
        weights_key: how messages name ``weights`` (``"--weights"``, ``"Predictor(weights=...)"``).

    Returns:
        the reports of what was loaded, in order (empty when nothing is configured).
    """
    reports: list[LoadReport] = []
    backbone_weights = getattr(getattr(cfg.model, "backbone", None), "weights", None)
    if weights is None and backbone_weights:
        reports.append(_load(model.backbone.bottom_up, backbone_weights, "model.backbone.weights", training, cfg))
    if weights is not None:
        reports.append(_load(model, weights, weights_key, training, cfg))
    elif cfg.model.weights:
        reports.append(_load(model, cfg.model.weights, "model.weights", training, cfg))
    return reports
