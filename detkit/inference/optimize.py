"""Inference speed: BN folding, channels_last, oneDNN linear layers, fast CPU RoIAlign, bf16 with fp32 islands.

:func:`optimize_for_inference` turns an eval-mode detkit model, in place, into an inference-only
model computing the same function faster:

* frozen / eval-mode BatchNorms are folded into the convolutions (:func:`detkit.layers.fold_frozen_bn`);
* convolutions become :class:`InferenceConv2d` (weight stored once, channels_last, in the compute
  dtype; ReLU and residual additions in place; activations channels_last), residual blocks their
  fused versions. On CPUs with AMX, bf16 convolutions go through oneDNN's own operator instead, with
  prepacked weights and the ReLU / residual add fused as post-ops (:func:`choose_conv_kernel`; on an
  AVX512-BF16 CPU without AMX this measured no faster, and it keeps a second copy of the weights);
* on CPU, linear layers become oneDNN-prepacked :class:`PackedLinear` (several times faster than
  the MKL ``F.linear`` path on AMD CPUs) and RoIAlign a vectorized gather-sum over channels-last
  features (:func:`roi_align_nhwc`). In fp32 the results equal the plain model's up to float rounding;
* ``precision="bf16"`` stores weights and activations in bfloat16 (oneDNN accumulates in fp32), with
  fp32 islands: box coordinates, anchors, box decoding, NMS and score thresholds (the models already
  run these in fp32), RoIAlign sample positions, and the final class / box predictors. No autocast;
* elsewhere (CUDA, CPU builds without oneDNN) the same modules run ``F.conv2d`` / ``F.linear`` in
  the chosen dtype, with the model's own RoIAlign as an fp32 island.

Call it after ``model.to(device)`` (oneDNN-packed linear weights do not move). ``state_dict()`` keeps
the keys and values of the BN-folded model.

Example::

    model = optimize_for_inference(build_detector(cfg, 80).eval(), precision="bf16")
    detections = model.predict([image_uint8_chw])
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..layers import ConvNormAct, FrozenBatchNorm2d, fold_frozen_bn
from .layers import Cast, InferenceConv2d, PackedLinear, onednn_conv_available
from ..machine import (bf16_supported, cpu_flags, fp16_supported, mkldnn_linear_available,  # (re-exported)
                       release_freed_memory)
from ..models.backbones.resnet import BasicBlock, Bottleneck, Stem
from ..models.poolers import MultiScaleRoIAlign, assign_boxes_to_levels, convert_boxes_to_rois
from ..models.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNPredictor, StandardROIHeads
from ..models.rpn import RPNHead
from ..ops.roi_align_nhwc import roi_align_nhwc, roi_align_nhwc_into

__all__ = [
    "PRECISIONS", "bf16_supported", "resolve_precision", "mkldnn_linear_available", "optimize_for_inference",
    "InferenceConv2d", "PackedLinear", "FusedStem", "FusedBottleneck", "FusedBasicBlock", "FusedFCHead",
    "Cast", "roi_align_nhwc", "FastMultiScaleRoIAlign", "CONV_KERNELS", "choose_conv_kernel",
]

logger = logging.getLogger("detkit")

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: Union[str, torch.device] = "cpu") -> str:
    """Validate ``precision``; ``"bf16"`` / ``"fp16"`` become ``"fp32"`` (with a warning) where they are not
    native (:func:`bf16_supported`, :func:`fp16_supported`: fp16 is for GPUs)."""
    if precision == "int8":
        raise ValueError("precision 'int8' (config key test.precision) is for detkit.Predictor, tools/infer.py and "
                         "tools/serve.py (the quantized backbone of detkit.inference.int8); use fp32 or bf16 here")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} (config key test.precision)")
    if precision == "bf16" and not bf16_supported(device):
        logger.warning(
            "bf16 inference is not supported on %s (needs AVX512-BF16/AMX on CPU, or an Ampere+ GPU); "
            "running in fp32", torch.device(device)
        )
        return "fp32"
    if precision == "fp16" and not fp16_supported(device):
        logger.warning("fp16 inference is for CUDA GPUs; on %s it would be emulated, slower than fp32: running in "
                       "fp32 (bf16 is the CPU's half precision where the CPU has AVX512-BF16/AMX)", torch.device(device))
        return "fp32"
    return precision


# --------------------------------------------------------------------------- fused layers
class FusedStem(nn.Module):
    """ResNet stem with a folded BN: conv1 + in-place ReLU, then the 3x3/2 max pool."""

    def __init__(self, stem: Stem, dtype: torch.dtype, onednn: bool = False) -> None:
        super().__init__()
        self.out_channels = stem.out_channels
        self.conv1 = InferenceConv2d(stem.conv1, relu=True, dtype=dtype, onednn=onednn)
        self.maxpool = stem.maxpool

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.conv1(x))


class FusedBottleneck(nn.Module):
    """:class:`Bottleneck` with folded BNs: conv1+ReLU, conv2+ReLU, relu(conv3 + shortcut), ReLUs in place."""

    def __init__(self, block: Bottleneck, dtype: torch.dtype, onednn: bool = False) -> None:
        super().__init__()
        self.conv1 = InferenceConv2d(block.conv1, relu=True, dtype=dtype, onednn=onednn)
        self.conv2 = InferenceConv2d(block.conv2, relu=True, dtype=dtype, onednn=onednn)
        self.conv3 = InferenceConv2d(block.conv3, relu=False, dtype=dtype, onednn=onednn)
        # the block's shortcut (``shortcut`` or option C's ``proj_shortcut``, so the state-dict keys stay):
        # a folded ConvNormAct (converted by the caller), an option-A PadShortcut, or None
        self.shortcut, self.proj_shortcut = block.shortcut, block.proj_shortcut

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut if self.shortcut is not None else self.proj_shortcut
        identity = x if skip is None else skip(x)
        return self.conv3.forward_add_relu(self.conv2(self.conv1(x)), identity)


class FusedBasicBlock(nn.Module):
    """:class:`BasicBlock` with folded BNs: conv1+ReLU, relu(conv2 + shortcut), ReLUs in place."""

    def __init__(self, block: BasicBlock, dtype: torch.dtype, onednn: bool = False) -> None:
        super().__init__()
        self.conv1 = InferenceConv2d(block.conv1, relu=True, dtype=dtype, onednn=onednn)
        self.conv2 = InferenceConv2d(block.conv2, relu=False, dtype=dtype, onednn=onednn)
        self.shortcut, self.proj_shortcut = block.shortcut, block.proj_shortcut  # as in FusedBottleneck

    def forward(self, x: Tensor) -> Tensor:
        skip = self.shortcut if self.shortcut is not None else self.proj_shortcut
        identity = x if skip is None else skip(x)
        return self.conv2.forward_add_relu(self.conv1(x), identity)


class FusedFCHead(nn.Module):
    """:class:`FastRCNNConvFCHead` reading channels-last RoI features without a copy.

    ``relu(fc(x))`` layers are fused :class:`PackedLinear`; the first one takes the features
    flattened in ``(S, S, C)`` order (a view of channels-last ``[R, C, S, S]``).
    """

    def __init__(self, head: FastRCNNConvFCHead, resolution: int, converter: "_Converter") -> None:
        super().__init__()
        converter.children(head.convs)
        self.convs = head.convs
        self.output_dim = head.output_dim
        channels = head.fcs[0].in_features // (resolution * resolution)
        self.fcs = nn.ModuleList(
            converter.linear(fc, relu=True, nhwc_channels=channels if i == 0 else 0) for i, fc in enumerate(head.fcs)
        )

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] pooled features -> [R, output_dim]."""
        for conv in self.convs:
            x = conv(x)
        x = x.permute(0, 2, 3, 1).flatten(1)  # (R, C, S, S) -> (R, S*S*C): a view when channels_last
        for fc in self.fcs:
            x = fc(x)
        return x


