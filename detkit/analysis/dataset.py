"""Statistics and plots of a dataset split: images, instances per class (and after the repeat factors of
``dataloader.sampler=repeat_factor``), box sizes and aspect ratios, image sizes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import DetectionConfig
from ..data.coco import CocoData
from ..data.samplers import repeat_factors
from ..engine.detection import load_split, resolve_data_paths
from ..fileio import write_text_atomic
from .common import format_table, require_matplotlib, save_figure

__all__ = ["DatasetAnalysis", "DatasetStats", "analyze_dataset", "dataset_statistics", "format_dataset_report",
           "plot_dataset"]


@dataclass
class DatasetStats:
    """Statistics of a split (validated annotations; crowd regions counted apart).

    Attributes:
        class_names: the dataset's classes, in label order.
        num_images: images in the split; images_without_instances: those with no non-crowd box.
        instances_per_class: class name -> non-crowd instances, in label order.
        num_instances: all non-crowd instances; num_crowd: crowd regions.
        sqrt_areas: float64 ``(N,)`` sqrt(box area) in pixels of the non-crowd boxes.
        aspect_ratios: float64 ``(M,)`` height / width of the non-crowd boxes with width > 0.
        image_sizes: Counter of ``(height, width)`` in pixels.
        num_dropped: reason -> annotations dropped at validation.
        repeated_per_class: with ``dataloader.sampler=repeat_factor``: class name -> instances an epoch
            holds on average after the repeat factors (in label order); else None.
        repeat_threshold: the threshold those factors were computed with (None without them).
        images_per_epoch: the images an epoch holds on average after the repeat factors (None without them).
    """

    class_names: list[str]
    num_images: int
    images_without_instances: int
    instances_per_class: dict[str, int]
    num_instances: int
    num_crowd: int
    sqrt_areas: np.ndarray
    aspect_ratios: np.ndarray
    image_sizes: Counter = field(default_factory=Counter)
    num_dropped: dict[str, int] = field(default_factory=dict)
    repeated_per_class: Optional[dict[str, float]] = None
    repeat_threshold: Optional[float] = None
    images_per_epoch: Optional[float] = None


@dataclass(frozen=True)
class DatasetAnalysis:
    """What :func:`analyze_dataset` computed and wrote: the report text, the table and the PNG."""

    stats: DatasetStats
    report: str
    text_path: Path
    plot_path: Path


def dataset_statistics(data: CocoData, repeat_threshold: Optional[float] = None,
                       filter_empty: bool = True) -> DatasetStats:
    """Statistics of a loaded :class:`~detkit.data.coco.CocoData`.

    ``repeat_threshold``: also count the instances per class after the repeat factors of
    ``dataloader.sampler=repeat_factor`` (on the images training keeps: without those without instances
    when ``filter_empty``).
    """
    names = list(data.class_names)
    table = data.records
    inst = table.instances
    counts = np.diff(inst.offsets)
    per_class = np.bincount(inst.labels, minlength=len(names))
    boxes = inst.boxes.astype(np.float64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    sizes = Counter(zip(table.heights.tolist(), table.widths.tolist()))
    stats = DatasetStats(
        class_names=names,
        num_images=len(table),
        images_without_instances=int((counts == 0).sum()),
        instances_per_class={names[k]: int(per_class[k]) for k in range(len(names))},
        num_instances=int(per_class.sum()),
        num_crowd=len(table.crowds.labels),
        sqrt_areas=np.sqrt(np.clip(w * h, 0, None)),
        aspect_ratios=h[w > 0] / w[w > 0],
        image_sizes=sizes,
        num_dropped=dict(data.num_dropped or {}),
    )
    if repeat_threshold is not None:
        used = counts > 0 if filter_empty else np.ones(len(counts), bool)
        factors = repeat_factors(inst.labels, inst.offsets, len(names), repeat_threshold, int(used.sum()))
        repeated = np.bincount(inst.labels, weights=np.repeat(factors, counts), minlength=len(names))
        stats.repeated_per_class = {names[k]: float(repeated[k]) for k in range(len(names))}
        stats.repeat_threshold, stats.images_per_epoch = repeat_threshold, float(factors[used].sum())
    return stats


def _histogram_lines(values: np.ndarray, label: str, edges: np.ndarray) -> list[str]:
    counts, edges = np.histogram(values, bins=edges)
    rows = [[f"[{edges[i]:.3g}, {edges[i + 1]:.3g})", int(c)] for i, c in enumerate(counts)]
    return ["", f"{label}: min {values.min():.3g}  median {np.median(values):.3g}  max {values.max():.3g}",
            format_table(["bin", "boxes"], rows)]


def format_dataset_report(stats: DatasetStats, title: str, bins: int) -> str:
    """Text tables: summary, instances per class, size / aspect-ratio histograms (at most 12 bins), image sizes."""
    lines = [title,
             f"images: {stats.num_images} ({stats.images_without_instances} without instances)",
             f"instances: {stats.num_instances} (+ {stats.num_crowd} crowd regions) in {len(stats.class_names)} classes"]
    dropped = {k: v for k, v in stats.num_dropped.items() if v}
    if dropped:
        lines.append("dropped at validation: " + ", ".join(f"{k}: {v}" for k, v in dropped.items()))
    total = max(stats.num_instances, 1)
    rows = [[name, n, f"{100.0 * n / total:.1f}"] for name, n in stats.instances_per_class.items()]
    headers = ["class", "instances", "%"]
    title = "instances per class"
    if stats.repeated_per_class is not None:
        rep_total = max(sum(stats.repeated_per_class.values()), 1.0)
        for row in rows:
            r = stats.repeated_per_class[row[0]]
            row += [f"{r:.1f}", f"{100.0 * r / rep_total:.1f}", f"x{r / max(row[1], 1):.2f}" if row[1] else "-"]
        headers += ["after repeat factors", "%", "factor"]
        title += (f" (after repeat factors: an epoch's average with dataloader.repeat_threshold="
                  f"{stats.repeat_threshold:g}, {stats.images_per_epoch:.0f} images)")
    lines += ["", title, format_table(headers, rows)]
    v = stats.sqrt_areas
    if v.size:
        lines += _histogram_lines(v, "box size sqrt(area) in pixels", np.histogram_bin_edges(v, bins=min(bins, 12)))
        small, medium = int((v < 32).sum()), int(((v >= 32) & (v < 96)).sum())
        lines.append(f"COCO scales: small (<32) {small}, medium (32-96) {medium}, large (>=96) {v.size - small - medium}")
    v = stats.aspect_ratios
    if v.size:  # log-spaced bins: ratios 1/4 and 4 are equally far from 1
        lo, hi = max(v.min(), 1e-3), max(v.max(), 1e-3)
        edges = np.geomspace(lo, hi * (1 + 1e-9), min(bins, 12) + 1) if hi > lo else np.array([lo, lo * 1.001])
        lines += _histogram_lines(v, "box aspect ratio h/w", edges)
    rows = [[f"{h}x{w}", n] for (h, w), n in stats.image_sizes.most_common(10)]
    lines += ["", f"image sizes (height x width, {len(stats.image_sizes)} distinct, 10 most common)",
              format_table(["size", "images"], rows)]
    return "\n".join(lines)


def plot_dataset(stats: DatasetStats, path: Path, title: str, bins: int) -> None:
    """One PNG with four panels: instances per class, sqrt(area) and aspect-ratio histograms, image sizes."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    names = list(stats.instances_per_class)
    ax = axes[0, 0]
    ax.bar(range(len(names)), [stats.instances_per_class[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=max(4, min(9, 400 // max(len(names), 1))))
    ax.set_ylabel("instances")
    ax.set_title("instances per class")
    ax = axes[0, 1]
    if stats.sqrt_areas.size:
        ax.hist(stats.sqrt_areas, bins=bins, color="tab:orange")
        for x in (32, 96):
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("sqrt(box area) [px]  (dashed: COCO small/medium/large)")
    ax.set_title("box sizes")
    ax = axes[1, 0]
    ar = stats.aspect_ratios
    if ar.size:
        lo, hi = max(ar.min(), 1e-3), max(ar.max(), 1e-3)
        edges = np.geomspace(lo, hi * 1.001, bins + 1) if hi > lo else bins
        ax.hist(ar, bins=edges, color="tab:green")
        ax.set_xscale("log")
    ax.set_xlabel("box aspect ratio h/w (log scale)")
    ax.set_title("aspect ratios")
    ax = axes[1, 1]
    if stats.image_sizes:
        hw = np.array(list(stats.image_sizes.keys()), np.float64)
        n = np.array(list(stats.image_sizes.values()), np.float64)
        ax.scatter(hw[:, 1], hw[:, 0], s=10 + 60 * n / n.max(), alpha=0.6, color="tab:purple")
    ax.set_xlabel("width [px]")
    ax.set_ylabel("height [px]")
    ax.set_title("image sizes (dot size: number of images)")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def analyze_dataset(cfg: DetectionConfig, split: str, output: Path, bins: int = 30) -> DatasetAnalysis:
    """Statistics of ``data.<split>`` (every image, also those without instances), written to
    ``output/dataset_stats.txt`` and ``output/dataset_stats.png``.

    The synthetic shapes set is generated first when configured, as training does.

    Raises:
        UsageError: matplotlib is missing (checked before any work).
        DatasetError: the split is not set or its files are unusable.
    """
    require_matplotlib()
    cfg = resolve_data_paths(cfg).model_copy(deep=True)
    filter_empty, cfg.data.filter_empty = cfg.data.filter_empty, False  # count every image, also those without instances
    data = load_split(cfg, split, is_train=split == "train")
    threshold = cfg.dataloader.repeat_threshold if cfg.dataloader.sampler == "repeat_factor" and split == "train" else None
    stats = dataset_statistics(data, threshold, filter_empty)
    title = f"{split} split: {data.annotations_path}"
    report = format_dataset_report(stats, title, bins)
    output = Path(output)
    text_path, plot_path = output / "dataset_stats.txt", output / "dataset_stats.png"
    write_text_atomic(text_path, report + "\n")
    plot_dataset(stats, plot_path, title, bins)
    return DatasetAnalysis(stats, report, text_path, plot_path)
