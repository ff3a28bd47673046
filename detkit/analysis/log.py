"""Loss and AP curves of a training run from its ``metrics.jsonl`` (and final ``metrics.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UsageError
from .common import format_table, require_matplotlib, save_figure

__all__ = ["AP_KEYS", "Curve", "Curves", "LogAnalysis", "MetricsLog", "analyze_log", "extract_curves",
           "format_curve_table", "plot_curves", "read_final_metrics", "read_metrics"]

#: the COCO AP names plotted, under ``bbox/`` and ``segm/``
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class Curve:
    """One logged value over training: ``values[i]`` at iteration ``iters[i]`` (AP in percent)."""

    iters: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Curves:
    """``losses``: every ``loss*`` key and ``total_loss``; ``aps``: ``bbox/AP...`` and ``segm/AP...``."""

    losses: dict[str, Curve] = field(default_factory=dict)
    aps: dict[str, Curve] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsLog:
    """The JSON objects of a metrics.jsonl and the number of lines that were not one."""

    records: list[dict]
    skipped_lines: int


@dataclass(frozen=True)
class LogAnalysis:
    """What :func:`analyze_log` found and wrote.

    Attributes:
        curves: the extracted curves; table: their summary (points, first, last, best).
        written: the PNGs written (loss_curves.png, and ap_curves.png when APs were logged).
        skipped_lines: unparsable lines of the metrics.jsonl.
        ignored_final: the run's metrics.json when it exists but is not valid JSON.
    """

    curves: Curves
    table: str
    written: list[Path]
    skipped_lines: int
    ignored_final: Optional[Path]


def read_metrics(path: Path) -> MetricsLog:
    """Records of a metrics.jsonl (one JSON object per line); UsageError when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--metrics {path}: no such file; pass a run's metrics.jsonl (e.g. runs/mine/metrics.jsonl)")
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return MetricsLog(records, bad)


def read_final_metrics(path: Path) -> tuple[Optional[dict], bool]:
    """``(metrics, unreadable)`` of a run's metrics.json: ``(None, False)`` when absent,
    ``(None, True)`` when it is not a JSON object."""
    if not path.is_file():
        return None, False
    try:
        final = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None, True
    return (final, False) if isinstance(final, dict) else (None, False)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_ap_key(k: str) -> bool:
    task, _, name = k.partition("/")
    return task in ("bbox", "segm") and name in AP_KEYS


def _append(curves: dict[str, Curve], key: str, it: int, value: float) -> None:
    c = curves.setdefault(key, Curve())
    c.iters.append(it)
    c.values.append(float(value))


def extract_curves(records: list[dict], final: Optional[dict] = None) -> Curves:
    """The loss and AP curves of the records that have a numeric ``iter``.

    ``total_loss`` is the sum of the ``loss*`` keys when a record has no total. ``final``
    (metrics.json) adds its AP values at its ``iter`` (default: the last logged iteration)
    unless that curve already has a point there.
    """
    curves = Curves()
    last_iter = 0
    for rec in records:
        if not _is_number(rec.get("iter")):
            continue
        it = int(rec["iter"])
        last_iter = max(last_iter, it)
        parts = {k: v for k, v in rec.items() if k.startswith("loss") and _is_number(v)}
        if parts and "total_loss" not in rec:
            rec = {**rec, "total_loss": sum(parts.values())}
        for k, v in rec.items():
            if not _is_number(v):
                continue
            if k.startswith("loss") or k == "total_loss":
                _append(curves.losses, k, it, v)
            elif _is_ap_key(k):
                _append(curves.aps, k, it, v)
    it = int(final["iter"]) if final and _is_number(final.get("iter")) else last_iter
    for k, v in (final or {}).items():
        if _is_ap_key(k) and _is_number(v) and it not in curves.aps.get(k, Curve()).iters:
            _append(curves.aps, k, it, v)
    return curves


def plot_curves(curves: dict[str, Curve], path: Path, title: str, single_panel: bool, log_y: bool = False) -> None:
    """All curves in one panel (AP, same scale) or one panel per curve (losses differ in scale)."""
    plt = require_matplotlib()
    names = sorted(curves, key=lambda k: (k != "total_loss", k))
    cols = 1 if single_panel else min(3, len(names))
    rows = 1 if single_panel else math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7, 4.5) if single_panel else (4.5 * cols, 3.2 * rows),
                             squeeze=False)
    for i, k in enumerate(names):
        ax = axes.flat[0 if single_panel else i]
        c = curves[k]
        ax.plot(c.iters, c.values, marker="o" if single_panel else None, linewidth=1.2, label=k)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        if single_panel:
            ax.set_ylabel("AP (%)")
            ax.legend(fontsize=8)
        else:
            ax.set_title(k, fontsize=10)
            if log_y and all(y > 0 for y in c.values):
                ax.set_yscale("log")
    for ax in list(axes.flat)[1 if single_panel else len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def format_curve_table(curves: Curves) -> str:
    """Points, first, last and best value per curve (best: the lowest loss, the highest AP)."""
    rows = [[k, len(c.iters), f"{c.values[0]:.4g}", f"{c.values[-1]:.4g}", f"{min(c.values):.4g}"]
            for k, c in sorted(curves.losses.items())]
    rows += [[k, len(c.iters), f"{c.values[0]:.4g}", f"{c.values[-1]:.4g}", f"{max(c.values):.4g}"]
             for k, c in sorted(curves.aps.items())]
    return format_table(["curve", "points", "first", "last", "best"], rows)


def analyze_log(metrics: Path, output: Optional[Path] = None, log_y: bool = False) -> LogAnalysis:
    """Plot a run's curves: ``loss_curves.png``, and ``ap_curves.png`` when APs were logged, into
    ``output`` (default: the metrics file's folder). ``metrics.json`` next to ``metrics`` adds the
    final APs.

    Raises:
        UsageError: matplotlib is missing (checked first); the file is missing or has no losses.
    """
    path = Path(metrics)
    require_matplotlib()
    log = read_metrics(path)
    final_path = path.parent / "metrics.json"
    final, unreadable = read_final_metrics(final_path)
    curves = extract_curves(log.records, final)
    if not curves.losses:
        raise UsageError(f"--metrics {path}: no lines with 'iter' and loss_* values; pass a detkit metrics.jsonl")
    out = Path(output) if output else path.parent
    written = [out / "loss_curves.png"]
    plot_curves(curves.losses, written[0], f"losses ({path})", single_panel=False, log_y=log_y)
    if curves.aps:
        written.append(out / "ap_curves.png")
        plot_curves(curves.aps, written[1], f"AP ({path.parent})", single_panel=True)
    return LogAnalysis(curves, format_curve_table(curves), written, log.skipped_lines,
                       final_path if unreadable else None)
