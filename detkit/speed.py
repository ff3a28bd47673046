"""Inference speed: BN folding, channels_last, oneDNN linear layers, fast CPU RoIAlign, bf16 with fp32 islands.

:func:`optimize_for_inference` turns an eval-mode detkit model, in place, into an inference-only
model computing the same function faster:

* frozen / eval-mode BatchNorms are folded into the convolutions (:func:`detkit.layers.fold_frozen_bn`);
* convolutions become :class:`InferenceConv2d` (weight stored once, channels_last, in the compute
  dtype; ReLU and residual additions in place; activations channels_last), residual blocks their
  fused versions. (oneDNN's prepacked conv kernels with fused post-ops were measured too: no faster
  than this on an AVX512-BF16 CPU, and their per-shape buffers grow RSS with every new image size);
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

import ctypes
import functools
import logging
import os
import sys
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvNormAct, FrozenBatchNorm2d, fold_frozen_bn
from .models.backbones.resnet import BasicBlock, Bottleneck, Stem
from .models.poolers import MultiScaleRoIAlign, assign_boxes_to_levels, convert_boxes_to_rois
from .models.roi_heads import FastRCNNConvFCHead, FastRCNNPredictor, StandardROIHeads
from .models.rpn import RPNHead
from .ops.roi_align_nhwc import roi_align_nhwc, roi_align_nhwc_into

__all__ = [
    "PRECISIONS", "bf16_supported", "resolve_precision", "mkldnn_linear_available", "optimize_for_inference",
    "InferenceConv2d", "PackedLinear", "FusedStem", "FusedBottleneck", "FusedBasicBlock", "FusedFCHead",
    "Cast", "roi_align_nhwc", "FastMultiScaleRoIAlign",
]

logger = logging.getLogger("detkit")

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_LINEAR_HINT_ROWS = 512  # rows assumed when pre-reordering linear weights (RoIs per batch)


# --------------------------------------------------------------------------- capabilities
@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip().lower() in ("flags", "features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def mkldnn_linear_available() -> bool:
    """True when this PyTorch build has oneDNN with its prepacked linear operators."""
    if not torch.backends.mkldnn.is_available():
        return False
    names = ("_linear_pointwise", "_reorder_linear_weight")
    try:
        return all(hasattr(torch.ops.mkldnn, n) for n in names)
    except RuntimeError:
        return False


def bf16_supported(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether bfloat16 inference runs natively (fast) on ``device``.

    CPU: oneDNN is available and the CPU has bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on
    Arm); without them bf16 would be emulated, slower than fp32. CUDA: a GPU with native bf16
    (Ampere or newer). Other devices: False. ``DETKIT_DISABLE_BF16=1`` in the environment forces False.
    """
    device = torch.device(device)
    if os.environ.get("DETKIT_DISABLE_BF16", "") == "1":
        return False
    if device.type == "cpu":
        if not torch.backends.mkldnn.is_available():
            return False
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if any(callable(p) and bool(p()) for p in probes):
            return True
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & _cpuinfo_flags())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older signature
            return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_precision(precision: str, device: Union[str, torch.device] = "cpu") -> str:
    """Validate ``precision``; ``"bf16"`` becomes ``"fp32"`` (with a warning) where it is not supported."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r} (config key test.precision)")
    if precision == "bf16" and not bf16_supported(device):
        logger.warning(
            "bf16 inference is not supported on %s (needs AVX512-BF16/AMX on CPU, or an Ampere+ GPU); "
            "running in fp32", torch.device(device)
        )
        return "fp32"
    return precision


# --------------------------------------------------------------------------- fused layers
def _check_device(module: nn.Module, x: Tensor) -> None:
    if x.device != module.device:
        raise RuntimeError(
            f"{type(module).__name__} was optimized for {module.device} but got an input on {x.device}; "
            "move the model first, then call detkit.speed.optimize_for_inference"
        )


class InferenceConv2d(nn.Module):
    """Inference-only ``Conv2d`` (+ optional in-place ReLU) with its weight prepared once.

    The weight is stored channels_last in ``dtype`` (buffers ``weight`` and ``bias``, moved by
    ``.to(device)``); inputs are cast to ``dtype`` and made channels_last, outputs are channels_last
    ``dtype``. On CPU ``F.conv2d`` then runs oneDNN's channels-last kernels without layout reorders.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"InferenceConv2d: needs explicit zero padding, got padding={conv.padding!r} "
                             f"padding_mode={conv.padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.relu, self.dtype = bool(relu), dtype
        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))

    def _conv(self, x: Tensor) -> Tensor:
        x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        """[N, C_in, H, W] -> [N, C_out, H', W'] (channels_last, ``dtype``)."""
        y = self._conv(x)
        return y.relu_() if self.relu else y

    def forward_add_relu(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + other)`` in place: the end of a residual block (``self.relu`` is not used)."""
        return self._conv(x).add_(other.to(self.dtype)).relu_()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, relu={self.relu}, dtype={self.dtype}")


class PackedLinear(nn.Module):
    """Inference-only ``Linear`` (+ optional ReLU); oneDNN-prepacked weight on CPU.

    oneDNN's fp32 GEMM is several times faster than the default CPU ``F.linear`` (MKL) on some CPUs
    (AMD). ``nhwc_channels=C`` takes inputs flattened from ``(S, S, C)`` instead of ``(C, S, S)``
    (channels-last RoI features: the flatten is then a view); the weight columns are permuted once.
    """

    def __init__(self, linear: nn.Linear, relu: bool = False, dtype: torch.dtype = torch.float32,
                 use_mkldnn: bool = True, nhwc_channels: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.relu, self.dtype, self.device = bool(relu), dtype, linear.weight.device
        self.use_mkldnn = bool(use_mkldnn) and self.device.type == "cpu"
        self.nhwc_channels = int(nhwc_channels)
        weight = linear.weight.detach().to(dtype)
        if self.nhwc_channels:
            # (O, C*S*S) -> (O, C, S*S) -> (O, S*S, C) -> (O, S*S*C)
            weight = weight.view(self.out_features, self.nhwc_channels, -1).transpose(1, 2).reshape(
                self.out_features, -1)
        weight = weight.contiguous()
        self._bias: Optional[Tensor] = None if linear.bias is None else linear.bias.detach().to(dtype)
        self._weight = torch.ops.mkldnn._reorder_linear_weight(weight, _LINEAR_HINT_ROWS) if self.use_mkldnn \
            else weight

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_features] -> [..., out_features] (``dtype``)."""
        _check_device(self, x)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(self.dtype)
        if x.shape[0] == 0:
            return x.new_zeros((*lead, self.out_features))
        if self.use_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(x, self._weight, self._bias, "relu" if self.relu else "none", [], "")
        else:
            y = F.linear(x, self._weight, self._bias)
            y = F.relu(y, inplace=True) if self.relu else y
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> Tensor:
        """The weight as a plain ``[out_features, in_features]`` tensor in the original column order."""
        w = self._weight.to_dense() if self._weight.is_mkldnn else self._weight
        if self.nhwc_channels:  # (O, S*S*C) -> (O, S*S, C) -> (O, C, S*S) -> (O, C*S*S)
            w = w.view(self.out_features, -1, self.nhwc_channels).transpose(1, 2).reshape(self.out_features, -1)
        return w

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self._bias is not None:
            destination[prefix + "bias"] = self._bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}, "
                f"dtype={self.dtype}, mkldnn={self.use_mkldnn}, nhwc_channels={self.nhwc_channels}")


