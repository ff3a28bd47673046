#!/usr/bin/env python
"""Measure a config's inference images/s, training iterations/s and data-loader images/s here.

* inference: :class:`detkit.Predictor` on images of the val split (or random images at the
  test size when no data is configured or its files are missing), one image per call, as an
  application would;
* training: forward + backward + SGD step of a freshly built model on batches taken from the
  data set's training pipeline (or synthetic batches at the train size), data time excluded;
* data loader: the training loader of the config (workers, augmentation, collation) alone.

Warm-up iterations are excluded from every number; CUDA work is synchronized before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

EPILOG = """examples:
  # the demo config on this machine's CPU
  python tools/benchmark.py --config configs/demo/shapes_mask_rcnn_R_18_FPN.yaml
  # a trained model on the GPU in bfloat16, 50 timed iterations
  python tools/benchmark.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --device cuda --precision bf16 --iters 50
  # inference only, at another test size (random images when the COCO files are not there)
  python tools/benchmark.py --config configs/coco/mask_rcnn_R_50_FPN_1x.yaml --skip-train --skip-data \\
      input.min_size_test=640 model.num_classes=80
"""

#: exception types whose message is already a one-line instruction for the user
USER_ERRORS = ("ConfigError", "ImageReadError", "DatasetError", "CheckpointError")


class ToolError(Exception):
    """A user-facing failure; the message is one line saying what to do."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/benchmark.py``."""
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py",
        description="Inference images/s, training it/s and data-loader images/s of a config on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--weights", default=None, help="weights for the inference benchmark (default: random init)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations of each benchmark (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="inference and training precision")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: train.batch_size)")
    p.add_argument("--skip-train", action="store_true", help="skip the training benchmark")
    p.add_argument("--skip-data", action="store_true", help="skip the data-loader benchmark")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.min_size_test=640")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: Any) -> list[tuple[str, str]]:
    """(key, value) rows describing the machine and the software."""
    import torch

    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    rows = [
        ("cpu", cpu_model()),
        ("cores", f"{cores} logical ({usable} usable by this process)"),
        ("platform", f"{platform.system()} {platform.release()}, Python {platform.python_version()}"),
        ("torch", f"{torch.__version__} (torchvision {_torchvision_version()})"),
        ("threads", str(torch.get_num_threads())),
        ("device", str(device)),
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows.append(("gpu", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"))
    elif torch.cuda.is_available():
        rows.append(("gpu", f"{torch.cuda.get_device_name(0)} (not used: --device {device})"))
    else:
        rows.append(("gpu", "none"))
    return rows


def _torchvision_version() -> str:
    try:
        import torchvision

        return torchvision.__version__
    except ImportError:
        return "not installed"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data
def missing_data(cfg: Any, split: str) -> Optional[str]:
    """``"data.<split>.annotations PATH"`` (or ``.images``) when that configured path does not exist, else None."""
    sc = getattr(cfg.data, split)
    if sc.annotations and not Path(sc.annotations).is_file():
        return f"data.{split}.annotations {sc.annotations}"
    if sc.annotations and sc.images and not Path(sc.images).is_dir():
        return f"data.{split}.images {sc.images}"
    return None


def load_splits(cfg: Any, train_for: Optional[str]) -> tuple[Any, Optional[Any], Optional[Any], Optional[str]]:
    """(cfg with resolved data paths, train CocoData or None, val CocoData or None, missing val data).

    Paths are resolved as ``tools/train_det.py`` does (the synthetic shapes set is generated when
    ``data.synthetic`` is set); a split whose keys are unset is None. The training split is read
    only for ``train_for`` (the benchmark that needs it, e.g. ``"data-loader"``): missing files are
    then an error. The val split only supplies sample images: when its files are missing it is None
    and the last item names them (the caller says what was used instead). A broken file is an error.
    """
    from detkit.engine.detection import load_split, resolve_data_paths

    cfg = resolve_data_paths(cfg)
    train = None
    if train_for and cfg.data.train.annotations:
        missing = missing_data(cfg, "train")
        if missing:
            raise ToolError(f"{missing} not found; the {train_for} benchmark reads the training data: point "
                            "data.train.annotations/images at it, or add --skip-train --skip-data to time "
                            "inference alone")
        train = load_split(cfg, "train", is_train=True)
    val, val_missing = None, None
    if cfg.data.val.annotations:
        val_missing = missing_data(cfg, "val")
        if val_missing is None:
            val = load_split(cfg, "val", is_train=False)
    return cfg, train, val, val_missing


def synthetic_batch(cfg: Any, batch_size: int, num_classes: int, seed: int) -> Any:
    """A :class:`Batch` of random images at the (first) train size with 3 random instances each."""
    import torch

    from detkit.structures import Batch, Targets

    sizes = cfg.input.min_size_train
    short = sizes[0] if isinstance(sizes, list) else sizes
    if cfg.input.large_scale_jitter:
        h = w = cfg.input.lsj_image_size
    else:
        h, w = short, min(int(round(short * 4 / 3)), cfg.input.max_size_train)
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = (0.1 + 0.3 * torch.rand(3, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], dim=1).float()
        masks = None
        if cfg.model.meta_architecture == "mask_rcnn":
            masks = torch.zeros(3, h, w, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
        labels = torch.randint(0, num_classes, (3,), generator=g)
        targets.append(Targets(boxes=boxes, labels=labels, masks=masks))
    return Batch(images=images, targets=targets, image_ids=list(range(batch_size)),
                 orig_sizes=[(h, w)] * batch_size)


def sample_images(cfg: Any, splits: Sequence[Optional[Any]], n: int) -> tuple[list[Any], str]:
    """Up to ``n`` readable RGB images of the first split given, else random images at the test size."""
    import numpy as np

    from detkit.data import read_image

    for data in splits:
        if data is None:
            continue
        images = []
        for rec in data.records[: 4 * n]:
            try:
                images.append(read_image(rec.path))
            except OSError:
                continue
            if len(images) == n:
                return images, f"images of {data.annotations_path}"
        if images:
            return images, f"images of {data.annotations_path}"
    h = cfg.input.min_size_test
    w = min(int(round(h * 4 / 3)), cfg.input.max_size_test)
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)], f"random {h}x{w} images"


# --------------------------------------------------------------------------- benchmarks
def bench_inference(predictor: Any, images: list[Any], iters: int, warmup: int, device: Any) -> float:
    """Images per second of ``predictor(image)``, cycling through ``images``."""
    for i in range(warmup):
        predictor(images[i % len(images)])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        predictor(images[i % len(images)])
    _sync(device)
    return iters / max(time.perf_counter() - t0, 1e-9)


def bench_train(model: Any, batches: list[Any], iters: int, warmup: int, device: Any, precision: str,
                lr: float) -> float:
    """Training iterations per second (forward, backward, SGD step) on pre-fetched ``batches``."""
    import torch

    from detkit.engine.trainer import autocast_context

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ToolError("the model has no trainable parameters (check model.backbone.freeze_at)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    amp = "bf16" if precision == "bf16" else "none"
    on_device = [b.to(device) for b in batches]

    def step(batch: Any) -> None:
        with autocast_context(device, amp):
            losses = model(batch.images, batch.targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for i in range(warmup):
        step(on_device[i % len(on_device)])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        step(on_device[i % len(on_device)])
    _sync(device)
    return iters / max(time.perf_counter() - t0, 1e-9)


def bench_dataloader(loader: Any, batches: int, warmup: int) -> tuple[float, list[Any]]:
    """Images per second of the loader alone (after ``warmup`` batches) and the batches it gave."""
    it = iter(loader)
    got = []
    for _ in range(max(warmup, 1)):  # worker start-up is not throughput
        got.append(next(it))
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        n += len(b)
        got.append(b)
    return n / max(time.perf_counter() - t0, 1e-9), got


# --------------------------------------------------------------------------- report
def format_report(title: str, machine: list[tuple[str, str]], results: list[tuple[str, str, str]]) -> str:
    """The printed report: a machine table and a results table (metric, throughput, details)."""
    kw = max(len(k) for k, _ in machine)
    lines = [title, "", "machine"] + [f"  {k:<{kw}}  {v}" for k, v in machine]
    w0 = max(len("benchmark"), *(len(r[0]) for r in results))
    w1 = max(len("throughput"), *(len(r[1]) for r in results))
    lines += ["", f"{'benchmark':<{w0}}  {'throughput':>{w1}}  details", f"{'-' * w0}  {'-' * w1}  {'-' * 7}"]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in results]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks described by ``args`` and print the report; returns the exit code."""
    from detkit.config import load_config

    cfg = load_config(args.config, args.overrides)  # before the heavy imports: fast errors
    if getattr(cfg, "task", "detection") != "detection":
        raise ToolError(f"--config {args.config}: task is {cfg.task!r}; benchmark.py needs a detection config")
    if args.iters < 1 or args.warmup < 0:
        raise ToolError(f"--iters {args.iters} / --warmup {args.warmup}: use iters >= 1 and warmup >= 0")
    if args.weights is not None and not Path(args.weights).is_file():
        raise ToolError(f"--weights {args.weights}: no such file")
    import torch

    from detkit import Predictor
    from detkit.engine.detection import build_model, build_train_loader

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ToolError(f"--device {args.device}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    batch_size = args.batch_size or cfg.train.batch_size
    if batch_size < 1:
        raise ToolError(f"--batch-size {batch_size}: must be at least 1")

    cfg.train.batch_size = batch_size
    results: list[tuple[str, str, str]] = []
    train_for = "data-loader" if not args.skip_data else None if args.skip_train else "training"
    cfg, train, val, val_missing = load_splits(cfg, train_for)
    if train is not None and not cfg.data.class_names and cfg.model.num_classes is None:
        cfg.data.class_names = list(train.class_names)  # the Predictor takes the classes from here
    elif not cfg.data.class_names and cfg.model.num_classes is None and train is None and val is None:
        cfg.model.num_classes = 80  # nothing names the classes: benchmark a COCO-sized head

    # data loader (its batches also feed the training benchmark)
    loader_batches: list[Any] = []
    if not args.skip_data:
        if train is None:
            results.append(("dataloader", "n/a", "no data.train configured"))
        else:
            n_batches = max(args.iters, 2)
            ips, loader_batches = bench_dataloader(build_train_loader(cfg, train, 0), n_batches, args.warmup)
            results.append(("dataloader", f"{ips:.2f} img/s",
                            f"{cfg.dataloader.num_workers} workers, batch {batch_size}, {n_batches} batches, "
                            "training pipeline"))

    # inference through the Predictor, one image per call
    images, source = sample_images(cfg, [val, train], min(args.iters, 8))
    notes = [f"{val_missing} not found (only needed for sample images): inference used {source}"] if val_missing else []
    predictor = Predictor(cfg, weights=args.weights, device=str(device), precision=args.precision)
    num_classes = len(predictor.class_names)
    ips = bench_inference(predictor, images, args.iters, args.warmup, device)
    results.insert(0, ("inference", f"{ips:.2f} img/s",
                       f"Predictor, 1 image per call, {source}, test size {cfg.input.min_size_test} "
                       f"(max {cfg.input.max_size_test}), {args.precision}, "
                       f"{'trained' if args.weights else 'random'} weights, {args.iters} iters"))
    del predictor

    # training steps, model built as train_det builds it
    if not args.skip_train:
        if train is not None:
            if not loader_batches:
                _, loader_batches = bench_dataloader(build_train_loader(cfg, train, 0), 2, 1)
            batches, what = [b for b in loader_batches if len(b) > 0], "batches from the training pipeline"
        else:
            batches = [synthetic_batch(cfg, batch_size, num_classes, seed=i) for i in range(2)]
            what = "synthetic batches at the train size"
        model = build_model(cfg, num_classes, device)
        its = bench_train(model, batches, args.iters, args.warmup, device, args.precision, cfg.train.base_lr)
        results.insert(1, ("training", f"{its:.2f} it/s",
                           f"batch {batch_size} ({its * batch_size:.2f} img/s), {what}, {args.precision}, "
                           f"{args.iters} iters"))

    title = (f"benchmark of {args.config}: {cfg.model.meta_architecture} {cfg.model.backbone.name}-FPN, "
             f"{num_classes} classes")
    machine = machine_info(device) + [("precision", args.precision)]
    print(format_report(title, machine, results))
    for note in notes:
        print(f"note: {note}")
    return 0


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
        return run(args)
    except KeyboardInterrupt:
        print("benchmark.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable line
        if os.environ.get("DETKIT_DEBUG"):
            raise
        print(f"benchmark.py: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
