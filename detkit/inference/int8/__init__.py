"""int8 inference: post-training static quantization of the backbone + FPN, RPN head and box head FCs (PT2E, inductor).

PyTorch's own flow (torchao's PT2E, :mod:`.graphs`): the fp32 backbone+FPN (BatchNorms folded) and
the heads are exported with ``torch.export``, annotated by ``X86InductorQuantizer``, calibrated
on images of the training set through the test-time transform (:func:`calibration_images`),
converted and lowered by ``torch.compile`` (inductor with freezing) into oneDNN int8 convolutions
(VNNI / AMX-INT8). Three graphs, the first two compiled per padded size bucket (:mod:`.backbone`):

* :class:`Int8Backbone` replaces ``model.backbone``: the backbone and FPN, all in int8;
* :class:`Int8RPNHead` replaces ``model.rpn.head``: its 3x3 conv tower in int8 and its 1x1
  predictors in fp32 (:mod:`.rpn_head`);
* :class:`Int8BoxHead` replaces a "2fc" ``model.roi_heads.box_head``: its FC layers in int8, one
  graph with a dynamic RoI count (:mod:`.box_head`).

The RPN's decoding and NMS, RoIAlign, the box predictor, the mask head and everything after run as
:func:`detkit.inference.optimize.optimize_for_inference` makes them (bf16 where the CPU runs it natively, else
fp32). Calibration statistics are saved and reloaded safely (:mod:`.state`).

Layer 4 (beside speed, below the Predictor that imports it): imports config, machine, layers and data.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence, Union

import torch
from torch import nn

from ...config import DetectionConfig
from ...machine import bf16_supported, cpu_flags
from .backbone import Features, Int8Backbone, SizeBuckets, size_buckets
from .graphs import as_tensor, export, observer_state, pad_to, prepare
from . import box_head as _box, rpn_head as _rpn
from .box_head import Int8BoxHead, quantizable_box_head
from .rpn_head import Int8RPNHead, quantizable_rpn_head
from .state import FORMAT, Int8State, QuantizationError, load_quantized, save_quantized, weights_fingerprint

__all__ = [
    "INT8_FLAGS", "FORMAT", "QuantizationError", "Int8State", "Int8Backbone", "Int8RPNHead", "Int8BoxHead", "SizeBuckets",
    "torchao_available", "int8_supported", "calibration_images", "size_buckets", "weights_fingerprint",
    "calibrate", "save_quantized", "load_quantized", "resolve_int8", "int8_model",
]

logger = logging.getLogger("detkit")

#: CPU flags of int8 dot-product instructions oneDNN's int8 convolutions use
INT8_FLAGS: tuple[str, ...] = ("amx_int8", "avx512_vnni", "avx_vnni")


def torchao_available() -> bool:
    """Whether torchao (PT2E quantization, ``pip install detkit[int8]``) can be imported."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError:
        return False
    return True