# --------------------------------------------------------------------------- RoIAlign
class FastMultiScaleRoIAlign(nn.Module):
    """:class:`MultiScaleRoIAlign` for CPU inference with :func:`roi_align_nhwc`.

    Same level assignment and results (up to float rounding) as the wrapped pooler; the output is
    ``[R, C, S, S]`` channels_last in the features' dtype. Other devices, non-square outputs and
    ``torch.jit`` tracing use the wrapped pooler.
    """

    def __init__(self, pooler: MultiScaleRoIAlign) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        p, ref = self.pooler, features[0]
        size = p.output_size[0]
        if ref.device.type != "cpu" or torch.jit.is_tracing() or p.output_size[1] != size \
                or len(features) != len(p.scales) or len(boxes) != ref.shape[0]:
            return p(features, boxes)  # (it also reports the errors)
        rois = convert_boxes_to_rois(boxes).to(device=ref.device, dtype=torch.float32)
        out = ref.new_empty((rois.shape[0], size, size, ref.shape[1]))
        if len(features) == 1:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=ref.device)
        else:
            levels = assign_boxes_to_levels(rois[:, 1:], p.min_level, p.max_level, p.canonical_box_size,
                                            p.canonical_level)
        for level, (feature, scale) in enumerate(zip(features, p.scales)):
            rows = torch.nonzero(levels == level).squeeze(1)
            if rows.numel() > 0:
                roi_align_nhwc_into(out, rows, feature, rois[rows], scale, p.sampling_ratio, p.aligned)
        return out.permute(0, 3, 1, 2)  # (R, S, S, C) -> (R, C, S, S), channels_last memory

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The wrapped pooler's state dict (empty), keyed as if it were not wrapped."""
        return self.pooler.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)


