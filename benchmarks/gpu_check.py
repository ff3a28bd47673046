"""GPU check: detkit's CUDA path against torchvision on one machine, in about 5 minutes on one GPU.

    python benchmarks/gpu_check.py                    # the GPU machine (CUDA), coco128 if present
    python benchmarks/gpu_check.py --device cpu --quick   # a smoke run of the script itself on a CPU

Checks, each printing PASS/FAIL, its figures, and (for speed) torchvision's on the same device:

1. **Training**: 50 iterations of Mask R-CNN R50-FPN, torchvision and detkit from the same weights
   (a random ResNet-50 whose FrozenBN statistics are calibrated on a real batch, as in
   ``bench_train.py``) on the same batches, with fp16 autocast and a GradScaler, and with bf16
   autocast where the GPU has it. Passes when every loss is finite, no fp16 step was skipped after
   the first ten, and the mean loss of the last ten iterations is within 25 % of torchvision's.
   Prints s/iter and img/s of each.
2. **Predictor** fp32 / fp16 / bf16 against torchvision fp32 on the same random weights
   (``tests/torchvision_reference.py``), on coco128 images at short side 800: the share of
   torchvision's detections that detkit finds (same label, box IoU >= 0.9; fp32 must find >= 99 %,
   fp16 / bf16 >= 80 %), and img/s of each against torchvision fp32 and fp16 autocast.
3. **Training and evaluation through the tools**: ``tools/train_det.py`` on the shapes demo config
   (``--train-iters``, ``train.amp=auto``), on 2 GPUs through ``torchrun`` (NCCL DDP) when there are 2;
   then ``tools/eval_det.py`` of its checkpoint on the GPU at ``test.batch_size`` 1 and 4, and on the
   CPU. Passes when training finishes, its AP is above 0, and the three evaluations agree within
   0.1 AP.

Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import bench_train as bt  # noqa: E402
from detkit import Predictor  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.machine import bf16_supported  # noqa: E402
from torchvision_reference import randomize_for_detections  # noqa: E402

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def half_precisions(device: torch.device, inference: bool = False) -> list[str]:
    """fp16 (on a CPU only as a smoke run of training: the Predictor runs fp16 on GPUs) and native bf16."""
    fp16 = [] if inference and device.type != "cuda" else ["fp16"]
    return fp16 + (["bf16"] if bf16_supported(device) else [])


# --------------------------------------------------------------------------- 1. training
def train_run(kind: str, state: dict, batches: list, amp: str, args: argparse.Namespace) -> tuple[list[float], float, int]:
    """(total losses, median s/iter after 5 warm-up iterations, fp16 steps skipped after the tenth)."""
    device = torch.device(args.device)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    if kind == "torchvision":
        model = bt.torchvision_mask_rcnn(args.size)
        model.load_state_dict(state)
    else:
        model = bt.detkit_from(state)
    model.to(device).train()
    opt = bt.sgd(model, args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    lr_at = bt.warmup_lr(args.lr, 10)
    losses, times, skipped = [], [], 0
    for it in range(args.iters):
        b = [(im.to(device), t.to(device)) for im, t in batches[it % len(batches)]]
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            out = model(*bt.tv_inputs(b)) if kind == "torchvision" else model([im for im, _ in b], [t for _, t in b])
        total = sum(out.values())
        opt.zero_grad(set_to_none=True)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        sync(device)
        times.append(time.perf_counter() - t0)
        skipped += int(it >= 10 and scaler.is_enabled() and scaler.get_scale() < scale)
        losses.append(float(total.detach()))
    return losses, statistics.median(times[5:]), skipped


def check_training(args: argparse.Namespace) -> None:
    batches, source = bt.load_batches(args.num_batches, args.batch, args.size)
    torch.manual_seed(0)
    tv = bt.torchvision_mask_rcnn(args.size)
    bt.calibrate_frozen_bn(tv, bt.tv_inputs(batches[0])[0])
    state = {k: v.clone() for k, v in tv.state_dict().items()}
    for amp in half_precisions(torch.device(args.device)):
        runs = {kind: train_run(kind, state, batches, amp, args) for kind in ("torchvision", "detkit")}
        (tv_loss, tv_s, _), (dk_loss, dk_s, skipped) = runs["torchvision"], runs["detkit"]
        finite = all(v == v and abs(v) != float("inf") for v in tv_loss + dk_loss)
        tail_tv, tail_dk = statistics.fmean(tv_loss[-10:]), statistics.fmean(dk_loss[-10:])
        close = abs(tail_dk - tail_tv) <= 0.25 * abs(tail_tv)
        report(f"train {amp}", finite and skipped == 0 and close,
               f"{args.iters} iters, batch {args.batch} at {args.size} px ({source}): torchvision {tv_s:.3f} s/iter "
               f"({args.batch / tv_s:.1f} img/s), detkit {dk_s:.3f} s/iter ({args.batch / dk_s:.1f} img/s), "
               f"{tv_s / dk_s:.2f}x; last-10 mean loss {tail_tv:.3f} / {tail_dk:.3f}; fp16 steps skipped {skipped}")


# --------------------------------------------------------------------------- 2. Predictor
def found_share(ref: dict, pred, iou_min: float = 0.9) -> float:
    """Share of torchvision's detections (label = detkit label + 1) with a detkit box of IoU >= iou_min."""
    from torchvision.ops import box_iou

    if len(ref["boxes"]) == 0:
        return 1.0
    if len(pred) == 0:
        return 0.0
    iou = box_iou(ref["boxes"].float().cpu(), torch.from_numpy(pred.boxes))
    iou[ref["labels"].cpu()[:, None] != torch.from_numpy(pred.labels + 1)[None, :]] = 0
    return float((iou.max(dim=1).values >= iou_min).float().mean())


