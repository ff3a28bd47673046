"""Time detkit.ops.roi_align against torchvision.ops.roi_align on CPU training shapes.

Cases (all with random features and boxes shaped like real Mask R-CNN training batches):
  box:  512 RoIs x 2 images, 7x7 bins, one FPN level (p3 of a 512 px input, 64x64), C = 256 / 128,
        sampling_ratio 0 (Detectron2) and 2 (torchvision), aligned as their models use.
  mask: 128 positive RoIs x 2 images, 14x14 bins, same level, C = 256.
  msra: MultiScaleRoIAlign-style: the 1024 box-head RoIs split over p2..p5 of a 512 px input
        by the FPN level rule, one call per level, as detkit's pooler does.
  train step (--train-step): a whole Mask R-CNN R18-FPN training step, 4 images of 320 px,
        with the pooler's roi_align swapped between torchvision and detkit.

For each case it prints the median of ``--repeats`` timings (ms) of the forward alone and of
forward + backward, for both implementations, and the speed-up: wall-clock time, and process CPU
time (summed over threads; steadier than wall time on a shared machine). Then the max abs
difference of the outputs, the max relative difference of the input gradients, and the ratio of
detkit's sparse entries to torchvision's bilinear loads. ``--threads 1`` gives single-thread numbers.

    python benchmarks/bench_roi_align.py [--threads 2] [--repeats 5] [--quick] [--train-step]

On a machine shared with other busy processes, set OMP_WAIT_POLICY=PASSIVE with --threads 2:
OpenMP threads that spin-wait for a descheduled partner inflate every multi-threaded op.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from detkit.ops import roi_align, roi_align_plan_stats

RoIAlignFn = Callable[..., torch.Tensor]


def make_boxes(num: int, image_size: int, min_size: float, max_size: float, gen: torch.Generator) -> torch.Tensor:
    """[num, 4] xyxy boxes with log-uniform side lengths, centres inside the image, clipped."""
    sides = torch.exp(torch.empty(num, 2).uniform_(math.log(min_size), math.log(max_size), generator=gen))
    centres = torch.rand(num, 2, generator=gen) * image_size
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    return boxes.clamp(0, image_size)


def make_rois(
    per_image: int, images: int, image_size: int, min_size: float, max_size: float, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rois = []
    for i in range(images):
        boxes = make_boxes(per_image, image_size, min_size, max_size, gen)
        rois.append(torch.cat([torch.full((per_image, 1), float(i)), boxes], dim=1))
    return torch.cat(rois)


def fpn_levels(rois: torch.Tensor, min_level: int = 2, max_level: int = 5) -> torch.Tensor:
    """Level index (0 = p2) of each RoI by the FPN paper's rule (canonical 224 px -> level 4)."""
    wh = rois[:, 3:5] - rois[:, 1:3]
    size = torch.sqrt(wh[:, 0] * wh[:, 1])
    level = torch.floor(4 + torch.log2(size / 224) + 1e-6).clamp(min_level, max_level)
    return level.to(torch.int64) - min_level


def time_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time (all threads) of ``fn``, in ms."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def run_case(
    name: str,
    feats: list[torch.Tensor],
    scales: list[float],
    rois: torch.Tensor,
    out: int,
    sampling_ratio: int,
    aligned: bool,
    repeats: int,
) -> None:
    levels = fpn_levels(rois) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.int64)
    per_level = [torch.nonzero(levels == i).squeeze(1) for i in range(len(feats))]

    def pool(fn: RoIAlignFn, inputs: list[torch.Tensor]) -> torch.Tensor:
        result = inputs[0].new_zeros(len(rois), inputs[0].shape[1], out, out)
        for x, scale, idx in zip(inputs, scales, per_level):
            if idx.numel():
                result[idx] = fn(x, rois[idx], out, scale, sampling_ratio, aligned)
        return result

    grad = torch.randn(len(rois), feats[0].shape[1], out, out)
    results = {}
    for label, fn in (("torchvision", torchvision.ops.roi_align), ("detkit", roi_align)):
        leaves = [f.detach().clone().requires_grad_() for f in feats]

        def fwd(fn: RoIAlignFn = fn) -> None:
            with torch.no_grad():
                pool(fn, feats)

        def fwd_bwd(fn: RoIAlignFn = fn, leaves: list[torch.Tensor] = leaves) -> None:
            for leaf in leaves:
                leaf.grad = None
            pool(fn, leaves).backward(grad)

        results[label] = (time_ms(fwd, repeats), time_ms(fwd_bwd, repeats))
        out_t = pool(fn, feats)
        fwd_bwd()
        grads = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]
        results[label + "_values"] = (out_t, grads)
    (tv_f, tv_fc), (tv_fb, tv_fbc) = results["torchvision"]
    (dk_f, dk_fc), (dk_fb, dk_fbc) = results["detkit"]
    (tv_out, tv_grads), (dk_out, dk_grads) = results["torchvision_values"], results["detkit_values"]
    out_diff = (tv_out - dk_out).abs().max().item()
    grad_diff = max(
        ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item() for a, b in zip(tv_grads, dk_grads)
    )
    entries = sum(
        roi_align_plan_stats(rois[idx], tuple(x.shape[2:]), out, s, sampling_ratio, aligned)["entries"]
        for x, s, idx in zip(feats, scales, per_level)
        if idx.numel()
    )
    loads = sum(
        roi_align_plan_stats(rois[idx], tuple(x.shape[2:]), out, s, sampling_ratio, aligned)["torchvision_loads"]
        for x, s, idx in zip(feats, scales, per_level)
        if idx.numel()
    )
    print(
        f"{name:<44} wall: fwd {tv_f:7.1f} -> {dk_f:6.1f} ms (x{tv_f / dk_f:4.1f})  "
        f"fwd+bwd {tv_fb:7.1f} -> {dk_fb:6.1f} ms (x{tv_fb / dk_fb:4.1f})  |  "
        f"cpu: fwd {tv_fc:7.1f} -> {dk_fc:6.1f} (x{tv_fc / dk_fc:4.1f})  "
        f"fwd+bwd {tv_fbc:7.1f} -> {dk_fbc:6.1f} (x{tv_fbc / dk_fbc:4.1f})  |  "
        f"max|dout| {out_diff:.0e} rel dgrad {grad_diff:.0e} entries/loads {entries / max(loads, 1):.2f}"
    )


