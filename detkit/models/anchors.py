"""Anchor generation for multi-level feature maps."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["AnchorGenerator"]

_MAX_CACHE = 64  # per generator; multi-scale training produces a bounded set of sizes


def _broadcast(name: str, values: Sequence[Sequence[float]], num_levels: int) -> list[list[float]]:
    values = [list(map(float, v)) for v in values]
    if len(values) == 1:
        return values * num_levels
    if len(values) != num_levels:
        raise ValueError(
            f"AnchorGenerator: {name} has {len(values)} entries but there are {num_levels} levels "
            f"(strides); give one entry per level or a single entry for all"
        )
    return values


class AnchorGenerator(nn.Module):
    """Dense anchors for each feature level.

    Args:
        sizes: per level, anchor sizes in pixels (sqrt of the area); one entry means all levels.
        aspect_ratios: per level, ratios ``h / w``; one entry means all levels.
        strides: stride of each level relative to the input image.
        offset: anchor center offset in units of the stride (0.0 puts the first center at pixel 0,
            as torchvision and Detectron2 do).
        round_base: round the zero-centered cell anchors to integers (torchvision does).
        torchvision_strides: take each level's stride, per axis, as ``padded_size // level_size``
            where ``padded_size = first_level_size * strides[0]``, as torchvision computes it from
            the padded image. It differs from ``strides`` only for levels whose size was rounded up
            (e.g. p6 of an input whose padded height / 32 is odd: stride 61 instead of 64 at 800 px).

    Cell anchors are ordered ratio-major, size-minor; grid anchors location-major, anchor-minor.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
        round_base: bool = False,
        torchvision_strides: bool = False,
    ) -> None:
        super().__init__()
        self.strides = [int(s) for s in strides]
        num_levels = len(self.strides)
        self.sizes = _broadcast("sizes", sizes, num_levels)
        self.aspect_ratios = _broadcast("aspect_ratios", aspect_ratios, num_levels)
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"AnchorGenerator: offset must be in [0, 1), got {offset}")
        self.offset = float(offset)
        self.round_base = bool(round_base)
        self.torchvision_strides = bool(torchvision_strides)
        self._cache: dict[tuple, Tensor] = {}

    @property
    def num_anchors(self) -> list[int]:
        """Anchors per location, per level."""
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def cell_anchors(self, level: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Zero-centered anchors ``[A, 4]`` (xyxy) of one level."""
        scales = torch.as_tensor(self.sizes[level], dtype=dtype, device=device)
        ratios = torch.as_tensor(self.aspect_ratios[level], dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # (R, S) -> (R*S,)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base.round() if self.round_base else base

    def _grid_anchors(
        self, level: int, size: tuple[int, int], stride: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        tracing = torch.jit.is_tracing()  # export: sizes are traced tensors; no cache (it would hold graph values)
        key = (level, size, stride, dtype, device)
        cached = None if tracing else self._cache.get(key)
        if cached is not None:
            return cached
        h, w = size
        sy, sx = stride
        base = self.cell_anchors(level, dtype, device)
        shifts_x = (torch.arange(w, device=device, dtype=torch.int64) * sx).to(dtype) + self.offset * sx
        shifts_y = (torch.arange(h, device=device, dtype=torch.int64) * sy).to(dtype) + self.offset * sy
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        # (H*W, 1, 4) + (1, A, 4) -> (H*W*A, 4)
        anchors = (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)
        if tracing:
            return anchors
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Anchors for each level.

        Args:
            features: per level, a [N, C, Hi, Wi] feature map (only its size, dtype, device are used).

        Returns:
            per level, float32 (float64 for float64 features) [Hi*Wi*A, 4] xyxy anchors in
            input-image pixels, shared by the batch.
        """
        if len(features) != len(self.strides):
            raise ValueError(
                f"AnchorGenerator: got {len(features)} feature maps but was built for {len(self.strides)} levels"
            )
        if torch.jit.is_tracing():  # keep the sizes as traced 0-dim tensors so the export stays dynamic
            sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        else:
            sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        if self.torchvision_strides:
            pad_h, pad_w = sizes[0][0] * self.strides[0], sizes[0][1] * self.strides[0]
            strides = [(pad_h // h, pad_w // w) for h, w in sizes]
        else:
            strides = [(s, s) for s in self.strides]
        # low-precision features (autocast) still get float32 anchors: pixel coordinates need the bits
        dtype = torch.float64 if features[0].dtype == torch.float64 else torch.float32
        return [
            self._grid_anchors(i, size, stride, dtype, f.device)
            for i, (f, size, stride) in enumerate(zip(features, sizes, strides))
        ]
