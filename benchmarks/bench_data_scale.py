#!/usr/bin/env python
"""COCO-scale training data: load time and memory (PSS) of the real training loader.

Writes a synthetic COCO train2017-sized annotation file (by default 118,287 images and 818,000
polygon annotations; every image points at one small JPEG) whose annotations are copies of
coco128's polygons (their categories, polygon counts and lengths, scaled to the JPEG), then:

1. times ``load_coco`` on it (what ``tools/train_det.py`` calls);
2. builds the real training loader, ``detkit.engine.detection.build_train_loader``, with
   ``configs/coco/mask_rcnn_R_50_FPN_1x.yaml`` (masks, multi-scale resize, flip, aspect-ratio
   grouping) and ``dataloader.num_workers=4``, ``train.batch_size=2``;
3. iterates it (no model) and prints, every ``--every`` iterations, the PSS (proportional set
   size, from ``/proc/<pid>/smaps_rollup``: shared pages split between the processes sharing them)
   of the main process and of each worker, and their total.

The issue's goals with 4 workers on the full-size file: load <= 10 s, total PSS <= 1.5 GiB, PSS
growth from iteration 1,000 to 6,000 <= 3 %. Examples::

    python benchmarks/bench_data_scale.py                      # full size, 6,000 iterations
    python benchmarks/bench_data_scale.py --images 2000 --annotations 14000 --iters 300 --every 100

The file is written once under ``--work-dir`` (reused when its sizes match). Linux only (PSS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
CONFIG = ROOT / "configs" / "coco" / "mask_rcnn_R_50_FPN_1x.yaml"
IMAGE_W, IMAGE_H = 640, 480


def pss_mib(pid: int) -> float:
    """PSS of process ``pid`` in MiB (``/proc/<pid>/smaps_rollup``)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


def _scaled(seg: list, sx: float, sy: float) -> list:
    return [[round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(poly)] for poly in seg]


