"""detkit's CPU inference against the deployment runtimes: ONNX Runtime and OpenVINO on detkit's own ONNX export.

Runtimes (all on the same weights and images, one process, one image per call):

  detkit-fp32 / detkit-bf16   ``Predictor(config, weights, precision=...)``, detkit's default fast path.
  detkit-int8                 ``Predictor(..., precision="int8")`` (``--int8``): calibrated on as many other
                              coco128 images in the speed part, on ``data.train`` for ``--trained``.
  detkit-P-aten / -onednn     detkit at precision P with the CPU conv kernel forced (``--conv-kernels``;
                              the default picks one from the CPU's flags: ``detkit.inference.optimize.choose_conv_kernel``).
  ort-fp32                    onnxruntime ``CPUExecutionProvider`` on ``export_onnx`` of the same model.
  ov-fp32 / ov-bf16           OpenVINO (the ``[openvino]`` extra) on the same ONNX file, compiled with
                              ``INFERENCE_PRECISION_HINT`` f32 / bf16 (bf16 only where the CPU has it;
                              OpenVINO's own default on such CPUs is bf16, so an unset hint is not fp32).
  ov-default                  OpenVINO compiled with no settings at all (no precision, thread or
                              performance hint): what a user who calls ``compile_model(model, "CPU")`` gets.

The exported graph is the detector's own ``predict`` (see :mod:`detkit.export`), fed the image the
Predictor's test transform produces; its boxes are scaled back to the input image like the
Predictor's. Thread counts are the same for every runtime (``--threads``, default all usable CPUs).

Two parts:

* **speed**: Faster R-CNN R50-FPN (``configs/torchvision/faster_rcnn_R_50_FPN.yaml``) with the
  calibrated random weights of ``bench_cpu_inference.py`` (tens of detections per image), coco128
  images at 800 px. Each image goes through every runtime in turn (the order rotates), after
  warm-up; printed: s/img (mean, median, process CPU), the ratio to detkit-bf16, detections
  matched to detkit-fp32 (same label, box IoU >= 0.99), and peak RSS of each runtime in a fresh
  subprocess (``--rss``: VmHWM after loading, and of inference alone after resetting it).
* **accuracy** (``--trained CONFIG WEIGHTS``, repeatable): a trained model on its own validation
  split (``data.val`` of the config): bbox AP of every runtime against the real annotations, the
  difference to detkit-fp32, and s/img on those images.

    python benchmarks/bench_runtimes.py [--images 4] [--repeats 2] [--threads N] [--rss] [--int8]
        [--runtimes detkit-fp32,detkit-bf16,ort-fp32,ov-fp32,ov-bf16,ov-default]
        [--trained output/demo/config.yaml output/demo/checkpoints/last.pth [--ap-images 50]]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_inference as cpu_bench  # noqa: E402  (models, images and matching of the CPU benchmark)

from detkit import Predictor  # noqa: E402
from detkit.config import load_config  # noqa: E402
from detkit.export import export_onnx  # noqa: E402
from detkit.machine import bf16_supported, cpu_flags, cpu_model_name, cpu_speed_flags  # noqa: E402

ALL_RUNTIMES = ("detkit-fp32", "detkit-bf16", "detkit-int8", "ort-fp32", "ov-fp32", "ov-bf16", "ov-default",
                "detkit-fp32-aten", "detkit-bf16-aten", "detkit-fp32-onednn", "detkit-bf16-onednn")


class Det(NamedTuple):
    """Detections of one image in that image's pixels."""

    boxes: torch.Tensor  # float32 [N, 4] xyxy
    scores: torch.Tensor  # float32 [N]
    labels: torch.Tensor  # int64 [N], contiguous labels 0..K-1


Runner = Callable[[np.ndarray], Det]


# --------------------------------------------------------------------------- runtimes
def detkit_runner(predictor: Predictor) -> Runner:
    def run(img: np.ndarray) -> Det:
        p = predictor(img)
        return Det(torch.from_numpy(p.boxes), torch.from_numpy(p.scores), torch.from_numpy(p.labels))

    return run


def onnx_runner(predictor: Predictor, call: Callable[[np.ndarray], list[np.ndarray]]) -> Runner:
    """Resize like ``predictor``, run the exported graph, scale the boxes back to the input image."""

    def run(img: np.ndarray) -> Det:
        resized = predictor.transform(img).image  # (H', W', 3) uint8
        x = np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)  # (3, H', W') 0..255
        boxes, scores, labels = (np.asarray(o) for o in call(x)[:3])
        scale = np.array([img.shape[1] / resized.shape[1], img.shape[0] / resized.shape[0]] * 2, dtype=np.float32)
        return Det(torch.from_numpy(boxes * scale), torch.from_numpy(scores.astype(np.float32)),
                   torch.from_numpy(labels.astype(np.int64)))

    return run


