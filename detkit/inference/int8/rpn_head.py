"""The int8 RPN head: its 3x3 conv tower in int8, its two 1x1 predictors in fp32, one graph per bucket.

The RPN head's 3x3 conv runs on every FPN level at full width (R50-FPN at 800x1216: 48 GMAC, a
third of the backbone + FPN), so in bf16 it was a quarter of an int8 image's time. Here it is one
int8 oneDNN convolution (+ ReLU) per level; the objectness and anchor-delta 1x1 convs (under 1 % of
the head's MACs) are merged into one fp32 conv per level and not quantized: on the demo model
quantizing them cost 0.5 bbox AP, keeping them fp32 cost nothing.

Shapes: the graph of a size bucket takes each level zero-padded at the bottom/right to
``ceil(bucket / stride)``. The 3x3 conv zero-pads its input anyway and zero quantizes exactly, so the
outputs cropped back to the level's size are those of the unpadded level.

Shape shorthand: N images, C channels, A anchors per location, Hi x Wi the size of level i,
(Hb_i, Wb_i) that of the bucket at level i.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import SizeBuckets
from .graphs import compile_graph, export, load_observers, prepare, run_frozen
from .state import Int8State

logger = logging.getLogger("detkit")


def quantizable_rpn_head(model: nn.Module) -> Optional[nn.Module]:
    """``model.rpn.head`` when it is a conv tower + ``objectness`` / ``anchor_deltas`` 1x1 convs
    (:class:`~detkit.models.rpn.RPNHead`), else None."""
    head = getattr(getattr(model, "rpn", None), "head", None)
    parts = [getattr(head, k, None) for k in ("objectness", "anchor_deltas")]
    if not isinstance(getattr(head, "convs", None), nn.ModuleList) or not all(isinstance(p, nn.Conv2d) for p in parts):
        return None
    return head


class HeadGraph(nn.Module):
    """What is exported: per level, a copy of the conv tower (+ ReLU) and the merged 1x1 predictor.

    One copy per level: inductor's int8 lowering does not prepack a weight several convolutions
    share (those ran as fp32 convolutions on dequantized weights, 2x slower than bf16).
    """

    def __init__(self, head: nn.Module, levels: int) -> None:
        super().__init__()
        merged = nn.Conv2d(head.objectness.in_channels, head.objectness.out_channels + head.anchor_deltas.out_channels, 1)
        with torch.no_grad():
            merged.weight.copy_(torch.cat([head.objectness.weight, head.anchor_deltas.weight]))
            merged.bias.copy_(torch.cat([head.objectness.bias, head.anchor_deltas.bias]))
        self.towers = nn.ModuleList(copy.deepcopy(head.convs) for _ in range(levels))
        self.predictors = nn.ModuleList(copy.deepcopy(merged) for _ in range(levels))

    def skip(self) -> list[str]:
        """Module names the quantizer leaves fp32: the predictors."""
        return [f"predictors.{i}" for i in range(len(self.predictors))]

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        """Per level [1, C, Hb_i, Wb_i] (any float dtype) -> [1, A + 4A, Hb_i, Wb_i] fp32."""
        out = []
        for tower, predictor, x in zip(self.towers, self.predictors, features):
            x = x.float()
            for conv in tower:
                x = F.relu(conv(x))
            out.append(predictor(x))
        return tuple(out)


def calibration_graph(head: nn.Module, example: Sequence[Tensor]) -> torch.fx.GraphModule:
    """The prepared (observing) :class:`HeadGraph` for calibration: H, W of every level dynamic."""
    from torch.export import Dim

    graph = HeadGraph(copy.deepcopy(head).float().eval(), len(example))
    shapes = tuple({2: Dim(f"h{i}", min=2, max=4096), 3: Dim(f"w{i}", min=2, max=4096)} for i in range(len(example)))
    # dynamic_shapes has one entry, the *features tuple
    return prepare(export(graph, example, (shapes,), "the RPN head"), graph.skip())


class Int8RPNHead(nn.Module):
    """Replaces an RPN head: same inputs and outputs (per level [N, A, Hi, Wi] logits and [N, 4A,
    Hi, Wi] deltas, fp32), computed by an int8 graph per size bucket, compiled on first use.

    Args:
        head: the fp32 head (kept, not as a submodule, to export graphs from).
        state: the calibration; its ``rpn_head`` statistics and ``meta["rpn_head_input"]`` (the dtype
            the graph was calibrated with and takes).
        buckets: the :class:`SizeBuckets` of the model's :class:`Int8Backbone`.
        strides: the stride of each level the RPN gives the head.
    """

    def __init__(self, head: nn.Module, state: Int8State, buckets: SizeBuckets, strides: Sequence[int]) -> None:
        super().__init__()
        self._fp32 = [copy.deepcopy(head).float().eval()]  # a list: not a submodule
        self.state, self.buckets, self.strides = state, buckets, tuple(int(s) for s in strides)
        self.input_dtype = getattr(torch, str(state.meta.get("rpn_head_input", "float32")))
        self.num_anchors = head.objectness.out_channels
        self._graphs: dict[tuple[int, int], Any] = {}
        self.compile_seconds: dict[tuple[int, int], float] = {}

    def _level_sizes(self, bucket: tuple[int, int]) -> list[tuple[int, int]]:
        return [(math.ceil(bucket[0] / s), math.ceil(bucket[1] / s)) for s in self.strides]

    def _padded(self, x: Tensor, h: int, w: int) -> Tensor:
        """[1, C, Hi, Wi] -> [1, C, h, w] channels_last in the graph's input dtype, zeros beyond."""
        if tuple(x.shape[-2:]) == (h, w) and x.dtype == self.input_dtype and \
                x.is_contiguous(memory_format=torch.channels_last):
            return x
        out = x.new_zeros((1, x.shape[1], h, w), dtype=self.input_dtype).contiguous(memory_format=torch.channels_last)
        out[:, :, : x.shape[2], : x.shape[3]] = x
        return out

    def graph(self, bucket: tuple[int, int]) -> Any:
        """The compiled int8 graph of ``bucket`` (export, load statistics, convert, compile, run once)."""
        if bucket not in self._graphs:
            head = self._fp32[0]
            example = [torch.zeros(1, head.objectness.in_channels, h, w, dtype=self.input_dtype)
                       .contiguous(memory_format=torch.channels_last) for h, w in self._level_sizes(bucket)]
            graph = HeadGraph(head, len(example))
            prepared = prepare(export(graph, example, None, "the RPN head"), graph.skip())
            load_observers(prepared, self.state.rpn_head, self.state.source)
            self._graphs[bucket], seconds = compile_graph(prepared, example)
            self.compile_seconds[bucket] = round(seconds, 2)
            logger.info("int8: compiled the RPN head for %dx%d inputs in %.1f s", *bucket, seconds)
        return self._graphs[bucket]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level [N, C, Hi, Wi] -> (logits [N, A, Hi, Wi], deltas [N, 4A, Hi, Wi]), fp32."""
        h0, w0 = features[0].shape[-2:]
        # the padded image size (a multiple of the backbone's divisibility, so of the first stride)
        bucket = self.buckets.bucket_for(int(h0) * self.strides[0], int(w0) * self.strides[0])
        run, sizes = self.graph(bucket), self._level_sizes(bucket)
        per_image = []
        for i in range(features[0].shape[0]):
            ins = [self._padded(f[i : i + 1], h, w) for f, (h, w) in zip(features, sizes)]
            # (1, A + 4A, Hb_i, Wb_i) -> (1, A + 4A, Hi, Wi)
            per_image.append([o[:, :, : f.shape[2], : f.shape[3]] for o, f in zip(run_frozen(run, *ins), features)])
        levels = [torch.cat(outs) if len(outs) > 1 else outs[0] for outs in zip(*per_image)]
        a = self.num_anchors
        return [o[:, :a] for o in levels], [o[:, a:] for o in levels]

    def extra_repr(self) -> str:
        return f"strides={self.strides}, compiled={sorted(self._graphs)}, input_dtype={self.input_dtype}"