def timed(fn, items: list, device: torch.device) -> tuple[list, float]:
    """Outputs of ``fn`` on every item, and img/s over all but the first (warm-up) item."""
    outs, times = [], []
    for x in items:
        sync(device)
        t0 = time.perf_counter()
        outs.append(fn(x))
        sync(device)
        times.append(time.perf_counter() - t0)
    return outs, (len(times) - 1) / sum(times[1:])


def check_predictor(args: argparse.Namespace) -> None:
    import cv2
    import torchvision

    device = torch.device(args.device)
    folder = bt.COCO128 / "images"
    names = sorted(os.listdir(folder))[: args.images] if folder.is_dir() else []
    images = []
    for name in names:  # RGB at torchvision's test size, so neither side resizes (again)
        bgr = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        s = min(args.test_size / min(bgr.shape[:2]), args.test_size * 5 / 3 / max(bgr.shape[:2]))
        bgr = cv2.resize(bgr, (round(bgr.shape[1] * s), round(bgr.shape[0] * s)), interpolation=cv2.INTER_LINEAR)
        images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not images:
        from torchvision_reference import synthetic_image

        images = [synthetic_image(args.test_size, args.test_size * 4 // 3, k).permute(1, 2, 0).numpy() for k in range(4)]
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    randomize_for_detections(tv, seed=0)
    tv.to(device)
    weights = Path(tempfile.mkdtemp()) / "tv_random.pth"
    torch.save(tv.state_dict(), weights)

    def tv_fn(im, dtype=None):
        x = torch.from_numpy(im).permute(2, 0, 1).to(device).float() / 255
        tv.transform.min_size, tv.transform.max_size = (min(im.shape[:2]),), max(im.shape[:2])
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float16, enabled=dtype is not None):
            return tv([x])[0]

    ref, tv_ips = timed(tv_fn, images, device)
    # torchvision under fp16 autocast, for speed (on a CPU, fp16 is emulated: minutes per image, so skipped)
    tv16_ips = timed(lambda im: tv_fn(im, torch.float16), images, device)[1] if device.type == "cuda" else float("nan")
    cfg = load_config(ROOT / "configs" / "torchvision" / "mask_rcnn_R_50_FPN.yaml",
                      [f"input.min_size_test={args.test_size}", f"input.max_size_test={args.test_size * 5 // 3}"])
    for precision in ["fp32"] + half_precisions(device, inference=True):
        pred = Predictor(cfg, weights=weights, device=device, precision=precision)
        outs, ips = timed(pred, images, device)
        share = min(found_share(r, o) for r, o in zip(ref, outs))
        need = 0.99 if precision == "fp32" else 0.8
        n_ref = sum(len(r["boxes"]) for r in ref)
        report(f"predictor {precision}", pred.precision == precision and share >= need and n_ref > 0,
               f"{len(images)} images at short side {args.test_size}: {n_ref} torchvision detections, worst image "
               f"{100 * share:.1f} % found (need {100 * need:.0f} %); detkit {ips:.2f} img/s, torchvision fp32 "
               f"{tv_ips:.2f} / fp16 autocast {tv16_ips:.2f} img/s")


# --------------------------------------------------------------------------- 3. the tools
def run_tool(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)


def check_tools(args: argparse.Namespace, out: Path) -> None:
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    launch = ["torchrun", "--standalone", "--nproc_per_node", "2"] if gpus >= 2 else [sys.executable]
    config = "configs/demo/shapes_mask_rcnn_R_18_FPN.yaml"
    steps = [int(args.train_iters * 0.75), int(args.train_iters * 0.9)]
    t0 = time.perf_counter()
    proc = run_tool(launch + ["tools/train_det.py", "--config", config, "--output-dir", str(out / "demo"),
                              f"train.max_iters={args.train_iters}", f"train.steps=[{steps[0]},{steps[1]}]",
                              "train.amp=auto", "train.checkpoint_period=0", "dataloader.num_workers=2",
                              f"data.synthetic.root={out / 'shapes'}"])
    train_s = time.perf_counter() - t0
    metrics_file = out / "demo" / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        report("train_det" + (" (2-GPU DDP)" if gpus >= 2 else ""), False, proc.stderr[-2000:])
        return
    trained = json.loads(metrics_file.read_text())
    report("train_det" + (" (2-GPU NCCL DDP)" if gpus >= 2 else ""), trained.get("segm/AP", 0) > 0,
           f"{args.train_iters} iters in {train_s:.0f} s (with data generation and evaluation): "
           f"bbox AP {trained.get('bbox/AP', 0):.1f}, segm AP {trained.get('segm/AP', 0):.1f}")
    aps = {}
    weights = out / "demo" / "checkpoints" / "last.pth"
    for tag, batch, env in (("gpu-b1", 1, None), ("gpu-b4", 4, None), ("cpu", 1, {"CUDA_VISIBLE_DEVICES": ""})):
        if tag.startswith("gpu") and args.device != "cuda":
            continue
        proc = run_tool([sys.executable, "tools/eval_det.py", "--config", str(out / "demo" / "config.yaml"),
                         "--weights", str(weights), "--output-dir", str(out / f"eval_{tag}"),
                         f"test.batch_size={batch}"], env)
        if proc.returncode != 0:
            report(f"eval_det {tag}", False, proc.stderr[-2000:])
            continue
        m = json.loads((out / f"eval_{tag}" / "metrics.json").read_text())
        aps[tag] = (m["bbox/AP"], m["segm/AP"])
    spread = max(max(a[i] for a in aps.values()) - min(a[i] for a in aps.values()) for i in (0, 1)) if aps else 1.0
    report("eval_det", len(aps) >= 1 and spread <= 0.1,
           ", ".join(f"{tag}: bbox {a[0]:.2f} segm {a[1]:.2f}" for tag, a in aps.items()) + f" (spread {spread:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of this script)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs, not the figures")
    p.add_argument("--iters", type=int, default=50, help="training iterations per model and precision")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=640, help="training short side")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--num-batches", type=int, default=8)
    p.add_argument("--images", type=int, default=8, help="Predictor images")
    p.add_argument("--test-size", type=int, default=800)
    p.add_argument("--train-iters", type=int, default=600, help="tools/train_det.py iterations on the shapes demo")
    p.add_argument("--output-dir", default=str(ROOT / "output" / "gpu_check"))
    p.add_argument("--only", nargs="*", choices=["train", "predictor", "tools"], default=["train", "predictor", "tools"])
    args = p.parse_args()
    if args.quick:
        args.iters, args.size, args.num_batches, args.batch = 12, 128, 2, 1
        args.images, args.test_size, args.train_iters = 2, 320, 40
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (run it where a GPU is lent, or --device cpu --quick)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, {torch.cuda.device_count() if args.device == 'cuda' else 0} "
          f"GPU(s), half precisions {half_precisions(torch.device(args.device))}", flush=True)
    t0 = time.perf_counter()
    if "train" in args.only:
        check_training(args)
    if "predictor" in args.only:
        check_predictor(args)
    if "tools" in args.only:
        check_tools(args, Path(args.output_dir))
    print(f"gpu_check: {len(FAILURES)} failed {FAILURES} in {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
