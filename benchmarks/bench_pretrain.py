#!/usr/bin/env python
"""Classification pretraining throughput: detkit vs torchvision under the same settings, in one run.

Two measurements, images per second, for each architecture:

* data pipeline: detkit's ``ImageFolderDataset`` + ``build_classification_transform`` (albumentations,
  OpenCV decoding) against ``torchvision.datasets.ImageFolder`` + torchvision transforms
  (PIL decoding), both RandomResizedCrop(224) + horizontal flip + normalize, same DataLoader
  settings, on a generated ImageFolder;
* train step: forward + label-smoothing cross-entropy + backward + SGD step of detkit's
  ``build_classifier`` against ``torchvision.models.resnet*`` (same batch, optimizer, input), both in
  fp32; plus detkit under ``train.amp=auto`` (what ``tools/pretrain_cls.py`` runs by default: bf16
  autocast where the device has native bf16), when that resolves to a mixed precision here.

Runs alternate between the two implementations for several rounds and report the median, so a
busy machine penalizes both alike. Example::

    python benchmarks/bench_pretrain.py --archs resnet18 resnet50 --batch-size 16 --iters 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from detkit.machine import cpu_model_name


def _time_loader(loader: DataLoader, num_batches: int, warmup: int = 1) -> float:
    """Images per second over ``num_batches`` batches (after ``warmup`` batches)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
        n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch.images)
    return n / (time.perf_counter() - t0)


def data_loaders(root: Path, batch_size: int, num_workers: int) -> dict[str, DataLoader]:
    """Equivalent training pipelines of both libraries over ``root``."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from detkit.config.schema import ClsInputConfig
    from detkit.data.imagefolder import ImageFolderDataset
    from detkit.data.transforms import build_classification_transform
    from detkit.engine.classification import collate_cls_batch

    cfg = ClsInputConfig(size=224)
    dk = ImageFolderDataset(root, build_classification_transform(cfg, is_train=True, seed=0))
    mean = [m / 255 for m in cfg.mean]
    std = [s / 255 for s in cfg.std]
    tv = ImageFolder(str(root), T.Compose([
        T.RandomResizedCrop(224, scale=(cfg.min_crop_scale, 1.0)), T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(mean, std),
    ]))
    common = dict(batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                  persistent_workers=num_workers > 0)
    return {"detkit": DataLoader(dk, collate_fn=collate_cls_batch, **common), "torchvision": DataLoader(tv, **common)}


def train_step_fn(model: nn.Module, batch_size: int, device: torch.device, amp: str = "none") -> Callable[[], None]:
    """One SGD step on a fixed random batch (images already normalized), under ``amp`` autocast."""
    from detkit.engine.trainer import autocast_context

    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (batch_size,), generator=g).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            loss = crit(model(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def _time_steps(step: Callable[[], None], iters: int, warmup: int, batch_size: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * batch_size / (time.perf_counter() - t0)


def bench(args: argparse.Namespace) -> list[tuple[str, str, float, float]]:
    import torchvision

    from detkit.data.synthetic import make_shapes_imagefolder
    from detkit.engine import resolve_amp
    from detkit.models import build_classifier

    device = torch.device(args.device)
    amp = resolve_amp("auto", device)  # what pretrain_cls runs with train.amp=auto
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(make_shapes_imagefolder(Path(tmp) / "cls", num_per_class_train=args.images_per_class,
                                            num_per_class_val=1, image_size=args.image_size)["train"])
        loaders = data_loaders(root, args.batch_size, args.num_workers)
        res: dict[str, list[float]] = {"detkit": [], "torchvision": []}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                res[name].append(_time_loader(loader, args.data_batches))
        rows.append(("data pipeline", "-", statistics.median(res["detkit"]), statistics.median(res["torchvision"])))
        del loaders

    for arch in args.archs:
        torch.manual_seed(0)
        steps = {
            "detkit": train_step_fn(build_classifier(arch, 1000, norm="BN"), args.batch_size, device),
            "torchvision": train_step_fn(getattr(torchvision.models, arch)(weights=None), args.batch_size, device),
        }
        if amp != "none":
            steps[f"detkit {amp}"] = train_step_fn(build_classifier(arch, 1000, norm="BN"), args.batch_size, device, amp)
        res = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                res[name].append(_time_steps(step, args.iters, args.warmup, args.batch_size))
        tv = statistics.median(res["torchvision"])
        rows.append(("train step", arch, statistics.median(res["detkit"]), tv))
        if amp != "none":
            rows.append((f"step amp={amp}", arch, statistics.median(res[f"detkit {amp}"]), tv))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="timed train steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--data-batches", type=int, default=8, help="timed batches per data round")
    p.add_argument("--images-per-class", type=int, default=64, help="generated images per class (4 classes)")
    p.add_argument("--image-size", type=int, default=256, help="side of the generated images")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = bench(args)
    print(f"\ndevice {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cpu_model_name()}; batch {args.batch_size}, 224 px, "
          f"{args.rounds} rounds (median)")
    print(f"| {'benchmark':<14} | {'arch':<8} | {'detkit img/s':>12} | {'torchvision img/s':>17} | {'ratio':>5} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 14}|{'-' * 19}|{'-' * 7}|")
    for what, arch, dk, tv in rows:
        print(f"| {what:<14} | {arch:<8} | {dk:>12.1f} | {tv:>17.1f} | {dk / tv:>5.2f} |")


if __name__ == "__main__":
    main()
