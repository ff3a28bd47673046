"""The int8 box head: the fully-connected layers of a "2fc" box head in int8, one dynamic-shape graph.

The box head's first FC (R50-FPN: 1000 RoIs x 12544 -> 1024, 12.8 GMAC) was about 0.07-0.09 s per
image in bf16 on a 2-core AVX512 CPU; as an int8 oneDNN linear (+ ReLU) it measured about half
that. The RoI count changes from image to image, so this graph is compiled once with a dynamic
first dimension (measured as fast as a static one for linear layers, unlike convolutions). Heads
with convolutions (``4conv1fc``) and Cascade's per-stage heads are left as they are.

Shape shorthand: R RoIs, C channels, S the pooler's output side, D the head's output size.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graphs import compile_graph, export, load_observers, prepare, run_frozen
from .state import Int8State

logger = logging.getLogger("detkit")

_MIN_ROWS = 2  # inputs with fewer RoIs are zero-padded (0 and 1 are specialized sizes for torch.export)


def quantizable_box_head(model: nn.Module) -> Optional[nn.Module]:
    """``model.roi_heads.box_head`` when it is FC layers only (``convs`` empty, ``fcs`` Linear
    layers: the standard "2fc" head), else None."""
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    convs, fcs = getattr(head, "convs", None), getattr(head, "fcs", None)
    if not isinstance(convs, nn.ModuleList) or len(convs) or not isinstance(fcs, nn.ModuleList) or not len(fcs):
        return None
    return head if all(isinstance(fc, nn.Linear) for fc in fcs) else None


class FCGraph(nn.Module):
    """What is exported: ``relu(fc(x))`` for each FC, on the pooled features flattened in ``(S, S, C)``
    order (a view of the channels-last features the CPU RoIAlign gives; the first FC's weight is
    permuted to match)."""

    def __init__(self, head: nn.Module, channels: int) -> None:
        super().__init__()
        self.fcs = copy.deepcopy(head.fcs).float().eval()
        w = self.fcs[0].weight.data  # (D, C*S*S) -> (D, C, S, S) -> (D, S, S, C) -> (D, S*S*C)
        side = int(round((w.shape[1] // channels) ** 0.5))
        self.fcs[0].weight.data = w.view(w.shape[0], channels, side, side).permute(0, 2, 3, 1).reshape(w.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] (any float dtype) -> [R, D] fp32."""
        x = x.float().permute(0, 2, 3, 1).flatten(1)  # (R, C, S, S) -> (R, S*S*C)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return x


def _rows() -> Any:
    from torch.export import Dim

    return {"x": {0: Dim("rois", min=_MIN_ROWS, max=1 << 20)}}


def calibration_graph(head: nn.Module, example: Tensor) -> torch.fx.GraphModule:
    """The prepared (observing) :class:`FCGraph` for calibration, the RoI count dynamic."""
    return prepare(export(FCGraph(head, example.shape[1]), (pad_rows(example),), _rows(), "the box head"))


def pad_rows(x: Tensor) -> Tensor:
    if x.shape[0] >= _MIN_ROWS:
        return x
    return torch.cat([x, x.new_zeros((_MIN_ROWS - x.shape[0], *x.shape[1:]))])


class Int8BoxHead(nn.Module):
    """Replaces a "2fc" box head: [R, C, S, S] pooled features -> [R, D] fp32, through one int8
    graph (compiled on first use, any R).

    Args:
        head: the fp32 head (kept, not as a submodule, to export the graph from).
        state: the calibration; its ``box_head`` statistics and ``meta["box_head_input"]`` (the
            dtype the graph was calibrated with and takes).
        example_shape: ``(C, S, S)`` of the pooled features.
    """

    def __init__(self, head: nn.Module, state: Int8State, example_shape: Sequence[int]) -> None:
        super().__init__()
        self._fp32 = [copy.deepcopy(head).float().eval()]  # a list: not a submodule
        self.state, self.example_shape = state, tuple(int(v) for v in example_shape)
        self.input_dtype = getattr(torch, str(state.meta.get("box_head_input", "float32")))
        self.output_dim = int(head.fcs[-1].out_features)
        self._graph: list[Any] = []  # a list: the compiled graph is not a submodule (eval()/train() reach those)
        self.compile_seconds: Optional[float] = None

    def graph(self) -> Any:
        """The compiled int8 graph (export, load statistics, convert, compile, run once)."""
        if not self._graph:
            t0 = time.perf_counter()
            example = torch.zeros(8, *self.example_shape, dtype=self.input_dtype).contiguous(
                memory_format=torch.channels_last)  # as the CPU RoIAlign gives them
            prepared = prepare(export(FCGraph(self._fp32[0], self.example_shape[0]), (example,), _rows(),
                                      "the box head"))
            load_observers(prepared, self.state.box_head, self.state.source)
            self._graph.append(compile_graph(prepared, (example,), dynamic=True)[0])
            self.compile_seconds = round(time.perf_counter() - t0, 2)
            logger.info("int8: compiled the box head in %.1f s", self.compile_seconds)
        return self._graph[0]

    def forward(self, x: Tensor) -> Tensor:
        """[R, C, S, S] -> [R, D] fp32."""
        n = x.shape[0]
        if n == 0:
            return x.new_zeros((0, self.output_dim), dtype=torch.float32)
        return run_frozen(self.graph(), pad_rows(x.to(self.input_dtype)))[:n]

    def extra_repr(self) -> str:
        return f"input_dtype={self.input_dtype}, compiled={bool(self._graph)}"
