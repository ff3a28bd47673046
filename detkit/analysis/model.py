"""Parameters and FLOPs of a detector on one image, with a per-module breakdown.

FLOPs are counted by ``torch.utils.flop_counter`` on ``model.predict`` of one dummy uint8 image
(fixed seed): one multiply-add = 2 FLOPs. The mask head's cost grows with the number of
detections, so the report also says how many the dummy image produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import DetectionConfig
from ..data.classes import ClassInfo, resolve_classes
from ..errors import UsageError
from ..machine import resolve_device
from ..models.build import build_detector
from .common import format_table

__all__ = ["ModelAnalysis", "ModelCount", "ModuleCount", "analyze_model", "count_model", "format_model_report",
           "model_classes"]

#: FLOPs are counted by torch.utils.flop_counter: one multiply-add = 2 FLOPs.
FLOP_NOTE = "FLOPs as counted by torch.utils.flop_counter (1 multiply-add = 2 FLOPs)"

#: the smallest image side analyzed, in pixels
MIN_SIZE = 32


@dataclass(frozen=True)
class ModuleCount:
    """One row of the breakdown.

    Attributes:
        name: dotted module name (``backbone.bottom_up``), or ``"(outside modules)"`` for what
            ran outside the top-level children.
        depth: 1 for a top-level child of the detector, 2 for a child of one of those.
        params: number of parameters (elements) of the module.
        flops: FLOPs of all calls of the module during the prediction.
    """

    name: str
    depth: int
    params: int
    flops: int


@dataclass(frozen=True)
class ModelCount:
    """Parameters and FLOPs of one ``model.predict`` call.

    Attributes:
        params: all parameters (elements); trainable: those with ``requires_grad``.
        flops: total FLOPs of the prediction.
        modules: the top-level children and their children, then ``"(outside modules)"``.
        num_detections: detections on the dummy image.
    """

    params: int
    trainable: int
    flops: int
    modules: list[ModuleCount]
    num_detections: int


@dataclass(frozen=True)
class ModelAnalysis:
    """What :func:`analyze_model` measured; ``report`` is the printed text."""

    classes: ClassInfo
    height: int
    width: int
    count: ModelCount
    report: str


def model_classes(cfg: DetectionConfig, num_classes: Optional[int] = None) -> ClassInfo:
    """The classes to build the model with: ``num_classes`` (``--num-classes``) when given, else
    :func:`~detkit.data.classes.resolve_classes` of ``cfg`` (a ConfigError saying what to set when
    the config names no classes)."""
    if num_classes is not None:
        return ClassInfo.from_count(num_classes, "--num-classes")
    return resolve_classes(cfg)


def count_model(model: nn.Module, size: tuple[int, int], device: str = "cpu") -> ModelCount:
    """Parameters and FLOPs of ``model.predict`` on one dummy ``size = (h, w)`` uint8 image on ``device``.

    The modules counted are the top-level children and their children; FLOPs of a module are
    accumulated over all its calls; ``"(outside modules)"`` holds what ran elsewhere.
    """
    model.eval()
    named = dict(model.named_modules())
    tracked: list[tuple[str, int]] = []
    for name, child in model.named_children():
        tracked.append((name, 1))
        tracked.extend((f"{name}.{sub}", 2) for sub, _ in child.named_children())
    flops = {name: 0 for name, _ in tracked}
    counter = FlopCounterMode(display=False)
    starts: dict[str, list[int]] = {name: [] for name, _ in tracked}
    handles = []
    for name, _ in tracked:
        mod = named[name]

        def pre(_m: Any, _i: Any, name: str = name) -> None:
            starts[name].append(counter.get_total_flops())

        def post(_m: Any, _i: Any, _o: Any, name: str = name) -> None:
            flops[name] += counter.get_total_flops() - starts[name].pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, size[0], size[1]), dtype=torch.uint8, generator=gen).to(device)
    try:
        with torch.no_grad(), counter:
            dets = model.predict([image])
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    rows = [ModuleCount(name, depth, sum(p.numel() for p in named[name].parameters()), flops[name])
            for name, depth in tracked]
    outside = total - sum(r.flops for r in rows if r.depth == 1)
    rows.append(ModuleCount("(outside modules)", 1, 0, outside))
    return ModelCount(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops=total,
        modules=rows,
        num_detections=len(dets[0]) if dets else 0,
    )


def format_model_report(count: ModelCount, title: str) -> str:
    """The printed report of :func:`count_model`: totals, then the per-module table."""
    total = max(count.flops, 1)
    rows = [[("  " * (m.depth - 1)) + m.name, f"{m.params:,}", f"{m.flops / 1e9:.3f}", f"{100.0 * m.flops / total:.1f}"]
            for m in count.modules]
    table = format_table(["module", "params", "GFLOPs", "% FLOPs"], rows)
    return "\n".join([
        title,
        f"parameters: {count.params:,} ({count.trainable:,} trainable)",
        f"FLOPs per image: {count.flops / 1e9:.3f} GFLOPs ({count.flops:,})",
        f"note: {FLOP_NOTE}; detections on the dummy image: {count.num_detections} "
        "(the mask head's cost grows with the number of detections)",
        "",
        table,
    ])


def analyze_model(cfg: DetectionConfig, *, num_classes: Optional[int] = None, size: Optional[int] = None,
                  width: Optional[int] = None, device: str = "cpu") -> ModelAnalysis:
    """Build the detector of ``cfg`` (no weights loaded: counts do not depend on them) and count it.

    Args:
        num_classes: ``--num-classes``; overrides the config's classes (see :func:`model_classes`).
        size: image height in pixels (default: ``input.min_size_test``); width: default ``size``.
        device: ``cpu`` or ``cuda[:i]``.

    Raises:
        ConfigError: the config names no classes and ``num_classes`` is None.
        UsageError: CUDA requested but unavailable; an image side under 32 pixels.
    """
    classes = model_classes(cfg, num_classes)
    if num_classes is not None and cfg.model.num_classes not in (None, classes.num_classes):
        cfg = cfg.model_copy(deep=True)
        cfg.model.num_classes = classes.num_classes  # the explicit flag wins over the config
    resolve_device(device)
    h = size or cfg.input.min_size_test
    w = width or h
    if h < MIN_SIZE or w < MIN_SIZE:
        raise UsageError(f"--size {h} / --width {w}: use at least {MIN_SIZE} pixels")
    model = build_detector(cfg, classes.num_classes).to(device)
    count = count_model(model, (h, w), device)
    title = (f"model: {cfg.model.meta_architecture} {cfg.model.backbone.name}-FPN, {classes.num_classes} classes "
             f"from {classes.source}, input {h}x{w}")
    return ModelAnalysis(classes, h, w, count, format_model_report(count, title))