class FusedStem(nn.Module):
    """ResNet stem with a folded BN: conv1 + in-place ReLU, then the 3x3/2 max pool."""

    def __init__(self, stem: Stem, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_channels = stem.out_channels
        self.conv1 = InferenceConv2d(stem.conv1, relu=True, dtype=dtype)
        self.maxpool = stem.maxpool

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.conv1(x))


class FusedBottleneck(nn.Module):
    """:class:`Bottleneck` with folded BNs: conv1+ReLU, conv2+ReLU, relu(conv3 + shortcut), ReLUs in place."""

    def __init__(self, block: Bottleneck, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = InferenceConv2d(block.conv1, relu=True, dtype=dtype)
        self.conv2 = InferenceConv2d(block.conv2, relu=True, dtype=dtype)
        self.conv3 = InferenceConv2d(block.conv3, relu=False, dtype=dtype)
        # folded ConvNormAct (converted by the caller), an option-A PadShortcut, or None
        self.shortcut: Optional[nn.Module] = block.skip

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv3.forward_add_relu(self.conv2(self.conv1(x)), identity)


class FusedBasicBlock(nn.Module):
    """:class:`BasicBlock` with folded BNs: conv1+ReLU, relu(conv2 + shortcut), ReLUs in place."""

    def __init__(self, block: BasicBlock, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = InferenceConv2d(block.conv1, relu=True, dtype=dtype)
        self.conv2 = InferenceConv2d(block.conv2, relu=False, dtype=dtype)
        self.shortcut: Optional[nn.Module] = block.skip

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
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


def _cast_tree(obj: Any, dtype: torch.dtype, contiguous: bool) -> Any:
    if isinstance(obj, Tensor) and obj.is_floating_point():
        return obj.to(dtype=dtype, memory_format=torch.contiguous_format if contiguous else torch.preserve_format)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_tree(o, dtype, contiguous) for o in obj)
    return obj


class Cast(nn.Module):
    """Runs ``module`` in ``dtype``: floating tensor inputs (also in lists) are cast first.

    Used for fp32 islands in a bf16 model (torchvision RoIAlign, unfolded norms) and for layers that
    are converted but not fused (``ConvTranspose2d``). ``contiguous=True`` also turns channels_last
    inputs into NCHW in the same copy. The state dict is keyed as if ``module`` were not wrapped.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, contiguous: bool = False) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype, self.contiguous = dtype, bool(contiguous)

    def forward(self, *args: Any) -> Any:
        return self.module(*_cast_tree(args, self.dtype, self.contiguous))

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The wrapped module's state dict, keyed as if it were not wrapped."""
        return self.module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)


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
_FUSED = (InferenceConv2d, PackedLinear, FusedStem, FusedBottleneck, FusedBasicBlock, FusedFCHead, Cast,
          FastMultiScaleRoIAlign)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d)


