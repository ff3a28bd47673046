"""Speed of a detection config on this machine: inference images/s, training it/s, data-loader images/s.

:func:`run_benchmark` measures, with the warm-up iterations excluded and CUDA work synchronized
before each clock reading:

* inference: :class:`detkit.Predictor` on images of the val split (or random images at the test
  size when no data is configured or its files are missing), one image per call, as an
  application would;
* training: forward + backward + SGD step of a freshly built model (built and initialized as
  ``tools/train_det.py`` builds it) on batches taken from the data set's training pipeline (or
  synthetic batches at the train size), data time excluded;
* data loader: the training loader of the config (workers, augmentation, collation) alone.

The classes are those :func:`detkit.data.classes.resolve_classes` finds; when nothing names them
(no ``data.class_names``, ``model.num_classes``, annotations or synthetic set), the model gets a
COCO-sized head of :data:`DEFAULT_NUM_CLASSES` classes. ``tools/benchmark.py`` is its command line.

Example::

    report = run_benchmark(load_config("configs/demo/shapes_mask_rcnn_R_18_FPN.yaml"),
                           BenchmarkOptions(iters=5), config_name="demo")
    print(report.format())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import is_weights_name
from .config import ConfigError, DetectionConfig
from .data import read_image
from .data.classes import ClassInfo, resolve_classes
from .data.coco import CocoData, DatasetError
from .engine.detection import (
    batch_size_per_process,
    build_model,
    build_train_loader,
    load_split,
    resolve_data_paths,
)
from .engine.trainer import autocast_context
from .errors import UsageError
from .machine import MachineInfo, machine_info, resolve_device
from .inference.predictor import Predictor
from .inference.optimize import PRECISIONS
from .structures import Batch, Targets

__all__ = [
    "DEFAULT_NUM_CLASSES", "BenchmarkOptions", "BenchmarkResult", "BenchmarkReport", "BenchmarkData",
    "missing_data", "load_splits", "benchmark_classes", "synthetic_batch", "sample_images",
    "bench_inference", "bench_train", "bench_dataloader", "machine_rows", "run_benchmark",
]

#: classes of the benchmarked head when nothing names them (COCO's 80)
DEFAULT_NUM_CLASSES = 80


@dataclass(frozen=True)
class BenchmarkOptions:
    """What :func:`run_benchmark` measures (the flags of ``tools/benchmark.py``).

    Attributes:
        weights: weights for the inference benchmark (None: random init / ``model.weights``).
        iters: timed iterations of each benchmark (>= 1); warmup: untimed iterations before (>= 0).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"`` or ``"bf16"``, for inference and training (autocast).
        batch_size: training batch over all processes (None: ``train.batch_size``).
        skip_train, skip_data: leave out the training / data-loader benchmark.
    """

    weights: Optional[str] = None
    iters: int = 10
    warmup: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: Optional[int] = None
    skip_train: bool = False
    skip_data: bool = False


@dataclass(frozen=True)
class BenchmarkResult:
    """One measured benchmark: ``name`` (``"inference"``, ``"training"``, ``"dataloader"``), ``value``
    in ``unit`` (``"img/s"`` or ``"it/s"``; None: not measured) and what it measured (``details``)."""

    name: str
    value: Optional[float]
    unit: str
    details: str

    @property
    def throughput(self) -> str:
        """``"12.34 img/s"``, or ``"n/a"`` when not measured."""
        return "n/a" if self.value is None else f"{self.value:.2f} {self.unit}"


@dataclass
class BenchmarkReport:
    """What :func:`run_benchmark` found: a title, machine rows (key -> value, in print order), the
    results (inference, training, data loader, those measured), notes, and the benchmarked classes."""

    title: str
    machine: dict[str, str]
    results: list[BenchmarkResult]
    classes: ClassInfo
    notes: list[str] = field(default_factory=list)

    def result(self, name: str) -> Optional[BenchmarkResult]:
        """The result called ``name``, or None when that benchmark was skipped."""
        return next((r for r in self.results if r.name == name), None)

    def format(self) -> str:
        """The printed report: a machine table, a results table (benchmark, throughput, details), notes."""
        kw = max(len(k) for k in self.machine)
        lines = [self.title, "", "machine"] + [f"  {k:<{kw}}  {v}" for k, v in self.machine.items()]
        rows = [(r.name, r.throughput, r.details) for r in self.results]
        w0 = max(len("benchmark"), *(len(name) for name, _, _ in rows))
        w1 = max(len("throughput"), *(len(tp) for _, tp, _ in rows))
        lines += ["", f"{'benchmark':<{w0}}  {'throughput':>{w1}}  details", f"{'-' * w0}  {'-' * w1}  {'-' * 7}"]
        lines += [f"{name:<{w0}}  {tp:>{w1}}  {details}" for name, tp, details in rows]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


# --------------------------------------------------------------------------- inputs
def _check_options(cfg: DetectionConfig, opts: BenchmarkOptions) -> int:
    """Validate ``opts``; returns the training batch size (over all processes)."""
    if opts.iters < 1 or opts.warmup < 0:
        raise UsageError(f"--iters {opts.iters} / --warmup {opts.warmup}: use iters >= 1 and warmup >= 0")
    if opts.weights is not None and not is_weights_name(opts.weights) and not Path(opts.weights).is_file():
        raise UsageError(f"--weights {opts.weights}: no such file; pass a checkpoint or a name such as torchvision://...")
    if opts.precision not in PRECISIONS:
        raise UsageError(f"--precision {opts.precision}: use one of {', '.join(PRECISIONS)}")
    batch_size = cfg.train.batch_size if opts.batch_size is None else opts.batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    return batch_size


def missing_data(cfg: DetectionConfig, split: str) -> Optional[str]:
    """``"data.<split>.annotations PATH"`` (or ``.images``) when that configured path does not exist, else None."""
    sc = getattr(cfg.data, split)
    files = [sc.annotations] if isinstance(sc.annotations, str) else list(sc.annotations or [])
    folders = [sc.images] if isinstance(sc.images, str) else list(sc.images or [])
    for f in files:
        if not Path(f).is_file():
            return f"data.{split}.annotations {f}"
    for d in folders if files else []:
        if not Path(d).is_dir():
            return f"data.{split}.images {d}"
    return None


@dataclass
class BenchmarkData:
    """The splits :func:`load_splits` read: ``cfg`` with resolved data paths, ``train`` / ``val``
    (None when not configured or not read) and ``val_missing`` (the val file that does not exist)."""

    cfg: DetectionConfig
    train: Optional[CocoData]
    val: Optional[CocoData]
    val_missing: Optional[str]


def load_splits(cfg: DetectionConfig, train_for: Optional[str]) -> BenchmarkData:
    """Read the configured splits.

    Paths are resolved as ``tools/train_det.py`` does (the synthetic shapes set is generated when
    ``data.synthetic`` is set); a split whose keys are unset is None. The training split is read
    only for ``train_for`` (the benchmark that needs it, e.g. ``"data-loader"``): missing files are
    then a :class:`DatasetError`. The val split only supplies sample images: when its files are
    missing it is None and ``val_missing`` names them. A broken file is an error.
    """
    cfg = resolve_data_paths(cfg)
    train = None
    if train_for and cfg.data.train.annotations:
        missing = missing_data(cfg, "train")
        if missing:
            raise DatasetError(f"{missing} not found; the {train_for} benchmark reads the training data: point "
                               "data.train.annotations/images at it, or add --skip-train --skip-data to time "
                               "inference alone")
        train = load_split(cfg, "train", is_train=True)
    val, val_missing = None, None
    if cfg.data.val.annotations:
        val_missing = missing_data(cfg, "val")
        if val_missing is None:
            val = load_split(cfg, "val", is_train=False)
    return BenchmarkData(cfg, train, val, val_missing)


def benchmark_classes(cfg: DetectionConfig, train: Optional[CocoData]) -> ClassInfo:
    """The benchmarked classes, pinned in ``cfg`` (the :class:`Predictor` resolves them from ``cfg``).

    :func:`resolve_classes` of ``cfg`` and the loaded training ``train``; when nothing names the
    classes, :data:`DEFAULT_NUM_CLASSES` unnamed ones. A disagreement is a :class:`ConfigError`.
    """
    try:
        classes = resolve_classes(cfg, train)
    except ConfigError:
        if cfg.model.num_classes is not None or cfg.data.class_names:
            raise  # the classes are named, but inconsistently
        classes = ClassInfo.from_count(DEFAULT_NUM_CLASSES, "the benchmark default (nothing names the classes)")
    if cfg.model.num_classes is None and not cfg.data.class_names:
        cfg.data.class_names, cfg.data.category_ids = list(classes.names), classes.category_ids
    return classes


def synthetic_batch(cfg: DetectionConfig, batch_size: int, num_classes: int, seed: int) -> Batch:
    """A :class:`Batch` of ``batch_size`` random uint8 ``[3, H, W]`` images at the (first) train size,
    with 3 random instances each (boxes, labels in ``0..num_classes-1``, box masks for Mask R-CNN)."""
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
        boxes = torch.cat([xy, xy + wh], dim=1).float()  # (3, 4) x1y1x2y2 pixels
        masks = None
        if cfg.model.meta_architecture == "mask_rcnn":
            masks = torch.zeros(3, h, w, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                masks[k, y1:y2, x1:x2] = 1
        labels = torch.randint(0, num_classes, (3,), generator=g)
        targets.append(Targets(boxes=boxes, labels=labels, masks=masks))
    return Batch(images=images, targets=targets, image_ids=list(range(batch_size)),
                 orig_sizes=[(h, w)] * batch_size)


def sample_images(cfg: DetectionConfig, splits: Sequence[Optional[CocoData]], n: int) -> tuple[list[np.ndarray], str]:
    """Up to ``n`` readable uint8 RGB ``[H, W, 3]`` images of the first split given, else ``n`` random
    images at the test size; and where they came from (for the report)."""
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


# --------------------------------------------------------------------------- measurements
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_inference(predictor: Predictor, images: list[np.ndarray], iters: int, warmup: int,
                    device: torch.device) -> float:
    """Images per second of ``predictor(image)``, cycling through ``images``."""
    return _rate(predictor, images, iters, warmup, device)


def _rate(fn: Callable[[Any], Any], items: Sequence[Any], iters: int, warmup: int, device: torch.device) -> float:
    """Calls per second of ``fn(item)`` over ``iters`` timed calls after ``warmup``, cycling through ``items``."""
    for i in range(warmup):
        fn(items[i % len(items)])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        fn(items[i % len(items)])
    _sync(device)
    return iters / max(time.perf_counter() - t0, 1e-9)


def bench_train(model: nn.Module, batches: list[Batch], iters: int, warmup: int, device: torch.device,
                precision: str, lr: float) -> float:
    """Training iterations per second (forward, backward, SGD step) on pre-fetched ``batches``."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (check model.backbone.freeze_at)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    amp = "bf16" if precision == "bf16" else "none"
    on_device = [b.to(device) for b in batches]

    def step(batch: Batch) -> None:
        with autocast_context(device, amp):
            losses = model(batch.images, batch.targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return _rate(step, on_device, iters, warmup, device)


def bench_dataloader(loader: Any, batches: int, warmup: int) -> tuple[float, list[Batch]]:
    """Images per second of the loader alone (after ``warmup`` batches) and every batch it gave."""
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


def machine_rows(info: MachineInfo, device: torch.device) -> dict[str, str]:
    """The machine table of the report: cpu, cores, platform, torch, threads, device, gpu."""
    rows = {
        "cpu": info.cpu,
        "cores": f"{info.logical_cpus} logical ({info.usable_cpus} usable by this process)",
        "platform": f"{info.system}, Python {info.python}",
        "torch": f"{info.torch} (torchvision {info.torchvision})",
        "threads": str(info.threads),
        "device": str(device),
    }
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        gpu = next(g for g in info.gpus if g.index == index)
        rows["gpu"] = f"{gpu.name}, {gpu.memory_gib:.1f} GiB, CUDA {info.cuda}"
    elif info.gpus:
        rows["gpu"] = f"{info.gpus[0].name} (not used: --device {device})"
    else:
        rows["gpu"] = "none"
    return rows


# --------------------------------------------------------------------------- the run
def run_benchmark(cfg: DetectionConfig, opts: BenchmarkOptions, config_name: str) -> BenchmarkReport:
    """Run the benchmarks ``opts`` asks for on the detection config ``cfg`` (not modified).

    ``config_name`` names the config in the title. Raises :class:`UsageError` for bad options and
    the errors of the data / config / weights it reads.
    """
    batch_size = _check_options(cfg, opts)
    device = resolve_device(opts.device)
    cfg = cfg.model_copy(deep=True)
    cfg.train.batch_size = batch_size
    train_for = "data-loader" if not opts.skip_data else None if opts.skip_train else "training"
    data = load_splits(cfg, train_for)
    cfg, train = data.cfg, data.train
    classes = benchmark_classes(cfg, train)

    # data loader (its batches also feed the training benchmark)
    dataloader, loader_batches = None, []
    if not opts.skip_data and train is None:
        dataloader = BenchmarkResult("dataloader", None, "img/s", "no data.train configured")
    elif not opts.skip_data:
        n_batches = max(opts.iters, 2)
        ips, loader_batches = bench_dataloader(build_train_loader(cfg, train, 0), n_batches, opts.warmup)
        dataloader = BenchmarkResult("dataloader", ips, "img/s",
                                     f"{cfg.dataloader.num_workers} workers, batch {batch_size}, {n_batches} "
                                     "batches, training pipeline")

    # inference through the Predictor, one image per call
    images, source = sample_images(cfg, [data.val, train], min(opts.iters, 8))
    notes = [f"{data.val_missing} not found (only needed for sample images): inference used {source}"] \
        if data.val_missing else []
    predictor = Predictor(cfg, weights=opts.weights, device=str(device), precision=opts.precision)
    ips = bench_inference(predictor, images, opts.iters, opts.warmup, device)
    inference = BenchmarkResult("inference", ips, "img/s",
                                f"Predictor, 1 image per call, {source}, test size {cfg.input.min_size_test} "
                                f"(max {cfg.input.max_size_test}), {opts.precision}, "
                                f"{'trained' if opts.weights else 'random'} weights, {opts.iters} iters")
    del predictor

    # training steps, model built as train_det builds it
    training = None
    if not opts.skip_train:
        if train is not None:
            if not loader_batches:
                _, loader_batches = bench_dataloader(build_train_loader(cfg, train, 0), 2, 1)
            batches, what = [b for b in loader_batches if len(b) > 0], "batches from the training pipeline"
        else:
            per_process = batch_size_per_process(batch_size, "--batch-size")
            batches = [synthetic_batch(cfg, per_process, classes.num_classes, seed=i) for i in range(2)]
            what = "synthetic batches at the train size"
        model = build_model(cfg, classes.num_classes, device)
        its = bench_train(model, batches, opts.iters, opts.warmup, device, opts.precision, cfg.train.base_lr)
        training = BenchmarkResult("training", its, "it/s",
                                   f"batch {batch_size} ({its * batch_size:.2f} img/s), {what}, {opts.precision}, "
                                   f"{opts.iters} iters")

    title = (f"benchmark of {config_name}: {cfg.model.meta_architecture} {cfg.model.backbone.name}-FPN, "
             f"{classes.num_classes} classes")
    machine = machine_rows(machine_info(), device) | {"precision": opts.precision}
    results = [r for r in (inference, training, dataloader) if r is not None]
    return BenchmarkReport(title, machine, results, classes, notes)