def int8_supported(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether int8 inference runs fast here: a CPU with AVX512-VNNI, AVX-VNNI or AMX-INT8, oneDNN and
    torchao. ``DETKIT_DISABLE_INT8=1`` forces False."""
    if torch.device(device).type != "cpu" or os.environ.get("DETKIT_DISABLE_INT8", "") == "1":
        return False
    if not (set(INT8_FLAGS) & cpu_flags()) or not torch.backends.mkldnn.is_available():
        return False
    return torchao_available()


def calibration_images(cfg: DetectionConfig, n: int, seed: int = 0) -> list:
    """``n`` images of ``data.train`` (a seeded random choice; all of them if fewer) through the
    test-time transform: uint8 HxWx3 RGB at the size the Predictor feeds the model."""
    import numpy as np

    from ...data.coco import load_coco
    from ...data.images import read_image
    from ...data.transforms import build_detection_transform

    if n <= 0:
        raise QuantizationError(f"calibration needs at least one image, got n={n}")
    train = cfg.data.train
    if not train.annotations or not train.images:
        raise QuantizationError("calibration images come from data.train.annotations / data.train.images, "
                                "which are not set in the config; set them or pass images")
    # the images of every training file (several: data.train lists); their classes do not matter here
    files = train.annotations if isinstance(train.annotations, list) else [train.annotations]
    folders = train.images if isinstance(train.images, list) else [train.images]
    paths = [r.path for a, d in zip(files, folders) for r in load_coco(a, d, filter_empty=False, is_train=False).records]
    order = np.random.default_rng(seed).permutation(len(paths))[:n]
    transform = build_detection_transform(cfg.input, is_train=False)
    return [transform(read_image(paths[i])).image for i in sorted(order)]


def _int8_parts(model: nn.Module) -> nn.Module:
    """What the int8 graphs compute, for the fingerprint: the backbone (and the RPN and box heads)."""
    heads = {"rpn_head": quantizable_rpn_head(model), "box_head": quantizable_box_head(model)}
    return nn.ModuleDict({"backbone": model.backbone, **{k: v for k, v in heads.items() if v is not None}})


def _rpn_strides(model: nn.Module) -> list[int]:
    specs = model.backbone.output_specs
    return [specs[k].stride for k in model.rpn.in_features]


def calibrate(model: nn.Module, images: Sequence[Any], fingerprint: str,
              head_input: torch.dtype = torch.float32) -> Int8State:
    """Observe the activations of ``model.backbone`` (fp32, BNs folded), of its RPN head and of its
    box head on ``images`` (uint8 HxWx3 RGB arrays at test size, or [3, H, W] tensors), through the
    detector's own preprocessing, RPN and RoI pooling; the heads see their inputs in ``head_input``,
    the dtype they will get them in."""
    from torch.export import Dim

    if not images:
        raise QuantizationError("calibration needs at least one image")
    d = max(int(model.size_divisibility), 32)
    t0 = time.perf_counter()
    backbone = None
    rpn, box = quantizable_rpn_head(model), quantizable_box_head(model)
    rpn_graph = box_graph = None
    names = list(model.backbone.output_specs)
    with torch.no_grad():
        for im in images:
            x, sizes = model.preprocess([as_tensor(im)])
            x = pad_to(x, max(x.shape[2], 2 * d), max(x.shape[3], 2 * d))
            if backbone is None:  # H, W multiples of d (what the detector's padding gives), >= 2d
                shapes = {"x": {2: d * Dim("h", min=2, max=4096), 3: d * Dim("w", min=2, max=4096)}}
                backbone = prepare(export(Features(model.backbone), (x,), shapes))
            feats = dict(zip(names, backbone(x)))
            if rpn is not None:
                ins = [feats[k].to(head_input).contiguous(memory_format=torch.channels_last)
                       for k in model.rpn.in_features]
                if rpn_graph is None:
                    rpn_graph = _rpn.calibration_graph(rpn, ins)
                rpn_graph(*ins)
            if box is not None:
                proposals, _ = model.rpn(sizes, feats, None)
                pooled = model.roi_heads.box_pooler([feats[k] for k in model.roi_heads.in_features],
                                                    [p.boxes for p in proposals]).to(head_input)
                if pooled.shape[0]:
                    if box_graph is None:
                        box_graph = _box.calibration_graph(box, pooled)
                    box_graph(_box.pad_rows(pooled))
    head_input_name = str(head_input).replace("torch.", "")
    meta = {"calibration_images": len(images), "calibration_s": round(time.perf_counter() - t0, 2),
            "rpn_head_input": head_input_name, "box_head_input": head_input_name}
    return Int8State(observer_state(backbone), fingerprint, meta,
                     rpn_head=observer_state(rpn_graph) if rpn_graph is not None else {},
                     box_head=observer_state(box_graph) if box_graph is not None else {})


def resolve_int8(device: Union[str, torch.device] = "cpu") -> str:
    """``"int8"`` where :func:`int8_supported`, else (one warning) ``"bf16"`` where that is native, else ``"fp32"``."""
    if int8_supported(device):
        return "int8"
    fallback = "bf16" if bf16_supported(device) else "fp32"
    why = ("torchao is not installed (pip install 'detkit[int8]')" if not torchao_available() else
           f"{torch.device(device)} has no int8 dot-product instructions (needs a CPU with {'/'.join(INT8_FLAGS)})")
    logger.warning("int8 inference is not available: %s; running in %s", why, fallback)
    return fallback


def int8_model(model: nn.Module, cfg: DetectionConfig, quantized: Union[None, str, os.PathLike] = None,
               calibration: Union[None, int, Sequence[Any]] = None) -> tuple[Int8State, str]:
    """Make ``model`` (eval, fp32, weights loaded, on CPU) an int8 model, in place: its backbone an
    :class:`Int8Backbone`, its RPN head an :class:`Int8RPNHead` and its box head an
    :class:`Int8BoxHead` (the heads where quantizable).

    The statistics come from ``quantized`` (a :func:`save_quantized` folder, checked against the
    weights), else from calibrating on ``calibration`` (images, or a number of ``data.train``
    images; default ``test.int8_calibration_images``). Returns the state and the precision the rest
    of the model should run in (``"bf16"`` where native, else ``"fp32"``).
    """
    from ...layers import fold_frozen_bn

    fingerprint = weights_fingerprint(_int8_parts(model))
    fold_frozen_bn(model.backbone)
    rest = "bf16" if bf16_supported("cpu") else "fp32"
    out_dtype = torch.bfloat16 if rest == "bf16" else torch.float32
    if quantized is not None:
        state = load_quantized(quantized, fingerprint)
    else:
        images = calibration if calibration is not None else cfg.test.int8_calibration_images
        if isinstance(images, int):
            images = calibration_images(cfg, images)
        state = calibrate(model, images, fingerprint, out_dtype)
    buckets = SizeBuckets(size_buckets(cfg.input.min_size_test, cfg.input.max_size_test, model.size_divisibility,
                                       cfg.test.int8_bucket_steps), model.size_divisibility)
    rpn, box = quantizable_rpn_head(model), quantizable_box_head(model)
    model.backbone = Int8Backbone(model.backbone, state, buckets, out_dtype)
    if rpn is not None and state.rpn_head:
        model.rpn.head = Int8RPNHead(rpn, state, buckets, _rpn_strides(model))
    if box is not None and state.box_head:
        side = model.roi_heads.box_pooler.output_size[0]
        model.roi_heads.box_head = Int8BoxHead(box, state, (box.fcs[0].in_features // (side * side), side, side))
    return state, rest
