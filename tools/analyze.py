#!/usr/bin/env python
"""Analyze a model (parameters, FLOPs), a dataset (statistics and plots) or a training log (curves).

Sub-commands:
    model    parameter count and FLOPs per image, with a per-module breakdown
    dataset  images, instances per class, box-size / aspect-ratio histograms, image sizes
    log      loss and AP curves from a run's metrics.jsonl (and metrics.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

EPILOG = """examples:
  # parameters and FLOPs of a config at its test size (or --size), table saved to a file
  python tools/analyze.py model --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --output model.txt
  python tools/analyze.py model --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml --size 512
  # statistics and plots of your training annotations
  python tools/analyze.py dataset --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --split train \\
      --output analysis/ data.train.annotations=my/train.json data.train.images=my/images
  # loss and AP curves of a run
  python tools/analyze.py log --metrics runs/mine/metrics.jsonl --output runs/mine/plots
"""

#: FLOPs are counted by torch.utils.flop_counter: one multiply-add = 2 FLOPs.
FLOP_NOTE = "FLOPs as counted by torch.utils.flop_counter (1 multiply-add = 2 FLOPs)"


#: exception types whose message is already a one-line instruction for the user
USER_ERRORS = ("ConfigError", "ImageReadError", "DatasetError", "CheckpointError")


class ToolError(Exception):
    """A user-facing failure; the message is one line saying what to do."""


# --------------------------------------------------------------------------- shared helpers
def load_detection_config(path: str, overrides: Sequence[str]) -> Any:
    """Load a detection config with ``key=value`` overrides (ConfigError on bad keys)."""
    from detkit.config import load_config

    cfg = load_config(path, list(overrides))
    if getattr(cfg, "task", "detection") != "detection":
        raise ToolError(f"--config {path}: task is {cfg.task!r}; analyze.py needs a detection config")
    return cfg


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the Agg backend, or a one-line ToolError telling how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ToolError("matplotlib is needed for plots; install it with: pip install 'detkit[plot]'") from None
    return plt


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """Plain-text table; ``align`` holds one of '<' or '>' per column (default: first left, rest right)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "<" + ">" * (len(header) - 1)
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(f"{c:{align[i]}{widths[i]}}" for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- model
def resolve_num_classes(cfg: Any, explicit: Optional[int]) -> tuple[int, str]:
    """Classes of the model, without loading data: the flag, model.num_classes, data.class_names,
    the synthetic set's classes, the annotation file's categories (if small), else 80."""
    if explicit is not None:
        return explicit, "from --num-classes"
    if cfg.model.num_classes:
        return int(cfg.model.num_classes), "from model.num_classes"
    if cfg.data.class_names:
        return len(cfg.data.class_names), "from data.class_names"
    if cfg.data.synthetic is not None:
        from detkit.data.synthetic import SHAPE_CLASSES

        return len(SHAPE_CLASSES), "the generated shapes classes"
    ann = cfg.data.train.annotations or cfg.data.val.annotations
    if ann and Path(ann).is_file() and Path(ann).stat().st_size < 64 * 2**20:
        try:
            with open(ann, encoding="utf-8") as f:
                n = len(json.load(f).get("categories", []))
            if n:
                return n, f"from {ann}"
        except (OSError, ValueError):
            pass
    return 80, "default; set model.num_classes or --num-classes"


def count_model(model: Any, size: tuple[int, int], device: str = "cpu") -> dict[str, Any]:
    """Parameters and FLOPs of ``model.predict`` on one dummy ``size = (h, w)`` image.

    Returns ``{"params", "flops", "modules": [(name, depth, params, flops)], "num_detections"}``
    where the modules are the top-level children and their children; FLOPs of a module are
    accumulated over all its calls; ``"(outside modules)"`` holds what ran elsewhere.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

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
    rows = [(name, depth, sum(p.numel() for p in named[name].parameters()), flops[name]) for name, depth in tracked]
    outside = total - sum(f for _, d, _, f in rows if d == 1)
    rows.append(("(outside modules)", 1, 0, outside))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops": total,
        "modules": rows,
        "num_detections": len(dets[0]) if dets else 0,
    }


def format_model_report(info: dict[str, Any], title: str) -> str:
    """The printed report of :func:`count_model`."""
    total = max(info["flops"], 1)
    rows = []
    for name, depth, params, flops in info["modules"]:
        label = ("  " * (depth - 1)) + name
        rows.append([label, f"{params:,}", f"{flops / 1e9:.3f}", f"{100.0 * flops / total:.1f}"])
    table = format_table(["module", "params", "GFLOPs", "% FLOPs"], rows)
    return "\n".join([
        title,
        f"parameters: {info['params']:,} ({info['trainable']:,} trainable)",
        f"FLOPs per image: {info['flops'] / 1e9:.3f} GFLOPs ({info['flops']:,})",
        f"note: {FLOP_NOTE}; detections on the dummy image: {info['num_detections']} "
        "(the mask head's cost grows with the number of detections)",
        "",
        table,
    ])


def cmd_model(args: argparse.Namespace) -> int:
    """``analyze.py model``: print (and save) parameters and FLOPs."""
    cfg = load_detection_config(args.config, args.overrides)  # before the heavy imports: fast errors
    num_classes, source = resolve_num_classes(cfg, args.num_classes)
    import torch

    from detkit.models.build import build_detector

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ToolError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    model = build_detector(cfg, num_classes).to(args.device)
    h = args.size or cfg.input.min_size_test
    w = args.width or h
    if h < 32 or w < 32:
        raise ToolError(f"--size {h} / --width {w}: use at least 32 pixels")
    info = count_model(model, (h, w), args.device)
    title = (f"model: {cfg.model.meta_architecture} {cfg.model.backbone.name}-FPN, {num_classes} classes "
             f"({source}), input {h}x{w}")
    report = format_model_report(info, title)
    print(report)
    if args.output:
        write_text(Path(args.output), report + "\n")
        print(f"saved to {args.output}")
    return 0


# --------------------------------------------------------------------------- dataset
def dataset_statistics(data: Any) -> dict[str, Any]:
    """Statistics of a :class:`detkit.data.coco.CocoData` (validated annotations, crowd separate).

    Returns the number of images, instances per class name, crowd regions, ``sqrt_areas``
    and ``aspect_ratios`` (height / width) arrays of the non-crowd boxes, and a Counter of
    image sizes ``(height, width)``.
    """
    import numpy as np

    names = list(data.class_names)
    per_class = np.zeros(len(names), np.int64)
    sqrt_areas, ratios, sizes = [], [], Counter()
    crowd = empty = 0
    for rec in data.records:
        sizes[(int(rec.height), int(rec.width))] += 1
        boxes = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
        labels = np.asarray(rec.labels, np.int64).reshape(-1)
        np.add.at(per_class, labels, 1)
        crowd += int(np.asarray(rec.crowd_boxes).reshape(-1, 4).shape[0])
        empty += labels.size == 0
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        sqrt_areas.append(np.sqrt(np.clip(w * h, 0, None)))
        ratios.append(h[w > 0] / w[w > 0])
    return {
        "class_names": names,
        "num_images": len(data.records),
        "images_without_instances": empty,
        "instances_per_class": {names[k]: int(per_class[k]) for k in range(len(names))},
        "num_instances": int(per_class.sum()),
        "num_crowd": crowd,
        "sqrt_areas": np.concatenate(sqrt_areas) if sqrt_areas else np.zeros(0),
        "aspect_ratios": np.concatenate(ratios) if ratios else np.zeros(0),
        "image_sizes": sizes,
        "num_dropped": dict(getattr(data, "num_dropped", {}) or {}),
    }


def format_dataset_report(stats: dict[str, Any], title: str, bins: int) -> str:
    """Text tables: summary, instances per class, size / aspect-ratio histograms, image sizes."""
    import numpy as np

    lines = [title,
             f"images: {stats['num_images']} ({stats['images_without_instances']} without instances)",
             f"instances: {stats['num_instances']} (+ {stats['num_crowd']} crowd regions) "
             f"in {len(stats['class_names'])} classes"]
    dropped = {k: v for k, v in stats["num_dropped"].items() if v}
    if dropped:
        lines.append("dropped at validation: " + ", ".join(f"{k}: {v}" for k, v in dropped.items()))
    total = max(stats["num_instances"], 1)
    rows = [[name, n, f"{100.0 * n / total:.1f}"] for name, n in stats["instances_per_class"].items()]
    lines += ["", "instances per class", format_table(["class", "instances", "%"], rows)]
    for key, label in (("sqrt_areas", "box size sqrt(area) in pixels"), ("aspect_ratios", "box aspect ratio h/w")):
        v = stats[key]
        if v.size == 0:
            continue
        if key == "aspect_ratios":  # log-spaced bins: ratios 1/4 and 4 are equally far from 1
            lo, hi = max(v.min(), 1e-3), max(v.max(), 1e-3)
            edges = np.geomspace(lo, hi * (1 + 1e-9), min(bins, 12) + 1) if hi > lo else np.array([lo, lo * 1.001])
        else:
            edges = np.histogram_bin_edges(v, bins=min(bins, 12))
        counts, edges = np.histogram(v, bins=edges)
        rows = [[f"[{edges[i]:.3g}, {edges[i + 1]:.3g})", int(c)] for i, c in enumerate(counts)]
        lines += ["", f"{label}: min {v.min():.3g}  median {np.median(v):.3g}  max {v.max():.3g}",
                  format_table(["bin", "boxes"], rows)]
        if key == "sqrt_areas":
            small, medium = int((v < 32).sum()), int(((v >= 32) & (v < 96)).sum())
            lines.append(f"COCO scales: small (<32) {small}, medium (32-96) {medium}, large (>=96) {v.size - small - medium}")
    rows = [[f"{h}x{w}", n] for (h, w), n in stats["image_sizes"].most_common(10)]
    lines += ["", f"image sizes (height x width, {len(stats['image_sizes'])} distinct, 10 most common)",
              format_table(["size", "images"], rows)]
    return "\n".join(lines)


def plot_dataset(stats: dict[str, Any], path: Path, title: str, bins: int) -> None:
    """One PNG with four panels: instances per class, sqrt(area) and aspect-ratio histograms, image sizes."""
    import numpy as np

    plt = require_matplotlib()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    names = list(stats["instances_per_class"])
    counts = [stats["instances_per_class"][n] for n in names]
    ax = axes[0, 0]
    ax.bar(range(len(names)), counts, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=max(4, min(9, 400 // max(len(names), 1))))
    ax.set_ylabel("instances")
    ax.set_title("instances per class")
    ax = axes[0, 1]
    if stats["sqrt_areas"].size:
        ax.hist(stats["sqrt_areas"], bins=bins, color="tab:orange")
        for x in (32, 96):
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("sqrt(box area) [px]  (dashed: COCO small/medium/large)")
    ax.set_title("box sizes")
    ax = axes[1, 0]
    ar = stats["aspect_ratios"]
    if ar.size:
        lo, hi = max(ar.min(), 1e-3), max(ar.max(), 1e-3)
        edges = np.geomspace(lo, hi * 1.001, bins + 1) if hi > lo else bins
        ax.hist(ar, bins=edges, color="tab:green")
        ax.set_xscale("log")
    ax.set_xlabel("box aspect ratio h/w (log scale)")
    ax.set_title("aspect ratios")
    ax = axes[1, 1]
    sizes = stats["image_sizes"]
    if sizes:
        hw = np.array(list(sizes.keys()), np.float64)
        n = np.array(list(sizes.values()), np.float64)
        ax.scatter(hw[:, 1], hw[:, 0], s=10 + 60 * n / n.max(), alpha=0.6, color="tab:purple")
    ax.set_xlabel("width [px]")
    ax.set_ylabel("height [px]")
    ax.set_title("image sizes (dot size: number of images)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_dataset(args: argparse.Namespace) -> int:
    """``analyze.py dataset``: statistics table (printed and saved) and a PNG of plots."""
    require_matplotlib()
    cfg = load_detection_config(args.config, args.overrides)
    from detkit.engine.detection import load_split, resolve_data_paths

    cfg = resolve_data_paths(cfg)  # generates the synthetic shapes set if configured, as train_det does
    cfg.data.filter_empty = False  # count every image, also those without instances
    data = load_split(cfg, args.split, is_train=args.split == "train")
    stats = dataset_statistics(data)
    title = f"{args.split} split: {data.annotations_path}"
    report = format_dataset_report(stats, title, args.bins)
    out = Path(args.output)
    write_text(out / "dataset_stats.txt", report + "\n")
    plot_dataset(stats, out / "dataset_stats.png", title, args.bins)
    print(report)
    print(f"\nwrote {out / 'dataset_stats.txt'} and {out / 'dataset_stats.png'}")
    return 0


# --------------------------------------------------------------------------- log
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Records of a metrics.jsonl (one JSON object per line); returns (records, unparsable lines)."""
    if not path.is_file():
        raise ToolError(f"--metrics {path}: no such file; pass a run's metrics.jsonl (e.g. runs/mine/metrics.jsonl)")
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
    return records, bad


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_ap_key(k: str) -> bool:
    task, _, name = k.partition("/")
    return task in ("bbox", "segm") and name in AP_KEYS


def extract_curves(records: list[dict], final: Optional[dict] = None) -> tuple[dict, dict]:
    """``(losses, aps)``: ``name -> (iters, values)``.

    Losses are every ``loss*`` key plus ``total_loss`` (the sum of the ``loss_*`` keys
    when the log has no total). APs are ``bbox/AP...`` and ``segm/AP...`` entries found in
    the log; ``final`` (metrics.json) adds its values at the last logged iteration.
    """
    losses: dict[str, tuple[list[int], list[float]]] = {}
    aps: dict[str, tuple[list[int], list[float]]] = {}
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
            target = losses if k.startswith("loss") or k == "total_loss" else aps if _is_ap_key(k) else None
            if target is not None and _is_number(v):
                xs, ys = target.setdefault(k, ([], []))
                xs.append(it)
                ys.append(float(v))
    it = int(final["iter"]) if final and _is_number(final.get("iter")) else last_iter
    for k, v in (final or {}).items():
        if _is_ap_key(k) and _is_number(v):
            xs, ys = aps.setdefault(k, ([], []))
            if it not in xs:
                xs.append(it)
                ys.append(float(v))
    return losses, aps


def plot_curves(curves: dict, path: Path, title: str, single_panel: bool, log_y: bool = False) -> None:
    """All curves in one panel (AP, same scale) or one panel per curve (losses differ in scale)."""
    plt = require_matplotlib()
    names = sorted(curves, key=lambda k: (k != "total_loss", k))
    cols = 1 if single_panel else min(3, len(names))
    rows = 1 if single_panel else math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7, 4.5) if single_panel else (4.5 * cols, 3.2 * rows),
                             squeeze=False)
    for i, k in enumerate(names):
        ax = axes.flat[0 if single_panel else i]
        xs, ys = curves[k]
        ax.plot(xs, ys, marker="o" if single_panel else None, linewidth=1.2, label=k)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        if single_panel:
            ax.set_ylabel("AP (%)")
            ax.legend(fontsize=8)
        else:
            ax.set_title(k, fontsize=10)
            if log_y and all(y > 0 for y in ys):
                ax.set_yscale("log")
    for ax in list(axes.flat)[1 if single_panel else len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_log(args: argparse.Namespace) -> int:
    """``analyze.py log``: loss curves (and AP curves when evaluations were logged) to PNG."""
    path = Path(args.metrics)
    require_matplotlib()
    records, bad = read_metrics(path)
    final = None
    final_path = path.parent / "metrics.json"
    if final_path.is_file():
        try:
            final = json.loads(final_path.read_text(encoding="utf-8"))
            final = final if isinstance(final, dict) else None
        except ValueError:
            print(f"warning: {final_path} is not valid JSON; ignoring it", file=sys.stderr)
    losses, aps = extract_curves(records, final)
    if not losses:
        raise ToolError(f"--metrics {path}: no lines with 'iter' and loss_* values; pass a detkit metrics.jsonl")
    out = Path(args.output) if args.output else path.parent
    plot_curves(losses, out / "loss_curves.png", f"losses ({path})", single_panel=False, log_y=args.log_y)
    written = [out / "loss_curves.png"]
    if aps:
        plot_curves(aps, out / "ap_curves.png", f"AP ({path.parent})", single_panel=True)
        written.append(out / "ap_curves.png")
    rows = [[k, len(xs), f"{ys[0]:.4g}", f"{ys[-1]:.4g}", f"{min(ys):.4g}"] for k, (xs, ys) in sorted(losses.items())]
    rows += [[k, len(xs), f"{ys[0]:.4g}", f"{ys[-1]:.4g}", f"{max(ys):.4g}"] for k, (xs, ys) in sorted(aps.items())]
    print(format_table(["curve", "points", "first", "last", "best"], rows))
    if bad:
        print(f"warning: skipped {bad} unparsable line(s) in {path}", file=sys.stderr)
    if not aps:
        print("no bbox/AP or segm/AP values found (metrics.jsonl / metrics.json): AP plot not written")
    for p in written:
        print(f"wrote {p}")
    return 0


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/analyze.py``."""
    p = argparse.ArgumentParser(
        prog="tools/analyze.py",
        description="Analyze a model (parameters, FLOPs), a dataset (statistics) or a training log (curves).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{model,dataset,log}")

    def add(name: str, help_: str, func: Any, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        if config:
            sp.add_argument("--config", required=True, help="YAML config")
            sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        return sp

    pm = add("model", "parameters and FLOPs per image", cmd_model)
    pm.add_argument("--size", type=int, default=None, help="image height (default: input.min_size_test)")
    pm.add_argument("--width", type=int, default=None, help="image width (default: same as --size)")
    pm.add_argument("--num-classes", type=int, default=None, help="classes (default: from the config / data)")
    pm.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    pm.add_argument("--output", default=None, help="also save the report to this text file")
    pd = add("dataset", "dataset statistics and plots", cmd_dataset)
    pd.add_argument("--split", choices=["train", "val"], default="train", help="which split (default: train)")
    pd.add_argument("--output", required=True, help="folder for dataset_stats.png and dataset_stats.txt")
    pd.add_argument("--bins", type=int, default=30, help="histogram bins (default: 30)")
    pl = add("log", "loss and AP curves of a run", cmd_log, config=False)
    pl.add_argument("--metrics", required=True, help="a run's metrics.jsonl")
    pl.add_argument("--output", default=None, help="folder for the PNGs (default: the metrics file's folder)")
    pl.add_argument("--log-y", action="store_true", help="log-scale loss axes")
    return p.parse_args(argv)


def error_line(e: BaseException) -> str:
    """One line for a failure: the message of expected errors, type + message + hint otherwise."""
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, (ToolError, ValueError, OSError)) or type(e).__name__ in USER_ERRORS:
        return msg
    return f"{type(e).__name__}: {msg} (set DETKIT_DEBUG=1 for a traceback)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: one line on stderr and a non-zero exit code on failure."""
    args = parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("analyze.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable line
        if os.environ.get("DETKIT_DEBUG"):
            raise
        print(f"analyze.py: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