def generate(out: Path, num_images: int, num_annotations: int) -> None:
    """Write ``out/train.json`` and ``out/images/shared.jpg`` (one JPEG every image points at)."""
    import cv2
    import numpy as np

    src = json.loads((COCO128 / "annotations.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in src["images"]}
    pool = [a for a in src["annotations"] if not a.get("iscrowd") and isinstance(a["segmentation"], list)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    img = cv2.resize(cv2.imread(str(COCO128 / "images" / src["images"][0]["file_name"])), (IMAGE_W, IMAGE_H))
    cv2.imwrite(str(out / "images" / "shared.jpg"), img)
    images = [{"id": i + 1, "file_name": "shared.jpg", "width": IMAGE_W, "height": IMAGE_H,
               "license": 1, "date_captured": "2013-11-14 11:18:45"} for i in range(num_images)]
    anns = []
    for j in range(num_annotations):
        a = pool[int(rng.integers(len(pool)))]
        w, h = sizes[a["image_id"]]
        sx, sy = IMAGE_W / w, IMAGE_H / h
        x, y, bw, bh = a["bbox"]
        anns.append({"segmentation": _scaled(a["segmentation"], sx, sy), "area": round(a["area"] * sx * sy, 2),
                     "iscrowd": 0, "image_id": j * num_images // num_annotations + 1,
                     "bbox": [round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2)],
                     "category_id": a["category_id"], "id": j + 1})
    data = {"info": {"description": "synthetic train2017-sized file"}, "licenses": [],
            "images": images, "annotations": anns, "categories": src["categories"]}
    tmp = out / "train.json.tmp"
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(out / "train.json")
    (out / "sizes.json").write_text(json.dumps([num_images, num_annotations]))


def measure(out: Path, iters: int, every: int, workers: int) -> None:
    import numpy as np
    import torch

    from detkit.config import load_detection_config
    from detkit.data.coco import load_coco
    from detkit.engine.detection import build_train_loader
    from detkit.machine import cpu_model_name

    torch.set_num_threads(1)
    cfg = load_detection_config(str(CONFIG), [
        f"data.train.annotations={out / 'train.json'}", f"data.train.images={out / 'images'}",
        f"dataloader.num_workers={workers}", "train.batch_size=2"])
    print(f"CPU: {cpu_model_name()} ({os.cpu_count()} CPUs); detkit: {sys.modules['detkit'].__file__}")
    print(f"file: {out / 'train.json'} ({(out / 'train.json').stat().st_size / 2**20:.0f} MiB)")
    print(f"PSS before loading: {pss_mib(os.getpid()):.0f} MiB")
    os.environ["DETKIT_HOME"] = tempfile.mkdtemp(prefix="detkit_home_")  # a cold cache (detkit.data.records_cache)
    times = []
    for _ in range(2):  # parsed (and cached), then read back from the cache
        t0 = time.perf_counter()
        data = load_coco(cfg.data.train.annotations, cfg.data.train.images, filter_empty=cfg.data.filter_empty,
                         is_train=True)
        times.append(time.perf_counter() - t0)
    load_s = times[1]
    print(f"load_coco: {times[0]:.1f} s parsing the file, {times[1]:.1f} s from its cache; {len(data)} images; "
          f"PSS after loading: {pss_mib(os.getpid()):.0f} MiB")
    if iters <= 0:  # --iters 0: the load only
        return
    loader = build_train_loader(cfg, data, 0)
    it = iter(loader)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    rows, t_start = [], time.perf_counter()
    for i in range(1, iters + 1):
        next(it)
        if i % every == 0 or i == 1:
            main = pss_mib(os.getpid())
            per_worker = [pss_mib(p) for p in pids]
            total = main + sum(per_worker)
            rows.append((i, total))
            rate = 2 * i / (time.perf_counter() - t_start)
            print(f"it {i:5d}: main {main:6.0f} MiB, workers {' '.join(f'{w:4.0f}' for w in per_worker)} MiB, "
                  f"total {total:6.0f} MiB ({total / 1024:.2f} GiB), {rate:.0f} img/s", flush=True)
    first = next((k for k, (i, _) in enumerate(rows) if i >= min(1000, iters // 6)), 0)
    start = rows[first]
    growth = 100.0 * (rows[-1][1] - start[1]) / start[1]
    # the main process's PSS swings with the prefetched batches it holds when sampled: medians of 5 samples
    early = float(np.median([t for _, t in rows[first:first + 5]]))
    late = float(np.median([t for _, t in rows[-5:]]))
    print(f"summary: load {times[0]:.1f} s parsed, {load_s:.1f} s cached; total PSS {start[1] / 1024:.2f} GiB at it "
          f"{start[0]}, {rows[-1][1] / 1024:.2f} GiB at it {rows[-1][0]} ({growth:+.1f} %); medians of 5 samples "
          f"{early / 1024:.2f} -> {late / 1024:.2f} GiB ({100.0 * (late - early) / early:+.1f} %); "
          f"max {max(t for _, t in rows) / 1024:.2f} GiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118_287, help="images in the file (default: train2017's 118,287)")
    p.add_argument("--annotations", type=int, default=None,
                   help="polygon annotations (default: 818,000 scaled to --images)")
    p.add_argument("--iters", type=int, default=6000, help="loader iterations (default 6000; 0: the load only)")
    p.add_argument("--every", type=int, default=200, help="print PSS every N iterations (default 200)")
    p.add_argument("--workers", type=int, default=4, help="dataloader.num_workers (default 4)")
    p.add_argument("--work-dir", default="/tmp/detkit_bench_data_scale", help="where the file is written")
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    anns = args.annotations if args.annotations is not None else round(818_000 * args.images / 118_287)
    out = Path(args.work_dir) / f"{args.images}_{anns}"
    if args.generate_only:
        generate(out, args.images, anns)
        return 0
    if not (out / "sizes.json").is_file():  # in a child process: the generator's memory is not measured
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-only", "--images", str(args.images),
                        "--annotations", str(anns), "--work-dir", args.work_dir], check=True)
        print(f"wrote {out / 'train.json'} in {time.perf_counter() - t0:.0f} s")
    measure(out, args.iters, args.every, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
