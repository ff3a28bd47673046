"""Throughput mode: images/s of ``Predictor.predict`` at batch 1, 2 and 4 against one-image calls.

The same images go through one :class:`detkit.Predictor` per model and precision in several modes:
``predictor(img)`` for each image (one-image calls), and ``predictor.predict(images)`` with
``test.batch_size`` 1, 2 and 4 (that many images per model call; batched images are zero-padded to
the batch's largest size, rounded up to ``size_divisibility``). After warm-up, each round times every
mode over all the images, the order rotating from round to round. Printed per mode: images/s
(median of the rounds), wall and process-CPU seconds per image, the ratio to one-image calls, and
how the detections of each batched mode agree with the one-image calls: detections without a partner
of the same label at box IoU >= 0.99 ("moved"), and for those scoring >= ``--agree-thresh`` the
partners at IoU >= 0.5 (smallest and mean IoU, largest |score difference|) and the unpaired ones.

Models:

* ``demo``: Mask R-CNN R18-FPN (``configs/demo/shapes_mask_rcnn_R_18_FPN.yaml``, 224-320 px); the
  trained demo weights where ``--demo-weights`` / ``--demo-config`` exist (default
  /tmp/rt/demo/last.pth and its config.yaml), else random weights. Images: the config's validation
  images where they exist (256x256 shapes), else generated ones; ``--mixed`` crops every other one
  (different sizes in one batch).
* ``r50``: Faster R-CNN R50-FPN at 800 px (``configs/torchvision/faster_rcnn_R_50_FPN.yaml``) with
  ``torchvision_model(0).state_dict()`` of ``bench_cpu_inference.py`` and its ``load_images``
  (coco128 at short side 800, long side <= 1333; portrait and landscape images mix).

    python benchmarks/bench_throughput.py [--models demo,r50] [--precisions fp32,bf16] [--rounds 3]
        [--demo-images 16] [--r50-images 4] [--mixed] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_cpu_inference import load_images, torchvision_model  # noqa: E402

from detkit import Predictor  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.machine import bf16_supported, cpu_capability, cpu_speed_flags, machine_info  # noqa: E402
from detkit.inference.predictor import Prediction  # noqa: E402

DEMO_CONFIG = ROOT / "configs/demo/shapes_mask_rcnn_R_18_FPN.yaml"
R50_CONFIG = ROOT / "configs/torchvision/faster_rcnn_R_50_FPN.yaml"
BATCH_SIZES = (1, 2, 4)
ONE = "one-image calls"


def demo_model(args: argparse.Namespace) -> tuple[Path, Optional[Path]]:
    """Config and weights of the demo model: the trained ones where they exist, else random weights."""
    if Path(args.demo_weights).is_file() and Path(args.demo_config).is_file():
        return Path(args.demo_config), Path(args.demo_weights)
    print(f"(no trained demo weights at {args.demo_weights}: random weights)")
    return DEMO_CONFIG, None


def demo_images(config: Path, n: int, mixed: bool) -> list[np.ndarray]:
    """``n`` RGB images: the config's validation images where present, else generated shapes-like
    images (256x256); ``mixed`` crops every other image to another size."""
    import cv2

    cfg = load_config(config)
    val = getattr(cfg.data, "val", None)
    folder = Path(val.images) if val is not None and getattr(val, "images", None) else None
    files = sorted(folder.glob("*.jpg"))[:n] if folder is not None and folder.is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i < len(files):
            img = cv2.cvtColor(cv2.imread(str(files[i])), cv2.COLOR_BGR2RGB)
        else:
            img = np.full((256, 256, 3), 40, np.uint8)
            for _ in range(3):
                x, y, r = (int(v) for v in rng.integers(30, 220, 3) // (1, 1, 3))
                cv2.circle(img, (x, y), r + 10, tuple(int(c) for c in rng.integers(80, 255, 3)), -1)
        if mixed and i % 2 == 1:
            img = np.ascontiguousarray(img[: 256 - 64 * (i % 4 == 1), : 256 - 64 * (i % 4 == 3)])
        out.append(img)
    return out


def run_mode(predictor: Predictor, mode: str, images: list[np.ndarray]) -> list[Prediction]:
    if mode == ONE:
        return [predictor(im) for im in images]
    predictor.cfg.test.batch_size = int(mode.split()[-1])
    return predictor.predict(images)


def time_modes(predictor: Predictor, images: list[np.ndarray], modes: list[str], rounds: int,
               warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[Prediction]]]:
    """Wall and process-CPU seconds per round for each mode (over all images), rotating the order."""
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    outs: dict[str, list[Prediction]] = {}
    for _ in range(warmup):
        for m in modes:
            outs[m] = run_mode(predictor, m, images)
    for r in range(rounds):
        shift = r % len(modes)
        for m in modes[shift:] + modes[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            outs[m] = run_mode(predictor, m, images)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    return wall, cpu, outs


def _match(ref: Prediction, got: Prediction, min_iou: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matches (ref index, got index, IoU) in ref's score order: same label, IoU >= min_iou."""
    from torchvision.ops import box_iou

    if len(ref) == 0 or len(got) == 0:
        return []
    iou = box_iou(torch.from_numpy(ref.boxes), torch.from_numpy(got.boxes))
    iou[torch.from_numpy(ref.labels)[:, None] != torch.from_numpy(got.labels)[None, :]] = -1.0
    taken, out = set(), []
    for i in range(len(ref)):
        order = [j for j in torch.argsort(iou[i], descending=True).tolist() if j not in taken]
        if order and iou[i, order[0]] >= min_iou:
            taken.add(order[0])
            out.append((i, order[0], float(iou[i, order[0]])))
    return out


