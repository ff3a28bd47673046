"""Inference-only layers of the fast CPU path (:func:`detkit.inference.optimize.optimize_for_inference`).

* :class:`InferenceConv2d`: a convolution (+ folded norm, + ReLU) with weights in a chosen dtype and
  memory format, so oneDNN runs channels-last kernels without reorders; optionally through oneDNN's
  own convolution operator with a prepacked weight and fused ReLU / residual-add post-ops;
* :class:`PackedLinear`: a ``Linear`` (+ ReLU) with a oneDNN-prepacked weight on CPU;
* :class:`Cast`: runs a module in another dtype (fp32 islands in a bf16 model).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Cast", "InferenceConv2d", "PackedLinear", "check_device", "onednn_conv_available"]

_LINEAR_HINT_ROWS = 512  # rows assumed when pre-reordering linear weights (RoIs per batch)


def onednn_conv_available() -> bool:
    """True when this PyTorch build has oneDNN's fused convolution operators (``InferenceConv2d(onednn=True)``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, n) for n in ("_convolution_pointwise", "_reorder_convolution_weight"))
    except RuntimeError:
        return False


def check_device(module: nn.Module, x: Tensor) -> None:
    if x.device != module.device:
        raise RuntimeError(
            f"{type(module).__name__} was optimized for {module.device} but got an input on {x.device}; "
            "move the model first, then call detkit.inference.optimize.optimize_for_inference"
        )


class InferenceConv2d(nn.Module):
    """Inference-only ``Conv2d`` (+ optional in-place ReLU) with its weight prepared once.

    The weight is stored channels_last in ``dtype`` (buffers ``weight`` and ``bias``, moved by
    ``.to(device)``); inputs are cast to ``dtype`` and made channels_last, outputs are channels_last
    ``dtype``. On CPU ``F.conv2d`` then runs oneDNN's channels-last kernels without layout reorders.

    ``onednn=True`` (CPU, ungrouped convolutions) calls oneDNN's convolution operator directly
    (``torch.ops.mkldnn._convolution_pointwise``) with the weight prepacked once, at the first call, into
    the blocked layout oneDNN picks for that input shape, and with the ReLU and the residual add fused
    into the kernel as post-ops (no extra pass over the output). It pays where the weight reorder
    is expensive (AMX tiles); :func:`detkit.inference.optimize.optimize_for_inference` chooses it from the CPU's
    flags (``conv_kernel="auto"``). Results equal ``F.conv2d``'s up to float rounding.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, dtype: torch.dtype = torch.float32,
                 onednn: bool = False) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"InferenceConv2d: needs explicit zero padding, got padding={conv.padding!r} "
                             f"padding_mode={conv.padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.relu, self.dtype = bool(relu), dtype
        self.register_buffer("weight", conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().to(dtype))
        # (grouped convolutions stay on F.conv2d: oneDNN's fused residual add rejects them in bf16)
        self.onednn = bool(onednn) and self.groups == 1 and self.weight.device.type == "cpu" \
            and onednn_conv_available()
        self._packed: Optional[Tensor] = None  # oneDNN's blocked weight (``onednn``), made at the first call

    def _conv(self, x: Tensor) -> Tensor:
        x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _onednn_weight(self, x: Tensor) -> Tensor:
        if self._packed is None or self._packed.dtype != self.weight.dtype:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
        return self._packed

    def _use_onednn(self, x: Tensor) -> bool:
        return self.onednn and x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.jit.is_scripting()

    def forward(self, x: Tensor) -> Tensor:
        """[N, C_in, H, W] -> [N, C_out, H', W'] (channels_last, ``dtype``)."""
        if self._use_onednn(x):
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._onednn_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
                "relu" if self.relu else "none", [], "")
        y = self._conv(x)
        return y.relu_() if self.relu else y

    def forward_add_relu(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + other)`` in place: the end of a residual block (``self.relu`` is not used)."""
        if self._use_onednn(x):
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
            other = other.to(dtype=self.dtype, memory_format=torch.channels_last)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, self._onednn_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", 1.0, "relu", [], "")
        return self._conv(x).add_(other.to(self.dtype)).relu_()

    def _apply(self, fn: Any, recurse: bool = True) -> "InferenceConv2d":
        self._packed = None  # ``.to()`` / ``.bfloat16()``: repack from the moved weight
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, "
                f"groups={self.groups}, relu={self.relu}, dtype={self.dtype}, onednn={self.onednn}")


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
        check_device(self, x)
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