# --------------------------------------------------------------------------- conversion
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)


def _folded(*norms: Optional[nn.Module]) -> bool:
    """True when every norm is absent or folded away (``nn.Identity``)."""
    return all(n is None or isinstance(n, nn.Identity) for n in norms)


class _Converter:
    """Replaces modules by their inference versions as :data:`_CONVERSIONS` says (:func:`optimize_for_inference`)."""

    def __init__(self, dtype: torch.dtype, linear_mkldnn: bool, fast_roi_align: bool, onednn_conv: bool = False) -> None:
        self.dtype, self.linear_mkldnn, self.fast_roi_align = dtype, linear_mkldnn, fast_roi_align
        self.onednn_conv = onednn_conv
        self.low_precision = dtype != torch.float32

    def conv(self, conv: nn.Conv2d, relu: bool = False) -> nn.Module:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return Cast(conv, self.dtype)
        return InferenceConv2d(conv, relu=relu, dtype=self.dtype, onednn=self.onednn_conv)

    def linear(self, linear: nn.Linear, relu: bool = False, dtype: Optional[torch.dtype] = None,
               nhwc_channels: int = 0) -> PackedLinear:
        return PackedLinear(linear, relu=relu, dtype=dtype or self.dtype, use_mkldnn=self.linear_mkldnn,
                            nhwc_channels=nhwc_channels)

    def fp32_island(self, m: nn.Module, contiguous: bool = False) -> nn.Module:
        return Cast(m, torch.float32, contiguous) if self.low_precision else m

    def module(self, m: nn.Module) -> nn.Module:
        """The replacement of ``m``: the conversion of the first :data:`_CONVERSIONS` entry ``m`` is an
        instance of, else :meth:`generic`."""
        for types, convert in _CONVERSIONS.items():
            if isinstance(m, types):
                return convert(self, m)
        return self.generic(m)

    def generic(self, m: nn.Module) -> nn.Module:
        """A module without a conversion of its own (or not fusable as it is): an fp32 island when it
        is an unknown layer with weights, else ``m`` with its children converted."""
        if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)):
            return self.fp32_island(m)
        self.children(m)
        return m

    def children(self, parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = self.module(child)
            if new is not child:
                setattr(parent, name, new)


def _stem(c: _Converter, m: Stem) -> nn.Module:
    return FusedStem(m, c.dtype, c.onednn_conv) if _folded(m.bn1) else c.generic(m)


def _residual_block(c: _Converter, m: Union[Bottleneck, BasicBlock]) -> nn.Module:
    if not _folded(m.bn1, m.bn2, getattr(m, "bn3", None), getattr(m.skip, "norm", None)):
        return c.generic(m)
    fused = (FusedBottleneck if isinstance(m, Bottleneck) else FusedBasicBlock)(m, c.dtype, c.onednn_conv)
    c.children(fused)  # the shortcut
    return fused


def _conv_norm_act(c: _Converter, m: ConvNormAct) -> nn.Module:
    if not (isinstance(m.conv, nn.Conv2d) and _folded(m.norm) and isinstance(m.act, (nn.ReLU, nn.Identity))):
        return c.generic(m)
    m.conv = c.conv(m.conv, relu=isinstance(m.act, nn.ReLU))  # keeps the ``*.conv.*`` keys
    m.act = nn.Identity()
    return m


def _rpn_head(c: _Converter, m: RPNHead) -> nn.Module:
    for i, conv in enumerate(m.convs):  # its forward applies relu(conv(x)) to each tower conv
        m.convs[i] = c.conv(conv, relu=True)
    m.objectness, m.anchor_deltas = c.conv(m.objectness), c.conv(m.anchor_deltas)
    return m


def _roi_heads(c: _Converter, m: StandardROIHeads) -> nn.Module:
    if isinstance(m.box_head, FastRCNNConvFCHead) and len(m.box_head.fcs):  # reads channels-last RoI features
        m.box_head = FusedFCHead(m.box_head, m.box_pooler.output_size[0], c)
    return c.generic(m)


def _cascade_roi_heads(c: _Converter, m: CascadeROIHeads) -> nn.Module:
    for k, head in enumerate(m.box_head):  # every stage reads channels-last RoI features
        if isinstance(head, FastRCNNConvFCHead) and len(head.fcs):
            m.box_head[k] = FusedFCHead(head, m.box_pooler.output_size[0], c)
    return c.generic(m)


def _fc_head(c: _Converter, m: FastRCNNConvFCHead) -> nn.Module:
    c.children(m.convs)
    for i, fc in enumerate(m.fcs):  # its forward applies relu(fc(x)) to each fc
        m.fcs[i] = c.linear(fc, relu=True)
    return m


def _box_predictor(c: _Converter, m: FastRCNNPredictor) -> nn.Module:
    m.cls_score = c.linear(m.cls_score, dtype=torch.float32)  # fp32 islands: class scores and box deltas
    m.bbox_pred = c.linear(m.bbox_pred, dtype=torch.float32)
    return m


def _pooler(c: _Converter, m: MultiScaleRoIAlign) -> nn.Module:
    # the fast gather on CPU, else torchvision's RoIAlign on fp32 NCHW features
    return FastMultiScaleRoIAlign(m) if c.fast_roi_align else c.fp32_island(m, contiguous=True)


#: module type(s) -> its inference conversion ``(converter, module) -> replacement``; the first entry a
#: module is an instance of applies (modules of no entry: :meth:`_Converter.generic`). Fusable blocks
#: whose norms are not folded (GroupNorm, BN in training mode) are converted generically.
_CONVERSIONS: dict[Union[type, tuple[type, ...]], Callable[[_Converter, Any], nn.Module]] = {
    (InferenceConv2d, PackedLinear, FusedStem, FusedBottleneck, FusedBasicBlock, FusedFCHead, Cast,
     FastMultiScaleRoIAlign): lambda c, m: m,  # already converted
    Stem: _stem,
    (Bottleneck, BasicBlock): _residual_block,
    ConvNormAct: _conv_norm_act,
    RPNHead: _rpn_head,
    StandardROIHeads: _roi_heads,
    CascadeROIHeads: _cascade_roi_heads,
    FastRCNNConvFCHead: _fc_head,
    FastRCNNPredictor: _box_predictor,
    MultiScaleRoIAlign: _pooler,
    nn.Conv2d: _Converter.conv,
    nn.Linear: _Converter.linear,
    nn.ConvTranspose2d: lambda c, m: Cast(m, c.dtype),  # converted, not fused
    _NORMS: _Converter.fp32_island,  # not folded: fp32
}


CONV_KERNELS: tuple[str, ...] = ("auto", "aten", "onednn")


def choose_conv_kernel(precision: str, requested: str = "auto") -> str:
    """The CPU convolution kernel of :func:`optimize_for_inference`: ``"aten"`` or ``"onednn"``.

    ``"auto"`` picks ``"onednn"`` (prepacked weights, fused post-ops) for bf16 on CPUs with AMX, where
    the per-call reorder of the weight into AMX tiles is what the prepacking saves, and ``"aten"``
    elsewhere: on an AMD EPYC with AVX512-BF16 and no AMX the two measured within run-to-run noise of
    each other (see ``benchmarks/bench_runtimes.py --conv-kernels``), and the prepacked path holds an
    extra copy of every weight. ``DETKIT_CONV_KERNEL=aten|onednn`` in the environment overrides ``"auto"``.
    """
    if requested not in CONV_KERNELS:
        raise ValueError(f"conv_kernel must be one of {CONV_KERNELS}, got {requested!r}")
    if requested == "auto":
        env = os.environ.get("DETKIT_CONV_KERNEL", "").strip()
        if env:
            if env not in CONV_KERNELS[1:]:
                raise ValueError(f"DETKIT_CONV_KERNEL must be 'aten' or 'onednn', got {env!r}")
            requested = env
        else:
            requested = "onednn" if precision == "bf16" and "amx_bf16" in cpu_flags() else "aten"
    if requested == "onednn" and not onednn_conv_available():
        return "aten"
    return requested


def optimize_for_inference(
    model: nn.Module,
    precision: str = "fp32",
    *,
    fold_bn: bool = True,
    fuse: bool = True,
    channels_last: bool = True,
    fast_roi_align: bool = True,
    conv_kernel: str = "auto",
) -> nn.Module:
    """Make an eval-mode model faster for inference, in place; returns it.

    Args:
        model: a detkit model (e.g. :class:`~detkit.models.detector.TwoStageDetector`, a ResNet/FPN
            backbone, a classifier) on its final device, weights loaded.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (fp32 with a warning where :func:`bf16_supported` /
            :func:`fp16_supported` is False for the model's device).
        fold_bn: fold frozen / eval-mode BatchNorms into the convolutions.
        fuse: replace convs, linears and residual blocks by the fused modules of this file
            (needed for bf16 / fp16). Without it only folding and ``channels_last`` apply.
        channels_last: with ``fuse=False``, convert conv weights to channels_last (fused modules
            always are).
        fast_roi_align: on CPU, pool with :class:`FastMultiScaleRoIAlign`.
        conv_kernel: on CPU, ``"aten"`` (``F.conv2d`` on channels-last weights, ReLU / residual add
            in place after it), ``"onednn"`` (oneDNN's operator, prepacked weights, fused post-ops)
            or ``"auto"``: :func:`choose_conv_kernel` (``DETKIT_CONV_KERNEL`` overrides it).

    The switches after ``precision`` exist to measure each speed lever; keep the defaults. The model
    is put in eval mode without gradients; the precision used is stored as ``model.inference_precision``.
    """
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    precision = resolve_precision(precision, device)
    if precision != "fp32" and not fuse:
        raise ValueError(f"optimize_for_inference: precision={precision!r} needs fuse=True (weights are converted then)")
    model.eval()
    model.requires_grad_(False)
    if fold_bn:
        fold_frozen_bn(model)
    if fuse:
        on_cpu = device.type == "cpu"
        linear_mkldnn = on_cpu and mkldnn_linear_available()
        onednn = on_cpu and choose_conv_kernel(precision, conv_kernel) == "onednn"
        _Converter(_DTYPES[precision], linear_mkldnn, fast_roi_align and on_cpu, onednn).children(model)
    elif channels_last:
        model.to(memory_format=torch.channels_last)
    model.inference_precision = precision
    release_freed_memory()  # the replaced weights' pages, back to the OS
    return model