def _folded(*norms: Optional[nn.Module]) -> bool:
    return all(n is None or isinstance(n, nn.Identity) for n in norms)


class _Converter:
    """Replaces detkit modules by their inference versions (see :func:`optimize_for_inference`)."""

    def __init__(self, dtype: torch.dtype, linear_mkldnn: bool, fast_roi_align: bool) -> None:
        self.dtype, self.linear_mkldnn, self.fast_roi_align = dtype, linear_mkldnn, fast_roi_align
        self.low_precision = dtype != torch.float32

    def conv(self, conv: nn.Conv2d, relu: bool = False) -> nn.Module:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return Cast(conv, self.dtype)
        return InferenceConv2d(conv, relu=relu, dtype=self.dtype)

    def linear(self, linear: nn.Linear, relu: bool = False, dtype: Optional[torch.dtype] = None,
               nhwc_channels: int = 0) -> PackedLinear:
        return PackedLinear(linear, relu=relu, dtype=dtype or self.dtype, use_mkldnn=self.linear_mkldnn,
                            nhwc_channels=nhwc_channels)

    def fp32_island(self, m: nn.Module, contiguous: bool = False) -> nn.Module:
        return Cast(m, torch.float32, contiguous) if self.low_precision else m

    def module(self, m: nn.Module) -> nn.Module:
        """The replacement of ``m`` (``m`` itself, possibly with converted children)."""
        fused: nn.Module
        if isinstance(m, _FUSED):
            return m
        if isinstance(m, Stem) and _folded(m.bn1):
            return FusedStem(m, self.dtype)
        if isinstance(m, (Bottleneck, BasicBlock)) and _folded(
            m.bn1, m.bn2, getattr(m, "bn3", None), getattr(m.skip, "norm", None)
        ):
            fused = (FusedBottleneck if isinstance(m, Bottleneck) else FusedBasicBlock)(m, self.dtype)
            self.children(fused)  # the shortcut
            return fused
        if isinstance(m, ConvNormAct) and isinstance(m.conv, nn.Conv2d) and _folded(m.norm) \
                and isinstance(m.act, (nn.ReLU, nn.Identity)):
            m.conv = self.conv(m.conv, relu=isinstance(m.act, nn.ReLU))  # keeps the ``*.conv.*`` keys
            m.act = nn.Identity()
            return m
        if isinstance(m, RPNHead):  # its forward applies relu(conv(x)) to each tower conv
            for i, c in enumerate(m.convs):
                m.convs[i] = self.conv(c, relu=True)
            m.objectness, m.anchor_deltas = self.conv(m.objectness), self.conv(m.anchor_deltas)
            return m
        if isinstance(m, StandardROIHeads) and isinstance(m.box_head, FastRCNNConvFCHead) and len(m.box_head.fcs):
            m.box_head = FusedFCHead(m.box_head, m.box_pooler.output_size[0], self)
        if isinstance(m, FastRCNNConvFCHead):  # its forward applies relu(fc(x)) to each fc
            self.children(m.convs)
            for i, fc in enumerate(m.fcs):
                m.fcs[i] = self.linear(fc, relu=True)
            return m
        if isinstance(m, FastRCNNPredictor):  # the last layers stay fp32: class scores and box deltas
            m.cls_score = self.linear(m.cls_score, dtype=torch.float32)
            m.bbox_pred = self.linear(m.bbox_pred, dtype=torch.float32)
            return m
        if isinstance(m, MultiScaleRoIAlign):  # fast gather on CPU, else torchvision's on fp32 NCHW
            return FastMultiScaleRoIAlign(m) if self.fast_roi_align else self.fp32_island(m, contiguous=True)
        if isinstance(m, nn.Conv2d):
            return self.conv(m)
        if isinstance(m, nn.Linear):
            return self.linear(m)
        if isinstance(m, nn.ConvTranspose2d):
            return Cast(m, self.dtype)
        if isinstance(m, _NORMS):  # not folded (GroupNorm, BN in training mode): fp32
            return self.fp32_island(m)
        if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False)):
            return self.fp32_island(m)  # an unknown layer with weights
        self.children(m)
        return m

    def children(self, parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = self.module(child)
            if new is not child:
                setattr(parent, name, new)


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Hand freed heap pages (the replaced weights) back to the OS, so they do not stay resident."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def optimize_for_inference(
    model: nn.Module,
    precision: str = "fp32",
    *,
    fold_bn: bool = True,
    fuse: bool = True,
    channels_last: bool = True,
    fast_roi_align: bool = True,
) -> nn.Module:
    """Make an eval-mode model faster for inference, in place; returns it.

    Args:
        model: a detkit model (e.g. :class:`~detkit.models.detector.TwoStageDetector`, a ResNet/FPN
            backbone, a classifier) on its final device, weights loaded.
        precision: ``"fp32"`` or ``"bf16"`` (fp32 with a warning where :func:`bf16_supported` is
            False for the model's device).
        fold_bn: fold frozen / eval-mode BatchNorms into the convolutions.
        fuse: replace convs, linears and residual blocks by the fused modules of this file
            (needed for bf16). Without it only folding and ``channels_last`` apply.
        channels_last: with ``fuse=False``, convert conv weights to channels_last (fused modules
            always are).
        fast_roi_align: on CPU, pool with :class:`FastMultiScaleRoIAlign`.

    The switches after ``precision`` exist to measure each speed lever; keep the defaults. The model
    is put in eval mode without gradients; the precision used is stored as ``model.inference_precision``.
    """
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    precision = resolve_precision(precision, device)
    if precision != "fp32" and not fuse:
        raise ValueError("optimize_for_inference: precision='bf16' needs fuse=True (weights are converted then)")
    model.eval()
    model.requires_grad_(False)
    if fold_bn:
        fold_frozen_bn(model)
    if fuse:
        on_cpu = device.type == "cpu"
        linear_mkldnn = on_cpu and mkldnn_linear_available()
        _Converter(_DTYPES[precision], linear_mkldnn, fast_roi_align and on_cpu).children(model)
    elif channels_last:
        model.to(memory_format=torch.channels_last)
    model.inference_precision = precision
    _release_freed_memory()
    return model
