"""The PT2E steps shared by the int8 backbone and RPN head: export, annotate, observe, convert, compile.

A module is exported with ``torch.export`` (dynamic shapes for calibration, static for a size
bucket), annotated by ``X86InductorQuantizer`` (int8 activations per tensor, int8 weights per
channel; conv+ReLU and conv+add+ReLU fused; modules named in ``skip`` stay fp32), calibrated or
loaded with saved statistics, converted (``convert_pt2e``) and lowered by ``torch.compile``
(inductor with freezing), which turns the quantize/dequantize pattern into oneDNN int8 convolutions.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .state import QuantizationError

_OBSERVER = "activation_post_process_"
#: ops whose output values are among their first input's: a static graph observes their outputs, the
#: dynamic-shape calibration graph may not (upsample_nearest2d.vec); they take their input's statistics
_VALUE_PRESERVING = ("upsample_nearest2d", "max_pool2d", "_to_copy", "clone", "contiguous")
#: aten ops given one source partition per call (see :func:`export`)
_PER_CALL = {torch.ops.aten.relu.default: nn.ReLU, torch.ops.aten.relu_.default: nn.ReLU,
             torch.ops.aten.conv2d.default: nn.Conv2d}


def export(module: nn.Module, example: Sequence[Tensor], dynamic_shapes: Any = None,
           what: str = "the backbone") -> torch.fx.GraphModule:
    """``torch.export`` of ``module`` (non-strict) on ``example``, ready for the x86 quantizer."""
    try:
        gm = torch.export.export(module, tuple(example), dynamic_shapes=dynamic_shapes, strict=False).module()
    except Exception as e:  # noqa: BLE001 - one line naming the cause
        raise QuantizationError(f"int8: torch.export of {what} failed ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from e
    # Non-strict export leaves one source partition per module, so a ReLU module a block calls twice
    # would be one partition with two outputs, which the x86 quantizer rejects: one per call instead.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _PER_CALL:
            node.meta["source_fn_stack"] = [(node.name, _PER_CALL[node.target])]
    return gm


def prepare(gm: torch.fx.GraphModule, skip: Sequence[str] = ()) -> torch.fx.GraphModule:
    """Annotate with the x86 inductor quantizer and insert observers; modules named in ``skip`` stay fp32."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    for name in skip:
        quantizer.set_module_name_qconfig(name, None)
    return prepare_pt2e(gm, quantizer)


def pad_to(x: Tensor, h: int, w: int) -> Tensor:
    """``x`` [..., H, W] zero-padded at the bottom/right to ``h`` x ``w``."""
    return x if tuple(x.shape[-2:]) == (h, w) else F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


def observers(prepared: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """The observer modules of a prepared graph by the name of the node they observe (names are the
    same in the dynamic-shape calibration graph and the static graphs of the buckets)."""
    out: dict[str, nn.Module] = {}
    for n in prepared.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(_OBSERVER):
            out.setdefault(n.args[0].name, prepared.get_submodule(n.target))
    return out


def observer_state(prepared: torch.fx.GraphModule) -> dict[str, Tensor]:
    """The observers' buffers, by ``"<observed node>.<buffer>"`` (what :class:`Int8State` keeps)."""
    return {f"{node}.{k}": v.detach().clone() for node, obs in observers(prepared).items()
            for k, v in obs.state_dict().items()}


def load_observers(prepared: torch.fx.GraphModule, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` (from :func:`observer_state`) into the observers of ``prepared`` (a static graph)."""
    saved: dict[str, dict[str, Tensor]] = {}
    for key, v in state.items():
        node, _, buf = key.rpartition(".")
        saved.setdefault(node, {})[buf] = v
    nodes = {n.name: n for n in prepared.graph.nodes}
    for name, obs in observers(prepared).items():
        src, node = name, nodes[name]
        while src not in saved and any(op in str(node.target) for op in _VALUE_PRESERVING):
            node = node.args[0]
            src = node.name
        if src not in saved:
            raise QuantizationError(
                f"int8: {source} has no statistics for {name!r} of this model's graph: another "
                "architecture or torch/torchao version; quantize again")
        try:
            obs.load_state_dict(saved[src])
        except RuntimeError as e:
            raise QuantizationError(f"int8: {source}: statistics of {name!r} do not fit "
                                    f"({str(e).splitlines()[0]}); quantize again") from None


def compile_graph(prepared: torch.fx.GraphModule, example: Sequence[Tensor], dynamic: bool = False) -> tuple[Any, float]:
    """Convert a prepared graph (observers loaded) and compile it for the shapes of ``example``
    (``dynamic``: for the dynamic dims it was exported with); returns the compiled callable and the
    seconds it took (compiling happens in its first run)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    t0 = time.perf_counter()
    compiled = torch.compile(convert_pt2e(prepared), dynamic=dynamic)
    # freezing (weights as constants) lets inductor prepack the int8 weights and fuse the
    # quantize / dequantize pattern into oneDNN int8 convolutions
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        compiled(*example)
    return compiled, time.perf_counter() - t0


def run_frozen(compiled: Any, *inputs: Tensor) -> Any:
    """Call a graph of :func:`compile_graph`, without gradients and with freezing: a call in another
    grad mode than the first (no_grad vs inference_mode) recompiles, and without freezing (which
    also needs gradients off) that graph would run fp32 matmuls on dequantized weights."""
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        return compiled(*inputs)


def as_tensor(im: Any) -> Tensor:
    """A uint8 HxWx3 array (or a [3, H, W] tensor) as a [3, H, W] tensor."""
    import numpy as np

    if isinstance(im, Tensor):
        return im
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))