def onnxruntime_call(onnx_path: Path, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def openvino_call(onnx_path: Path, threads: int, precision: str) -> Callable[[np.ndarray], list[np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    settings = {} if precision == "default" else {  # "default": OpenVINO's own choices, as a user gets them
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", settings)
    request = compiled.create_infer_request()

    def call(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer([x])
        return [result[out] for out in compiled.outputs]

    return call


def available_runtimes(requested: list[str]) -> list[str]:
    """``requested`` minus those this machine / install cannot run (each said once)."""
    out = []
    for name in requested:
        why = None
        if name.startswith("detkit-bf16") and not bf16_supported("cpu"):
            why = "this CPU has no native bf16"
        elif name == "ov-bf16" and not bf16_supported("cpu"):
            why = "this CPU has no native bf16"
        elif name.startswith("ort-") and not _importable("onnxruntime"):
            why = "onnxruntime is not installed (pip install onnxruntime)"
        elif name.startswith("ov-") and not _importable("openvino"):
            why = "OpenVINO is not installed (pip install -e '.[openvino]')"
        if why:
            print(f"({name} skipped: {why})")
        else:
            out.append(name)
    return out


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def _conv_kernel(kernel: str):
    """``DETKIT_CONV_KERNEL=kernel`` while a Predictor is built (the kernel is chosen when it optimizes)."""
    old = os.environ.get("DETKIT_CONV_KERNEL")
    if kernel:
        os.environ["DETKIT_CONV_KERNEL"] = kernel
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DETKIT_CONV_KERNEL", None)
        else:
            os.environ["DETKIT_CONV_KERNEL"] = old


class Runtimes(NamedTuple):
    runners: dict[str, Runner]
    setup_s: dict[str, float]  # build / load / optimize (detkit), compile (OpenVINO), session (ORT)
    export_s: float


def build_runtimes(names: list[str], config: Path, weights, sample: np.ndarray, threads: int,
                   workdir: Path, calibration: Optional[list[np.ndarray]] = None) -> Runtimes:
    """Every runtime in ``names`` on ``config`` + ``weights``; the ONNX file is exported once from detkit fp32.

    ``calibration``: the images detkit-int8 calibrates on (default: the config's ``data.train``)."""
    runners: dict[str, Runner] = {}
    setup: dict[str, float] = {}
    t0 = time.perf_counter()
    fp32 = Predictor(config, weights=weights, precision="fp32")
    setup["detkit-fp32"] = time.perf_counter() - t0
    if "detkit-fp32" in names:
        runners["detkit-fp32"] = detkit_runner(fp32)
    for name in names:
        if name.startswith("detkit-") and name != "detkit-fp32":
            _, precision, *kernel = name.split("-")
            t0 = time.perf_counter()
            extra = {"calibration": calibration} if precision == "int8" and calibration else {}
            with _conv_kernel(kernel[0] if kernel else ""):
                runners[name] = detkit_runner(Predictor(config, weights=weights, precision=precision, **extra))
            setup[name] = time.perf_counter() - t0
    export_s = 0.0
    onnx_path = workdir / "model.onnx"
    if any(n.startswith(("ort-", "ov-")) for n in names):
        plain = Predictor(config, weights=weights, precision="fp32", optimize=False, fold_bn=False).model
        resized = fp32.transform(sample).image
        t0 = time.perf_counter()
        export_onnx(plain, onnx_path, torch.from_numpy(resized.transpose(2, 0, 1).copy()).float())
        export_s = time.perf_counter() - t0
        del plain
    for name in names:
        if name.startswith(("ort-", "ov-")):
            t0 = time.perf_counter()
            call = onnxruntime_call(onnx_path, threads) if name.startswith("ort-") else \
                openvino_call(onnx_path, threads, name.split("-")[1])
            runners[name] = onnx_runner(fp32, call)
            setup[name] = time.perf_counter() - t0
    return Runtimes({n: runners[n] for n in names if n in runners}, setup, export_s)


# --------------------------------------------------------------------------- timing
class Timing(NamedTuple):
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    outputs: dict[str, list[Det]]  # first round, per image


def time_runtimes(runners: dict[str, Runner], images: list[np.ndarray], repeats: int) -> Timing:
    names = list(runners)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    outs: dict[str, list[Det]] = {k: [] for k in names}
    for k in names:  # warm-up on every image: first-call allocations, OpenVINO's shape inference, oneDNN
        for img in images:  # primitive caches, int8's compile of each padded size
            runners[k](img)
    for r in range(repeats):
        for i, img in enumerate(images):
            shift = (i + r) % len(names)
            for k in names[shift:] + names[:shift]:
                t0, c0 = time.perf_counter(), time.process_time()
                det = runners[k](img)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
                if r == 0:
                    outs[k].append(det)
    return Timing(wall, cpu, outs)


def agreement(ref: list[Det], out: list[Det]) -> str:
    """Detections matched to the reference (same label, IoU >= 0.99), over all images."""
    n_ref = n_out = matched = 0
    worst_score = 0.0
    for a, b in zip(ref, out):
        c = cpu_bench.compare(tuple(a), tuple(b))
        n_ref, n_out, matched = n_ref + c["n_ref"], n_out + c["n_det"], matched + c["matched"]
        worst_score = max(worst_score, c["score_diff_max"])
    return f"{matched}/{n_ref} of fp32's ({n_out} found), max |score diff| {worst_score:.1e}"


# --------------------------------------------------------------------------- peak RSS
def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), -1)


def rss_child(name: str, weights: str, n_images: int, threads: int) -> None:
    """Build one runtime in this fresh process, run the images, print its RSS figures as JSON."""
    images = cpu_bench.load_images(2 * n_images, 800, 1333)
    images, calibration = images[:n_images], images[n_images:]
    with tempfile.TemporaryDirectory() as tmp:
        runtime = build_runtimes([name], cpu_bench.CONFIG, weights, images[0], threads, Path(tmp), calibration)
        loaded, load_peak = _status_kb("VmRSS"), _status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # reset VmHWM: the next peak is inference only
        for img in [images[0]] + images:
            runtime.runners[name](img)
    print(json.dumps({"runtime": name, "loaded_mb": loaded / 1024, "inference_peak_mb": _status_kb("VmHWM") / 1024,
                      "lifetime_peak_mb": max(load_peak, _status_kb("VmHWM")) / 1024}))


def measure_rss(names: list[str], weights: str, args: argparse.Namespace) -> None:
    print("\nPeak RSS, MB (each runtime alone in a fresh process; export/build memory included in 'lifetime'):")
    print(f"{'runtime':<18} {'after load':>10} {'inference':>10} {'lifetime':>10}")
    for name in names:
        cmd = [sys.executable, __file__, "--rss-child", name, "--weights-file", weights,
               "--images", str(args.images), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        if res.returncode != 0 or not line:
            print(f"{name:<18} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        row = json.loads(line[-1])
        print(f"{name:<18} {row['loaded_mb']:>10.0f} {row['inference_peak_mb']:>10.0f} {row['lifetime_peak_mb']:>10.0f}")


# --------------------------------------------------------------------------- accuracy on a trained model
def val_images(cfg, limit: int) -> tuple[Path, list[dict]]:
    split = cfg.data.val
    if split is None or not split.annotations:
        raise SystemExit("bench_runtimes: --trained needs a config with data.val (annotations and images)")
    with open(split.annotations, encoding="utf-8") as f:
        infos = sorted(json.load(f)["images"], key=lambda im: im["id"])
    return Path(split.annotations), infos[:limit] if limit > 0 else infos


def bbox_ap(ann_file: Path, infos: list[dict], results: list[dict]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = [im["id"] for im in infos]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return 100.0 * float(ev.stats[0])


def accuracy(config: Path, weights: Path, names: list[str], args: argparse.Namespace) -> None:
    import cv2

    cfg = load_config(config)
    ann_file, infos = val_images(cfg, args.ap_images)
    image_dir = Path(cfg.data.val.images)
    images = [cv2.cvtColor(cv2.imread(str(image_dir / im["file_name"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for im in infos]
    with tempfile.TemporaryDirectory() as tmp:
        runtime = build_runtimes(names, config, str(weights), images[0], args.threads, Path(tmp))
        timing = time_runtimes(runtime.runners, images, repeats=1)
    classes = Predictor(config, weights=str(weights), precision="fp32", optimize=False).classes
    cat = classes.category_ids or list(range(1, classes.num_classes + 1))
    print(f"\nAccuracy: {config} + {weights}, {len(images)} images of data.val ({ann_file})")
    print("(s/img: ort-/ov- rows exclude mask pasting, which the Predictor rows include)")
    print(f"{'runtime':<18} {'bbox AP':>8} {'vs fp32':>8} {'s/img':>7}  detections vs detkit-fp32")
    base = None
    for name in runtime.runners:
        results = [{"image_id": info["id"], "category_id": cat[int(lab)], "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                   for info, det in zip(infos, timing.outputs[name])
                   for b, s, lab in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())]
        ap = bbox_ap(ann_file, infos, results)
        base = ap if name == "detkit-fp32" else base
        diff = f"{ap - base:+8.2f}" if base is not None else f"{'':>8}"
        ref = timing.outputs.get("detkit-fp32")
        agree = agreement(ref, timing.outputs[name]) if ref is not None else ""
        print(f"{name:<18} {ap:>8.2f} {diff} {statistics.mean(timing.wall[name]):>7.3f}  {agree}")


# --------------------------------------------------------------------------- main
def speed(names: list[str], args: argparse.Namespace, weights_file: str) -> None:
    images = cpu_bench.load_images(2 * args.images, 800, 1333)  # the second half: int8 calibration
    images, calibration = images[: args.images], images[args.images :]
    with tempfile.TemporaryDirectory() as tmp:
        runtime = build_runtimes(names, cpu_bench.CONFIG, weights_file, images[0], args.threads, Path(tmp),
                                 calibration)
        timing = time_runtimes(runtime.runners, images, args.repeats)
    print(f"\nSpeed: Faster R-CNN R50-FPN ({cpu_bench.CONFIG.name}, calibrated random weights), "
          f"{len(images)} coco128 images at 800 px x {args.repeats} rounds, {args.threads} threads")
    if runtime.export_s:
        print(f"ONNX export (once, detkit fp32 model, torch.jit.trace + torch.onnx): {runtime.export_s:.1f} s")
    ref_name = "detkit-bf16" if "detkit-bf16" in timing.wall else next(iter(timing.wall))
    ref_mean = statistics.mean(timing.wall[ref_name])
    print(f"{'runtime':<18} {'s/img':>7} {'median':>7} {'CPU s':>7} {'/' + ref_name:>13} {'setup s':>8}  "
          "detections vs detkit-fp32")
    for name, wall in timing.wall.items():
        ref = timing.outputs.get("detkit-fp32")
        agree = agreement(ref, timing.outputs[name]) if ref is not None else ""
        print(f"{name:<18} {statistics.mean(wall):>7.3f} {statistics.median(wall):>7.3f} "
              f"{statistics.mean(timing.cpu[name]):>7.2f} {statistics.mean(wall) / ref_mean:>12.2f}x "
              f"{runtime.setup_s.get(name, 0.0):>8.1f}  {agree}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4, help="coco128 images in the speed part (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds over the images (default 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for every runtime")
    p.add_argument("--runtimes", default="detkit-fp32,detkit-bf16,ort-fp32,ov-fp32,ov-bf16,ov-default",
                   help=f"comma-separated subset of {', '.join(ALL_RUNTIMES)}")
    p.add_argument("--int8", action="store_true", help="add detkit-int8 (Predictor precision='int8')")
    p.add_argument("--conv-kernels", action="store_true",
                   help="add detkit fp32/bf16 with each CPU conv kernel forced (detkit.inference.optimize.choose_conv_kernel)")
    p.add_argument("--rss", action="store_true", help="peak RSS of each runtime in a fresh subprocess")
    p.add_argument("--skip-speed", action="store_true", help="only the --trained accuracy part")
    p.add_argument("--trained", nargs=2, action="append", default=[], metavar=("CONFIG", "WEIGHTS"),
                   help="a trained model: bbox AP of every runtime on its data.val (repeatable)")
    p.add_argument("--ap-images", type=int, default=0, help="at most this many val images (default: all)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--weights-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.weights_file, args.images, args.threads)
        return
    requested = [n.strip() for n in args.runtimes.split(",") if n.strip()] + (["detkit-int8"] * args.int8)
    if args.conv_kernels:
        requested += [f"detkit-{p}-{k}" for p in ("fp32", "bf16") for k in ("aten", "onednn")]
    unknown = sorted(set(requested) - set(ALL_RUNTIMES))
    if unknown:
        raise SystemExit(f"bench_runtimes: unknown runtime(s) {unknown}; choose from {', '.join(ALL_RUNTIMES)}")
    names = available_runtimes(list(dict.fromkeys(requested)))
    flags = cpu_flags()
    print(f"CPU: {cpu_model_name()}; speed flags: {' '.join(cpu_speed_flags()) or '-'}; "
          f"bf16 {'avx512_bf16' in flags}, AMX {'amx_bf16' in flags}/{'amx_int8' in flags} (bf16/int8), "
          f"VNNI {'avx512_vnni' in flags or 'avx_vnni' in flags}; torch {torch.__version__}, "
          f"{args.threads} threads")
    versions = []
    for mod in ("onnxruntime", "openvino"):
        if _importable(mod):
            versions.append(f"{mod} {__import__(mod).__version__}")
    print("Runtimes: " + ", ".join(versions or ["detkit only"]))
    if not args.skip_speed:
        with tempfile.TemporaryDirectory() as tmp:
            weights_file = str(Path(tmp) / "r50.pth")
            torch.save(cpu_bench.torchvision_model(0).state_dict(), weights_file)
            speed(names, args, weights_file)
            if args.rss:
                measure_rss(names, weights_file, args)
    for config, weights in args.trained:
        accuracy(Path(config), Path(weights), names, args)


if __name__ == "__main__":
    main()
