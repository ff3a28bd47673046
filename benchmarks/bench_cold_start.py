"""Cold start: wall time from interpreter start to the first detection, detkit ``Predictor`` against torchvision.

Each measurement is a fresh ``python`` subprocess (the modes alternate, the order rotating from
repetition to repetition), timed from just before the parent spawns it:

* ``torchvision``: ``import torch, torchvision``; ``fasterrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)``; ``load_state_dict(torch.load(file, weights_only=True))``; one call on
  the image (``model([img / 255])`` under ``torch.inference_mode``);
* ``detkit-fp32`` / ``detkit-bf16``: ``from detkit import Predictor``;
  ``Predictor(configs/torchvision/faster_rcnn_R_50_FPN.yaml, weights=file, precision=...)``; one call
  ``predictor(img)``.

Same weights file (``torchvision_model(0).state_dict()`` of ``bench_cpu_inference.py``: torchvision's
keys, which detkit converts), same image (the first of ``load_images``, at short side 800, read with
OpenCV in every child). Stages, each from the end of the one before: ``import`` (interpreter
start + imports), ``config`` (detkit: config, classes, transform), ``build``, ``load`` (read and
copy the weights), ``optimize`` (detkit: :func:`detkit.inference.optimize.optimize_for_inference`, BN folding
included), ``first call`` (image read included), and ``later call`` (a second call, not part of
the total). detkit's stages are measured by wrapping the functions ``Predictor.__init__`` calls.
Also printed: the child's process CPU seconds up to the first detection, and the ratio of the
medians to torchvision's.

    python benchmarks/bench_cold_start.py [--reps 3] [--modes torchvision,detkit-fp32,detkit-bf16] [--threads N]
        [--importtime]

``--importtime`` also prints the 15 slowest imports (cumulative) of ``from detkit import Predictor``
against ``import torchvision`` (``python -X importtime``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/torchvision/faster_rcnn_R_50_FPN.yaml"
MODES = ("torchvision", "detkit-fp32", "detkit-bf16")
STAGES = ("import", "config", "build", "load", "optimize", "first call")


# --------------------------------------------------------------------------- child (a fresh process)
def child(mode: str, weights: str, image_path: str) -> None:
    """Run one mode; print ``{"marks": {stage: time.time() at its end}, ...}`` as JSON."""
    marks: dict[str, float] = {}
    if mode == "torchvision":
        import cv2
        import torch
        import torchvision

        marks["import"] = time.time()
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
        marks["build"] = time.time()
        model.load_state_dict(torch.load(weights, weights_only=True))
        marks["load"] = time.time()

        def call() -> int:
            img = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
            x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
            with torch.inference_mode():
                return len(model([x])[0]["boxes"])
    else:
        sys.path.insert(0, str(ROOT))
        import cv2

        from detkit import Predictor

        marks["import"] = time.time()
        import detkit.inference.predictor as predictor_module

        def timed(stage: str, fn):
            def wrapper(*args, **kwargs):
                if stage == "build":
                    marks["config"] = time.time()  # what Predictor does before it builds
                out = fn(*args, **kwargs)
                marks[stage] = time.time()
                return out
            return wrapper

        for attr, stage in (("build_detector", "build"), ("load_initial_weights", "load")):
            setattr(predictor_module, attr, timed(stage, getattr(predictor_module, attr)))
        predictor = Predictor(CONFIG, weights=weights, precision=mode.split("-")[1])
        marks["optimize"] = time.time()  # the rest of __init__: eval, to(device), optimize_for_inference

        def call() -> int:
            img = cv2.cvtColor(cv2.imread(image_path), cv2.COLOR_BGR2RGB)
            return len(predictor(img))
    n = call()
    marks["first call"] = time.time()
    cpu_first = time.process_time()
    call()
    later = time.time() - marks["first call"]
    print(json.dumps({"marks": marks, "later": later, "cpu_first": cpu_first, "detections": n}))


# --------------------------------------------------------------------------- parent
def run_child(mode: str, weights: str, image: str, env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--weights-file", weights, "--image", image],
                          capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    stages, prev = {}, t0
    for s in STAGES:
        if s in out["marks"]:
            stages[s] = out["marks"][s] - prev
            prev = out["marks"][s]
    out["stages"], out["total"] = stages, prev - t0
    return out


def importtime(env: dict) -> None:
    for label, code in (("torchvision", "import torch, torchvision, cv2"),
                        ("detkit", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from detkit import Predictor")):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                              env=env, check=False)
        rows = []
        for ln in proc.stderr.splitlines():
            parts = ln.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                rows.append((int(parts[1]), parts[2].rstrip()))
        total = max((r[0] for r in rows), default=0)
        print(f"\n-X importtime, {label}: {total / 1e6:.2f} s in all; slowest (cumulative, s):")
        for us, name in sorted(rows, reverse=True)[:15]:
            print(f"  {us / 1e6:6.2f} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every mode (alternating)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the children (0: unset)")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.weights_file, args.image)
        return

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cv2
    import torch
    from bench_cpu_inference import load_images, torchvision_model

    from detkit.machine import machine_info

    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        weights, image = os.path.join(tmp, "weights.pth"), os.path.join(tmp, "image.png")
        torch.save(torchvision_model(0).state_dict(), weights)
        img = load_images(1, 800, 1333)[0]
        cv2.imwrite(image, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        print(f"torch {torch.__version__}, {machine_info().cpu_summary()}, children's threads "
              f"{args.threads or 'default'}; image {img.shape[1]}x{img.shape[0]}, weights "
              f"{os.path.getsize(weights) / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f}")
        for r in range(args.reps):
            shift = r % len(modes)
            for m in modes[shift:] + modes[:shift]:
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                out = run_child(m, weights, image, env)
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                out["cpu_all"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
                results[m].append(out)
                print(f"  rep {r + 1} {m:12s} {out['total']:6.2f} s to the first detection "
                      f"({out['detections']} detections), later call {out['later']:.2f} s", flush=True)
    print(f"\nmedian of {args.reps} fresh processes, s (load average now {os.getloadavg()[0]:.1f}):")
    print(f"  {'mode':12s} " + " ".join(f"{s:>10s}" for s in STAGES) + f" {'total':>7s} {'CPU s':>6s} "
          f"{'x tv':>5s} {'later':>6s}")
    tv = statistics.median(o["total"] for o in results["torchvision"]) if results.get("torchvision") else None
    for m, outs in results.items():
        med = {s: statistics.median(o["stages"].get(s, 0.0) for o in outs) for s in STAGES}
        total = statistics.median(o["total"] for o in outs)
        cpu = statistics.median(o["cpu_first"] for o in outs)
        later = statistics.median(o["later"] for o in outs)
        ratio = f"{total / tv:5.2f}" if tv else "    -"
        print(f"  {m:12s} " + " ".join(f"{med[s]:10.2f}" if any(s in o["stages"] for o in outs) else f"{'-':>10s}"
                                       for s in STAGES) + f" {total:7.2f} {cpu:6.2f} {ratio} {later:6.2f}")
    if args.importtime:
        importtime(env)


if __name__ == "__main__":
    main()