def agreement(ref: list[Prediction], got: list[Prediction], score_thresh: float) -> str:
    """``got`` against ``ref`` image by image. All detections: how many have no partner of the same
    label at box IoU >= 0.99 (moved or changed), and in how many images. Detections scoring >=
    ``score_thresh`` (what a user keeps): partners at IoU >= 0.5, their smallest IoU and largest
    |score difference|, and those without a partner."""
    moved = moved_images = 0
    kept_ref = kept_got = lost = 0
    ious, diffs = [], []
    for a, b in zip(ref, got):
        strict = len(_match(a, b, 0.99))
        moved += len(a) + len(b) - 2 * strict
        moved_images += strict != len(a) or strict != len(b)
        ka, kb = (Prediction(p.boxes[p.scores >= score_thresh], p.scores[p.scores >= score_thresh],
                             p.labels[p.scores >= score_thresh]) for p in (a, b))
        pairs = _match(ka, kb, 0.5)
        kept_ref, kept_got, lost = kept_ref + len(ka), kept_got + len(kb), lost + len(ka) + len(kb) - 2 * len(pairs)
        ious += [iou for _, _, iou in pairs]
        diffs += [abs(float(ka.scores[i]) - float(kb.scores[j])) for i, j, _ in pairs]
    n = sum(len(p) for p in got)
    return (f"{n} dets, {moved} moved (IoU<0.99) in {moved_images} img; score>={score_thresh}: {kept_got}/{kept_ref}, "
            f"{lost} unpaired, IoU min {min(ious, default=1.0):.3f} mean {statistics.mean(ious or [1.0]):.4f}, "
            f"|d score| max {max(diffs, default=0.0):.1e}")


def bench(name: str, config: Path, weights, images: list[np.ndarray], precision: str,
          args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    predictor = Predictor(config, weights=weights, precision=precision, device=args.device)
    build_s = time.perf_counter() - t0
    modes = [ONE] + [f"predict, batch {b}" for b in BATCH_SIZES]
    wall, cpu, outs = time_modes(predictor, images, modes, args.rounds, args.warmup)
    n = len(images)
    base = statistics.median(wall[ONE])
    sizes = sorted({im.shape[:2] for im in images})
    print(f"\n{name} {predictor.precision} ({precision} asked), {n} images of sizes {sizes}, built in "
          f"{build_s:.1f} s, {args.rounds} rounds after {args.warmup} warm-up")
    print(f"  {'mode':20s} {'img/s':>7s} {'s/img':>7s} {'CPU s/img':>9s} {'x one':>6s}  detections vs one-image calls")
    for m in modes:
        med = statistics.median(wall[m])
        agree = "(reference)" if m == ONE else agreement(outs[ONE], outs[m], args.agree_thresh)
        print(f"  {m:20s} {n / med:7.2f} {med / n:7.3f} {statistics.median(cpu[m]) / n:9.3f} {base / med:6.2f}  "
              f"{agree}")
    print("  img/s of each round: " + "; ".join(
        f"{m.split(', ')[-1]}: " + " ".join(f"{n / t:.2f}" for t in wall[m]) for m in modes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,r50", help="comma-separated: demo, r50")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of every mode first")
    parser.add_argument("--demo-images", type=int, default=16)
    parser.add_argument("--r50-images", type=int, default=4)
    parser.add_argument("--mixed", action="store_true", help="demo: crop every other image to another size")
    parser.add_argument("--agree-thresh", type=float, default=0.5,
                        help="score of the detections whose agreement with one-image calls is detailed")
    parser.add_argument("--demo-weights", default="/tmp/rt/demo/last.pth")
    parser.add_argument("--demo-config", default="/tmp/rt/demo/config.yaml")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {info.cpu_summary()}, CPU capability "
          f"{cpu_capability()}, speed flags {' '.join(cpu_speed_flags()) or '-'}, bf16 native: "
          f"{bf16_supported('cpu')}, device {args.device}" + (f" ({info.gpus[0].name})" if info.gpus else ""))
    for model in [m for m in args.models.split(",") if m]:
        if model == "demo":
            config, weights_file = demo_model(args)
            images = demo_images(config, args.demo_images, args.mixed)
            label = f"demo Mask R-CNN R18-FPN ({'trained' if weights_file else 'random'} weights)"
            weights = None if weights_file is None else str(weights_file)
        elif model == "r50":
            images = load_images(args.r50_images, 800, 1333)
            config, weights = R50_CONFIG, torchvision_model(0).state_dict()
            label = "Faster R-CNN R50-FPN 800 px (random, biased)"
        else:
            raise SystemExit(f"--models: unknown model {model!r}; use demo and/or r50")
        for precision in [p for p in args.precisions.split(",") if p]:
            bench(label, config, dict(weights) if isinstance(weights, dict) else weights, images, precision, args)

if __name__ == "__main__":
    main()
