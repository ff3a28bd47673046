"""Wall-clock figures that used to be asserted in tests: a Mask R-CNN R18-FPN training step and the
generation of the default synthetic shapes dataset.

  step:      forward + backward of Mask R-CNN R18-FPN at the default head widths (FPN 256 channels,
             box head fc 1024, mask head conv 256; BN backbone trained from scratch, 3 classes) on one
             256 x 256 image with two rectangles, the model of
             tests/test_detector.py::test_mask_rcnn_r18_256px_default_widths_forward_backward.
             The first (cold) step and the median / min of ``--repeats`` further steps.
  shapes:    ``make_shapes_coco`` with its defaults (400 train + 50 val images of 256 px, the README's
             demo data) into an empty temporary folder, as tests/test_synthetic.py::test_default_size.

For each, wall time and process CPU time (summed over threads), and the ratio to the 20 s budget the
tests used to assert (below 1.0: within it).

    python benchmarks/bench_step_time.py [--threads 1] [--repeats 5] [--skip-shapes]

On a machine shared with other busy processes the wall times vary; the CPU times are steadier.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from detkit.config import DetectionConfig
from detkit.data.synthetic import make_shapes_coco
from detkit.models.build import build_detector
from detkit.structures import Targets

OLD_BUDGET_S = 20.0  # what tests/test_detector.py and tests/test_synthetic.py asserted


def step_model() -> torch.nn.Module:
    cfg = DetectionConfig()
    m = cfg.model
    m.meta_architecture = "mask_rcnn"
    m.backbone.name, m.backbone.norm, m.backbone.freeze_at = "resnet18", "BN", 0
    m.fpn.out_channels = 256
    m.anchors.sizes = [[16], [32], [64], [128], [256]]
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 500, 200
    m.roi_heads.batch_size_per_image = 64
    m.roi_heads.box_head.fc_dim = 1024
    m.roi_heads.mask_head.conv_dim = 256
    torch.manual_seed(0)
    return build_detector(cfg, num_classes=3).train()


def scene(size: int = 256, seed: int = 6) -> tuple[torch.Tensor, Targets]:
    """A gray image with 2 colored rectangles, their boxes, labels and masks."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, size, size), 40, dtype=torch.uint8)
    boxes, masks = [], []
    for k in range(2):
        x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(24, size // 2, (2,), generator=g))
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.tensor([220, 60, 60] if k == 0 else [60, 60, 220], dtype=torch.uint8)[:, None, None]
        mask = torch.zeros(size, size, dtype=torch.uint8)
        mask[y0 : y0 + h, x0 : x0 + w] = 1
        boxes.append([x0, y0, x0 + w, y0 + h])
        masks.append(mask)
    masks[0] &= 1 - masks[1]
    return img, Targets(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([0, 1]), masks=torch.stack(masks))


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bench_step(repeats: int) -> list[tuple[str, float, float]]:
    model = step_model()
    im, t = scene()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        losses = model([im], [t])
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss: {losses}")
        total.backward()

    cold = timed(step)
    warm = [timed(step) for _ in range(repeats)]
    return [
        ("step, first (cold)", *cold),
        (f"step, median of {repeats}", statistics.median(w for w, _ in warm), statistics.median(c for _, c in warm)),
        (f"step, min of {repeats}", min(w for w, _ in warm), min(c for _, c in warm)),
    ]


def bench_shapes() -> list[tuple[str, float, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = timed(lambda: make_shapes_coco(tmp))
    return [("shapes default (450 images)", wall, cpu), ("shapes, per image", wall / 450, cpu / 450)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the tests use 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps after the cold one")
    p.add_argument("--skip-shapes", action="store_true", help="only the training step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    rows = bench_step(args.repeats)
    if not args.skip_shapes:
        rows += bench_shapes()
    print(f"{'case':<30} {'wall s':>8} {'cpu s':>8} {'wall / old 20 s budget':>24}")
    for name, wall, cpu in rows:
        ratio = f"{wall / OLD_BUDGET_S:.3f}" if "per image" not in name else "-"
        print(f"{name:<30} {wall:>8.3f} {cpu:>8.3f} {ratio:>24}")


if __name__ == "__main__":
    main()
