#!/usr/bin/env python
"""ImageNet-scale pretraining data: folder scan time, memory (PSS) of the loader, images/s.

Builds an ImageFolder of ``--classes`` class folders with ``--per-class`` files each (ImageNet's
train split: 1,000 x 1,281 = 1.28M), every file a hard link to one of a few JPEGs (4 coco128
images resized to 500 x 375, copied so that no file has more than 60,000 links), then, with ``tools/pretrain_cls.py``'s pieces and
``configs/classification/resnet50_imagefolder.yaml``:

1. times the scan of the folder (``ImageFolderDataset``) without a cache, then again with the cache
   the first scan wrote (checked against the folders' modification times);
2. runs the training loader (``EpochBatches``: DistributedSampler, RandomResizedCrop 224, flip,
   normalize) with ``--workers`` workers and batch ``--batch`` for ``--iters`` iterations, printing
   the PSS (``/proc/<pid>/smaps_rollup``) of the main process and each worker every ``--every``
   iterations, and the loader's images/s.

    python benchmarks/bench_imagefolder_scale.py                       # 1.28M files
    python benchmarks/bench_imagefolder_scale.py --classes 100 --per-class 100 --iters 50

Hard links take no inodes, only directory entries (about 60 MB for 1.28M). Linux only (PSS).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_data_scale import COCO128, pss_mib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "classification" / "resnet50_imagefolder.yaml"


def build(root: Path, classes: int, per_class: int) -> None:
    """``root/n{c:08d}/{c}_{i}.JPEG`` hard links to a few JPEGs (skipped when already complete)."""
    import cv2

    marker = root / ".complete"
    if marker.is_file():
        return
    sources = root / ".sources"
    sources.mkdir(parents=True, exist_ok=True)
    images = [cv2.resize(cv2.imread(str(s)), (500, 375)) for s in sorted((COCO128 / "images").glob("*.jpg"))[:4]]
    jpegs = []  # enough copies that none has more than 60,000 links (ext4 allows 65,000)
    for k in range(max(len(images), -(-classes * per_class // 60_000))):
        jpegs.append(sources / f"{k}.jpg")
        cv2.imwrite(str(jpegs[-1]), images[k % len(images)])
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            dst = folder / f"n{c:08d}_{i}.JPEG"
            if not dst.exists():
                os.link(jpegs[(c + i) % len(jpegs)], dst)
    marker.touch()


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the loader's workers)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--iters", type=int, default=600, help="loader iterations (default 600)")
    p.add_argument("--every", type=int, default=100, help="print PSS every N iterations (default 100)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--work-dir", default="/tmp/detkit_bench_imagefolder")
    args = p.parse_args()
    root = Path(args.work_dir) / f"{args.classes}x{args.per_class}"
    t0 = time.perf_counter()
    build(root, args.classes, args.per_class)
    print(f"folder: {root} ({args.classes * args.per_class} files; ready in {time.perf_counter() - t0:.0f} s)")

    import torch

    from detkit.config import load_classification_config
    from detkit.data.imagefolder import ImageFolderDataset
    from detkit.data.transforms import build_classification_transform
    from detkit.engine.classification import EpochBatches
    from detkit.machine import cpu_model_name

    torch.set_num_threads(1)
    os.environ.setdefault("DETKIT_HOME", tempfile.mkdtemp(prefix="detkit_home_"))
    cfg = load_classification_config(str(CONFIG), [f"data.train={root}", f"data.val={root}"])
    print(f"CPU: {cpu_model_name()} ({os.cpu_count()} CPUs); detkit: {sys.modules['detkit'].__file__}")
    transform = build_classification_transform(cfg.input, True, seed=0)
    for what in ("scan (no cache)", "scan (cached)"):
        t0 = time.perf_counter()
        ds = ImageFolderDataset(root, transform)
        print(f"{what}: {time.perf_counter() - t0:.1f} s, {len(ds)} images, {len(ds.classes)} classes; "
              f"main PSS {pss_mib(os.getpid()):.0f} MiB")
    batches = EpochBatches(ds, args.batch, args.workers, seed=0)
    it = iter(batches)
    next(it)
    pids = children(os.getpid())
    t_start, rows = time.perf_counter(), []
    for i in range(1, args.iters + 1):
        next(it)
        if i % args.every == 0:
            main_pss, workers = pss_mib(os.getpid()), [pss_mib(w) for w in pids]
            total = main_pss + sum(workers)
            rows.append(total)
            rate = args.batch * i / (time.perf_counter() - t_start)
            print(f"it {i:5d}: main {main_pss:5.0f} MiB, workers {' '.join(f'{w:4.0f}' for w in workers)} MiB, "
                  f"total {total:5.0f} MiB, {rate:.0f} img/s", flush=True)
    if rows:
        print(f"summary: total PSS {rows[0]:.0f} -> {rows[-1]:.0f} MiB ({100 * (rows[-1] - rows[0]) / rows[0]:+.1f} %), "
              f"{args.batch * args.iters / (time.perf_counter() - t_start):.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
