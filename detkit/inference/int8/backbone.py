"""The int8 backbone + FPN: one compiled static graph per size bucket.

Image sizes: dynamic-shape lowering was measured 1.6x slower than static (R50-FPN, 800x1216), so
each padded input is zero-padded further to a *size bucket* (:func:`size_buckets`: the short side
of ``input.min_size_test``, long sides between it and ``input.max_size_test``, both orientations),
one static graph per bucket is compiled on first use, and the features are cropped back to the sizes
the unbucketed input gives (the RPN sees the same anchors as in fp32; only features near the
bottom/right border see the extra zeros). Inputs no bucket holds get a bucket of their own.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .graphs import compile_graph, export, load_observers, pad_to, prepare, run_frozen
from .state import Int8State

logger = logging.getLogger("detkit")


def size_buckets(min_size: int, max_size: int, divisibility: int, steps: int = 4) -> list[tuple[int, int]]:
    """Padded ``(H, W)`` input sizes compiled for: short side ``min_size`` rounded up to
    ``divisibility``, long sides ``steps`` evenly spaced sizes up to ``max_size`` (``4 * min_size``
    when it is 0), landscape then portrait."""
    d = max(int(divisibility), 1)
    short = math.ceil(min_size / d) * d
    longest = math.ceil((max_size if max_size > 0 else 4 * min_size) / d) * d
    longs = sorted({math.ceil((short + (longest - short) * k / steps) / d) * d for k in range(1, steps + 1)})
    return [(short, w) for w in longs] + [(w, short) for w in longs]


class SizeBuckets:
    """The padded input sizes graphs are compiled for, smallest first (shared by the int8 backbone and
    RPN head, so that both pick the same bucket for an image); grows when an input fits none."""

    def __init__(self, sizes: Sequence[tuple[int, int]], divisibility: int) -> None:
        self.divisibility = max(int(divisibility), 32)
        self.sizes = sorted({(int(h), int(w)) for h, w in sizes}, key=lambda b: b[0] * b[1])

    def bucket_for(self, h: int, w: int) -> tuple[int, int]:
        """The smallest bucket holding an ``h`` x ``w`` input (a new one when none does)."""
        fits = [b for b in self.sizes if b[0] >= h and b[1] >= w]
        if fits:
            return fits[0]
        d = self.divisibility
        new = (max(math.ceil(h / d) * d, 2 * d), max(math.ceil(w / d) * d, 2 * d))
        logger.info("int8: input %dx%d fits no size bucket; adding %dx%d", h, w, *new)
        self.sizes = sorted([*self.sizes, new], key=lambda b: b[0] * b[1])
        return new

    def __repr__(self) -> str:
        return repr(self.sizes)


class Features(nn.Module):
    """The backbone with a tuple output (what ``torch.export`` and the quantizer need)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(x).values())


class Int8Backbone(nn.Module):
    """Runs the int8 backbone+FPN: one compiled static graph per size bucket, built on first use.

    Inputs are zero-padded to the smallest bucket holding them and the features cropped back to
    ``ceil(size / stride)``; outputs are channels_last in ``out_dtype``. It holds no parameters of
    its own (``optimize_for_inference`` leaves it as it is); ``compile_seconds`` maps each compiled
    bucket to its export + convert + compile + first-run time.
    """

    def __init__(self, backbone: nn.Module, state: Int8State, buckets: SizeBuckets,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.output_specs = dict(backbone.output_specs)
        self.buckets, self.out_dtype, self.state = buckets, out_dtype, state
        self._fp32 = [backbone]  # a list: not a submodule (no parameters to convert or to save)
        self._graphs: dict[tuple[int, int], Any] = {}
        self.compile_seconds: dict[tuple[int, int], float] = {}

    @property
    def size_divisibility(self) -> int:
        return max(s.stride for s in self.output_specs.values())

    def graph(self, bucket: tuple[int, int]) -> Any:
        """The compiled int8 graph of ``bucket`` (export, load observers, convert, compile, run once)."""
        if bucket not in self._graphs:
            example = torch.zeros(1, 3, *bucket)
            prepared = prepare(export(Features(self._fp32[0]), (example,)))
            load_observers(prepared, self.state.observers, self.state.source)
            self._graphs[bucket], seconds = compile_graph(prepared, (example,))
            self.compile_seconds[bucket] = round(seconds, 2)
            logger.info("int8: compiled the backbone for %dx%d inputs in %.1f s", *bucket, seconds)
        return self._graphs[bucket]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """[N, 3, H, W] -> ``{p_k: [N, C, ceil(H / 2^k), ceil(W / 2^k)]}``."""
        h, w = int(x.shape[2]), int(x.shape[3])
        bh, bw = self.buckets.bucket_for(h, w)
        run = self.graph((bh, bw))
        outs = [run_frozen(run, pad_to(x[i : i + 1].float(), bh, bw)) for i in range(x.shape[0])]
        feats = {}
        for k, (name, spec) in enumerate(self.output_specs.items()):
            s = spec.stride
            f = torch.cat([o[k] for o in outs]) if len(outs) > 1 else outs[0][k]
            f = f[:, :, : math.ceil(h / s), : math.ceil(w / s)]
            feats[name] = f.to(dtype=self.out_dtype, memory_format=torch.channels_last)
        return feats

    def extra_repr(self) -> str:
        return f"buckets={self.buckets}, compiled={sorted(self._graphs)}, out_dtype={self.out_dtype}"
