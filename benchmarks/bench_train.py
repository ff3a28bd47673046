"""CPU training speed of Mask R-CNN R50-FPN: torchvision vs detkit, same weights, same batches.

torchvision's ``maskrcnn_resnet50_fpn`` is built as it is for fine-tuning from pretrained weights
(FrozenBN ResNet-50, trainable_backbone_layers=3), and given "pretrained-like" weights: its FrozenBN
statistics are calibrated on a real batch so every layer normalizes its input (no download). The
same state dict goes into detkit with ``configs/torchvision/mask_rcnn_R_50_FPN.yaml`` (the config
that reproduces torchvision's detections). Both then train with the same SGD settings on the same
batches: coco128 images resized to short side ``--size`` (no flip), ``--batch`` images a step, with
their real boxes, masks and labels (torchvision label = COCO category id, detkit label = id - 1).
Without coco128, generated shapes images are used.

Modes, timed step by step in turn (the order rotates each iteration, so all see the same load):
  torchvision   fp32, torchvision's ops.
  detkit-fp32   detkit in plain fp32 (``--with-fp32``).
  detkit        detkit's fastest CPU training mode: ``train.amp=auto`` (bf16 autocast where the CPU
                has native bf16, else fp32) and detkit's CPU RoIAlign.

Printed: seconds per step (median and mean, wall and process CPU), the speed-up over torchvision,
the loss curves (total loss, mean of each 10-iteration window) and their agreement, achieved
GFLOP/s (FLOPs of a step counted on torchvision's model) next to the machine's GEMM peaks, and
the peak RSS of each mode in a fresh subprocess (``--rss``).

    python benchmarks/bench_train.py [--iters 50] [--batch 2] [--size 512] [--threads N] [--lr 0.0025]
        [--warmup-iters 10]
        [--with-fp32] [--rss] [--rss-iters 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detkit import load_weights  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.engine import resolve_amp  # noqa: E402
from detkit.engine.trainer import autocast_context  # noqa: E402
from detkit.models.build import build_detector  # noqa: E402
from detkit.structures import Targets  # noqa: E402

COCO128 = ROOT.parent / "shared" / "data" / "coco128"
CONFIG = ROOT / "configs" / "torchvision" / "mask_rcnn_R_50_FPN.yaml"
Batch = list[tuple[Tensor, Targets]]  # (uint8 [3,H,W] RGB, Targets with detkit labels)


# --------------------------------------------------------------------------- data
def load_batches(num_batches: int, batch: int, size: int) -> tuple[list[Batch], str]:
    """``num_batches`` batches of (image, targets) at short side ``size``, from coco128 if present."""
    from detkit.data.coco import load_coco
    from detkit.data.coco_dataset import CocoDetection
    from detkit.data.transforms import build_detection_transform
    from detkit.config import DetectionConfig

    cfg = DetectionConfig()
    cfg.input.min_size_train, cfg.input.max_size_train, cfg.input.hflip_prob = size, size * 5 // 3, 0.0
    if (COCO128 / "annotations.json").is_file():
        data = load_coco(COCO128 / "annotations.json", COCO128 / "images", filter_empty=True, is_train=True)
        source = "coco128"
    else:
        from detkit.data.synthetic import make_shapes_coco

        paths = make_shapes_coco(ROOT / "output" / "bench_train_shapes", num_train=64, num_val=1, image_size=size)
        data = load_coco(paths["train_annotations"], paths["train_images"], filter_empty=True, is_train=True)
        source = "generated shapes (coco128 not found)"
    ds = CocoDetection(data, build_detection_transform(cfg.input, True, seed=0), with_masks=True)
    samples = []
    i = 0
    while len(samples) < num_batches * batch:
        s = ds[i % len(ds)]
        i += 1
        if s is None or len(s.targets) == 0:
            continue
        t = s.targets
        labels = torch.as_tensor([data.category_ids[int(k)] - 1 for k in t.labels], dtype=torch.int64)
        # crowd regions: torchvision has no notion of them; give neither model any
        samples.append((s.image, Targets(boxes=t.boxes, labels=labels, masks=t.masks)))
    return [samples[k * batch:(k + 1) * batch] for k in range(num_batches)], source


def tv_inputs(b: Batch) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images = [im.float() / 255.0 for im, _ in b]
    targets = [{"boxes": t.boxes, "labels": t.labels + 1, "masks": t.masks} for _, t in b]
    return images, targets


# --------------------------------------------------------------------------- models
def torchvision_mask_rcnn(size: int) -> MaskRCNN:
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    # images arrive at their training size: the transform must not resize them again
    return MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91, min_size=size, max_size=size * 5 // 3)


@torch.no_grad()
def calibrate_frozen_bn(model: MaskRCNN, images: list[Tensor], seed: int = 0) -> None:
    """Set every FrozenBN's statistics from its input on ``images`` (one pass, layer by layer), so the
    random network behaves like a pretrained one: normalized activations, nothing explodes."""
    torch.manual_seed(seed)
    handles = []

    def pre_hook(m: FrozenBatchNorm2d, inp: tuple[Tensor]) -> None:
        x = inp[0]
        m.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        m.running_var.copy_(x.var(dim=(0, 2, 3)))
        m.weight.fill_(0.5)  # keeps residual sums in range
        m.bias.zero_()

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            handles.append(m.register_forward_pre_hook(pre_hook))
    model.eval()
    model(images)
    for h in handles:
        h.remove()
    model.train()


def detkit_from(tv_state: dict[str, Tensor]) -> nn.Module:
    model = build_detector(load_config(CONFIG, []), num_classes=90)
    report = load_weights(model, tv_state)
    if report.missing or report.mismatched:
        raise RuntimeError(f"torchvision weights did not load into detkit: {report}")
    return model.train()


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                           weight_decay=1e-4)


def warmup_lr(base_lr: float, warmup: int) -> Callable[[int], float]:
    """Linear warm-up from ``base_lr / warmup`` to ``base_lr`` over the first ``warmup`` steps."""
    return lambda it: base_lr * min(1.0, (it + 1) / max(warmup, 1))


def make_step(kind: str, model: nn.Module, opt: torch.optim.Optimizer,
              lr_at: Callable[[int], float]) -> Callable[[Batch, int], dict[str, float]]:
    """One SGD step on a batch at step index ``it`` (which sets the LR); returns the float losses."""
    amp = resolve_amp("auto", torch.device("cpu")) if kind == "detkit" else "none"

    def step(b: Batch, it: int) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if kind == "torchvision":
            losses = model(*tv_inputs(b))
        else:
            with autocast_context(torch.device("cpu"), amp):
                losses = model([im for im, _ in b], [t for _, t in b])
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["total_loss"] = float(total.detach())
        if not all(map(lambda v: v == v and abs(v) != float("inf"), out.values())):
            raise SystemExit(f"{kind}: non-finite loss at step {it} ({out}); lower --lr or raise --warmup-iters")
        return out

    step.amp = amp  # type: ignore[attr-defined]
    return step


def build_modes(args: argparse.Namespace, batches: list[Batch]) -> dict[str, Callable[[Batch, int], dict[str, float]]]:
    torch.manual_seed(0)
    tv = torchvision_mask_rcnn(args.size)
    calibrate_frozen_bn(tv, tv_inputs(batches[0])[0])
    state = {k: v.clone() for k, v in tv.state_dict().items()}
    lr_at = warmup_lr(args.lr, args.warmup_iters)
    modes = {"torchvision": make_step("torchvision", tv, sgd(tv, args.lr), lr_at)}
    if args.with_fp32:
        dk32 = detkit_from(state)
        modes["detkit-fp32"] = make_step("detkit-fp32", dk32, sgd(dk32, args.lr), lr_at)
    dk = detkit_from(state)
    modes["detkit"] = make_step("detkit", dk, sgd(dk, args.lr), lr_at)
    return modes


# --------------------------------------------------------------------------- measurements
def step_flops(args: argparse.Namespace, batch: Batch) -> float:
    """FLOPs of one training step (forward + backward) of torchvision's model on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    tv = torchvision_mask_rcnn(args.size)
    calibrate_frozen_bn(tv, tv_inputs(batch)[0])
    counter = FlopCounterMode(display=False)
    with counter:
        sum(tv(*tv_inputs(batch)).values()).backward()
    return float(counter.get_total_flops())


