"""torchvision vs detkit: Faster R-CNN R50-FPN inference speed with the same weights and images.

torchvision's v1 ``fasterrcnn_resnet50_fpn`` is built the way its COCO weights are (FrozenBN
ResNet-50, trainable_backbone_layers=3), given reproducible random weights that produce
detections, and loaded into detkit with ``configs/torchvision/faster_rcnn_R_50_FPN.yaml``.
Both models see the same images, already at test size (short side 800, long side <= 1333), so
torchvision's transform does not resize; both include their normalization, padding and
post-processing. Timings alternate between the two models image by image.

    python benchmarks/bench_inference.py [--images 3] [--warmup 1] [--threads N] [--device cpu]

Prints seconds per image for each and the ratio torchvision / detkit (> 1: detkit is faster), in
wall-clock time and in process CPU time (steadier than wall time on a shared machine, and equal to it
with ``--threads 1`` on an idle one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import detkit  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.models.build import build_detector  # noqa: E402
from torchvision_reference import randomize_for_detections  # noqa: E402  (tests/: the parity tests' weights)

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "images"


def torchvision_v1_faster_rcnn() -> FasterRCNN:
    """torchvision's fasterrcnn_resnet50_fpn exactly as built for its COCO_V1 weights (FrozenBN)."""
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91)


def load_images(n: int, short: int, max_size: int) -> list[torch.Tensor]:
    """``n`` uint8 [3, H, W] RGB images at test size: COCO128 when present, else synthetic."""
    import cv2

    images = []
    files = sorted(COCO128.iterdir())[:n] if COCO128.is_dir() else []
    rng = np.random.default_rng(0)
    for i in range(n):
        if i < len(files):
            img = cv2.cvtColor(cv2.imread(str(files[i]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (9, 9), 0)
        h, w = img.shape[:2]
        s = min(short / min(h, w), max_size / max(h, w))
        img = cv2.resize(img, (int(w * s + 0.5), int(h * s + 0.5)), interpolation=cv2.INTER_LINEAR)
        images.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=800, help="short side of the test images")
    parser.add_argument("--fold-bn", action="store_true", help="fold detkit's frozen BNs into the convs first")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    tv = torchvision_v1_faster_rcnn().eval()
    randomize_for_detections(tv, seed=0)
    cfg = load_config(ROOT / "configs/torchvision/faster_rcnn_R_50_FPN.yaml")
    dk = build_detector(cfg, num_classes=90).eval()
    report = detkit.load_weights(dk, tv.state_dict())
    assert not report.missing and not report.mismatched, report.summary()
    if args.fold_bn:
        from detkit.layers import fold_frozen_bn

        fold_frozen_bn(dk)
    tv.to(device)
    dk.to(device)

    images = load_images(args.images, args.size, cfg.input.max_size_test)
    tv.transform.min_size, tv.transform.max_size = (args.size,), cfg.input.max_size_test

    def run_tv(im: torch.Tensor) -> int:
        return len(tv([im.to(device).float() / 255])[0]["boxes"])

    def run_dk(im: torch.Tensor) -> int:
        return len(dk.predict([im.to(device)])[0])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {"torchvision": [], "detkit": []}
    cpu: dict[str, list[float]] = {"torchvision": [], "detkit": []}
    counts: dict[str, list[int]] = {"torchvision": [], "detkit": []}
    with torch.inference_mode():
        for _ in range(args.warmup):
            run_tv(images[0])
            run_dk(images[0])
        for _ in range(args.repeats):
            for i, im in enumerate(images):
                order = [("torchvision", run_tv), ("detkit", run_dk)]
                if i % 2:
                    order.reverse()  # alternate who goes first
                for name, fn in order:
                    sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    counts[name].append(fn(im))
                    sync()
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)

    print(f"device={device} threads={torch.get_num_threads()} fold_bn={args.fold_bn} images={len(images)} "
          f"sizes={[tuple(im.shape[1:]) for im in images]} repeats={args.repeats}")
    for name in times:
        print(f"{name:12s} {statistics.mean(times[name]):.3f} s/img (median {statistics.median(times[name]):.3f}, "
              f"min {min(times[name]):.3f}; process CPU {statistics.mean(cpu[name]):.3f} s/img, "
              f"detections {counts[name]})")
    ratio = statistics.mean(times["torchvision"]) / statistics.mean(times["detkit"])
    ratio_med = statistics.median(times["torchvision"]) / statistics.median(times["detkit"])
    print(f"ratio torchvision/detkit = {ratio:.3f} mean, {ratio_med:.3f} median "
          f"({'detkit faster' if ratio >= 1 else 'detkit slower'} on the mean); process CPU time ratio "
          f"{statistics.mean(cpu['torchvision']) / statistics.mean(cpu['detkit']):.3f}")


if __name__ == "__main__":
    main()