def train_step_case(repeats: int, image_size: int = 320, images: int = 4) -> None:
    """Mask R-CNN R18-FPN training step (random weights and targets), RoIAlign swapped in the pooler.

    Times forward + backward of the whole detector with ``detkit.models.poolers.roi_align``
    set to torchvision's and to detkit's function in turn (alternating, median of ``repeats``).
    """
    from detkit.config import load_config
    from detkit.models import poolers
    from detkit.models.build import build_detector
    from detkit.structures import Targets

    if not hasattr(poolers, "roi_align"):
        print("train step: detkit.models.poolers has no module-level roi_align to swap; skipped")
        return
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/coco/mask_rcnn_R_18_FPN_1x.yaml", [])
    torch.manual_seed(0)
    model = build_detector(cfg, 80).train()
    gen = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, image_size, image_size, generator=gen) * 255 for _ in range(images)]
    targets = []
    for _ in range(images):
        corner = torch.rand(6, 2, generator=gen) * image_size * 0.75
        boxes = torch.cat([corner, (corner + torch.rand(6, 2, generator=gen) * image_size * 0.45 + 16)], 1)
        boxes = boxes.clamp(max=image_size)
        masks = torch.zeros(6, image_size, image_size, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        targets.append(Targets(boxes=boxes, labels=torch.randint(0, 80, (6,), generator=gen), masks=masks))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        sum(model(imgs, targets).values()).backward()

    original = poolers.roi_align
    impls = (("torchvision", torchvision.ops.roi_align), ("detkit", roi_align))
    times: dict[str, list[tuple[float, float]]] = {"torchvision": [], "detkit": []}
    try:
        for label, fn in impls:  # warm-up
            poolers.roi_align = fn
            step()
        for _ in range(repeats):  # alternate, so both see the same machine load
            for label, fn in impls:
                poolers.roi_align = fn
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                times[label].append(((time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3))
    finally:
        poolers.roi_align = original
    (tv_w, tv_c), (dk_w, dk_c) = (
        tuple(statistics.median(t[i] for t in times[k]) for i in range(2)) for k in ("torchvision", "detkit")
    )
    print(
        f"{'train step Mask R-CNN R18-FPN ' + str(images) + 'x' + str(image_size) + 'px':<44} "
        f"wall: {tv_w:7.0f} -> {dk_w:6.0f} ms (x{tv_w / dk_w:4.2f})  |  cpu: {tv_c:7.0f} -> {dk_c:6.0f} ms "
        f"(x{tv_c / dk_c:4.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="only the 256-channel box and mask cases")
    parser.add_argument("--train-step", action="store_true", help="also time a Mask R-CNN R18-FPN training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.image_size
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"image {size} px, median of {args.repeats}")

    # One level: p3 (stride 8) holds boxes of 112-224 px by the FPN rule.
    p3_rois_box = make_rois(512, 2, size, 112, 224, seed=1)
    p3_rois_mask = make_rois(128, 2, size, 112, 224, seed=2)
    for channels in (256,) if args.quick else (256, 128):
        p3 = torch.randn(2, channels, size // 8, size // 8)
        for sr, aligned, style in ((0, True, "detectron2"), (2, False, "torchvision")):
            run_case(f"box  C={channels} p3 sr={sr} aligned={aligned} ({style})",
                     [p3], [1 / 8], p3_rois_box, 7, sr, aligned, args.repeats)
    p3 = torch.randn(2, 256, size // 8, size // 8)
    for sr, aligned in ((0, True), (2, False)):
        run_case(f"mask C=256 p3 sr={sr} aligned={aligned}", [p3], [1 / 8], p3_rois_mask, 14, sr, aligned, args.repeats)
    if args.train_step:
        train_step_case(args.repeats)
    if args.quick:
        return
    # Multi-level: proposals of all sizes, pooled from p2..p5 by the level rule.
    pyramid = [torch.randn(2, 256, size // s, size // s) for s in (4, 8, 16, 32)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    box_rois = make_rois(512, 2, size, 16, size, seed=3)
    mask_rois = make_rois(128, 2, size, 24, size, seed=4)
    for sr, aligned in ((0, True), (2, False)):
        run_case(f"msra box  p2-p5 sr={sr} aligned={aligned}", pyramid, scales, box_rois, 7, sr, aligned, args.repeats)
        run_case(
            f"msra mask p2-p5 sr={sr} aligned={aligned}", pyramid, scales, mask_rois, 14, sr, aligned, args.repeats
        )


if __name__ == "__main__":
    main()