def rss_child(args: argparse.Namespace) -> None:
    """Train one mode for ``--rss-iters`` steps in this fresh process; print its peak RSS as JSON."""
    batches, _ = load_batches(args.rss_iters, args.batch, args.size)
    torch.manual_seed(0)
    tv = torchvision_mask_rcnn(args.size)
    calibrate_frozen_bn(tv, tv_inputs(batches[0])[0])
    if args.rss_child == "torchvision":
        model = tv
    else:
        model = detkit_from({k: v.clone() for k, v in tv.state_dict().items()})
        del tv
    step = make_step(args.rss_child, model, sgd(model, args.lr), warmup_lr(args.lr, args.warmup_iters))
    for i, b in enumerate(batches):
        step(b, i)
    with open("/proc/self/status", encoding="utf-8") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"mode": args.rss_child, "peak_rss_mb": peak / 1024}))


def measure_rss(args: argparse.Namespace, modes: list[str]) -> dict[str, float]:
    out = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--rss-child", mode, "--rss-iters", str(args.rss_iters),
               "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
               "--lr", str(args.lr), "--warmup-iters", str(args.warmup_iters)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not lines:
            print(f"RSS child {mode} failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        out[mode] = json.loads(lines[-1])["peak_rss_mb"]
    return out


def window_means(values: list[float], width: int = 10) -> list[float]:
    return [statistics.fmean(values[i:i + width]) for i in range(0, len(values), width)]


def load_peaks() -> dict[str, float]:
    spec = importlib.util.spec_from_file_location("_bench_cpu_inference", ROOT / "benchmarks" / "bench_cpu_inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.gemm_peaks()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (on batch 0)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.0025,
                   help="SGD LR after warm-up (Detectron2's 0.02 at batch 16, scaled linearly to batch 2)")
    p.add_argument("--warmup-iters", type=int, default=10, help="linear LR warm-up steps")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--with-fp32", action="store_true", help="also time detkit in plain fp32")
    p.add_argument("--rss", action="store_true", help="peak RSS of each mode in a fresh subprocess")
    p.add_argument("--rss-iters", type=int, default=4)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return

    batches, source = load_batches(args.iters, args.batch, args.size)
    modes = build_modes(args, batches)
    names = list(modes)
    amp = modes["detkit"].amp  # type: ignore[attr-defined]
    print(f"Mask R-CNN R50-FPN training, batch {args.batch} at {args.size} px ({source}), SGD lr {args.lr} "
          f"(warm-up {args.warmup_iters}), "
          f"{args.iters} steps; torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{args.threads} threads; detkit mode: amp={amp}")
    for k in names:  # warm-up: first-call allocations and oneDNN primitive creation
        for _ in range(args.warmup):
            modes[k](batches[0], 0)
    # the warm-up changed the weights identically for every mode only if all saw batch 0 the same
    # number of times, which they did; timing and curves start here
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    curves: dict[str, list[float]] = {k: [] for k in names}
    for i, b in enumerate(batches):
        shift = i % len(names)
        for k in names[shift:] + names[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            losses = modes[k](b, i)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            curves[k].append(losses["total_loss"])
        if (i + 1) % 10 == 0:
            print(f"  step {i + 1}/{args.iters}: " + "  ".join(f"{k} {wall[k][-1]:.2f}s loss {curves[k][-1]:.3f}" for k in names),
                  flush=True)

    ref = statistics.median(wall["torchvision"])
    ref_cpu = statistics.median(cpu["torchvision"])
    print(f"\n{'mode':<12} {'median s/step':>13} {'mean':>7} {'cpu s':>7} {'speed-up':>9} {'cpu speed-up':>13}")
    for k in names:
        med, mc = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"{k:<12} {med:>13.2f} {statistics.fmean(wall[k]):>7.2f} {mc:>7.2f} {ref / med:>8.2f}x {ref_cpu / mc:>12.2f}x")

    print("\ntotal loss, mean of each 10-step window:")
    print(f"{'steps':<12} " + " ".join(f"{k:>12}" for k in names))
    windows = {k: window_means(curves[k]) for k in names}
    for w in range(len(windows["torchvision"])):
        print(f"{f'{w * 10 + 1}-{min((w + 1) * 10, args.iters)}':<12} " + " ".join(f"{windows[k][w]:>12.4f}" for k in names))
    # agreement: the per-step differences against the step-to-step noise of torchvision's own curve
    tv_curve = curves["torchvision"]
    noise = statistics.pstdev([b - a for a, b in zip(tv_curve, tv_curve[1:])]) / 2 ** 0.5
    for k in names[1:]:
        diff = [a - b for a, b in zip(curves[k], tv_curve)]
        print(f"{k} - torchvision: mean {statistics.fmean(diff):+.4f}, last-20 mean "
              f"{statistics.fmean(diff[-20:]):+.4f} (torchvision step-to-step noise, one sigma: {noise:.4f})")

    flops = step_flops(args, batches[0])
    peaks = load_peaks()
    print(f"\nFLOPs per step (torchvision's model, forward + backward): {flops / 1e9:.0f} GFLOP")
    for k in names:
        print(f"  {k:<12} {flops / statistics.median(wall[k]) / 1e9:7.1f} GFLOP/s achieved")
    print("  GEMM peaks here: " + ", ".join(f"{n} {v:.0f} GFLOP/s" for n, v in peaks.items()))

    if args.rss:
        rss = measure_rss(args, names)
        print(f"\npeak RSS over {args.rss_iters} training steps, fresh process each (VmHWM):")
        for k, mb in rss.items():
            ratio = f"  ({mb / rss['torchvision']:.2f}x torchvision)" if "torchvision" in rss else ""
            print(f"  {k:<12} {mb:8.0f} MB{ratio}")


if __name__ == "__main__":
    main()
