#!/usr/bin/env python
"""Run a trained detector on an image, a folder of images or a video and draw the results.

Drawn images keep their file names (a video keeps its name and is re-encoded with
the ``mp4v`` codec); ``--save-json`` also writes the detections as a COCO results file
(``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``, ``segmentation`` RLE), which
pycocotools' ``COCO.loadRes`` / COCOeval read as is (``--coco-json`` gives the ground truth's
image ids). Everything runs through :class:`detkit.Predictor`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

EPILOG = """examples:
  # one image -> drawn/photo.jpg
  python tools/infer.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --input photo.jpg --output drawn/
  # a folder, keep detections scoring >= 0.3, also write a COCO results file
  python tools/infer.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --input my/images --output drawn/ --score-thresh 0.3 --save-json drawn/results.json
  # results for COCOeval: image ids of the ground-truth file, every detection kept
  python tools/infer.py --config runs/mine/config.yaml --weights runs/mine/checkpoints/best.pth \\
      --input my/val_images --coco-json my/val.json --score-thresh 0 --save-json results.json
  # a video on the GPU in bfloat16, with a config override
  python tools/infer.py --config runs/mine/config.yaml --weights best.pth --input clip.mp4 \\
      --output drawn/ --device cuda --precision bf16 input.min_size_test=640

--save-json records: image_id (the --coco-json file's id of the image's file name; without it, the
image's position in the sorted input, or the frame number of a video), category_id (the data's id
recorded in the config's data.category_ids by train_det.py; else, with --coco-json, that file's
category ids in sorted order when their number equals the model's classes; else label + 1),
bbox [x, y, w, h] in pixels, score, segmentation (compressed RLE, Mask R-CNN), plus file_name,
label and category_name, which COCO tools ignore.
"""

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv"}


#: exception types whose message is already a one-line instruction for the user
USER_ERRORS = ("ConfigError", "ImageReadError", "DatasetError", "CheckpointError")


class ToolError(Exception):
    """A user-facing failure; the message is one line saying what to do."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/infer.py``."""
    p = argparse.ArgumentParser(
        prog="tools/infer.py",
        description="Draw a detector's predictions on an image, a folder of images or a video.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config of the model (e.g. runs/mine/config.yaml)")
    p.add_argument("--weights", default=None, help="checkpoint or state dict (default: the config's model.weights)")
    p.add_argument("--input", required=True, help="an image file, a folder of images, or a video file")
    p.add_argument("--output", default=None, help="folder for the drawn images / video (default: none written)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--save-json", default=None, metavar="FILE",
                   help="write the detections here as a COCO results file (category_id: the config's "
                        "data.category_ids, else label + 1; see below)")
    p.add_argument("--coco-json", default=None, metavar="PATH",
                   help="COCO annotations file whose image ids (matched by file name) --save-json uses, so "
                        "the results go straight into COCOeval with it; images it does not list get no records")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="inference precision")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. input.min_size_test=640")
    return p.parse_args(argv)


def classify_input(path: Path) -> tuple[str, list[Path]]:
    """``("images", files)`` for an image or a folder (sorted, images only), ``("video", [path])``."""
    if not path.exists():
        raise ToolError(f"--input {path}: no such file or folder; pass an image, a folder of images or a video")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ToolError(f"--input {path}: folder holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        return "images", files
    ext = path.suffix.lower()
    if ext in VIDEO_EXTS:
        return "video", [path]
    if ext in IMAGE_EXTS:
        return "images", [path]
    raise ToolError(
        f"--input {path}: unknown file type {ext or '(none)'!r}; use an image ({', '.join(sorted(IMAGE_EXTS))}) "
        f"or a video ({', '.join(sorted(VIDEO_EXTS))})"
    )


def use_synthetic_class_names(cfg: Any) -> None:
    """For a config on the generated shapes set that names no classes, use the shapes' class names
    (sorted by category id, i.e. detkit's contiguous labels) so the Predictor knows them."""
    if cfg.data.synthetic is None or cfg.data.class_names or cfg.model.num_classes is not None:
        return
    if any(a and Path(a).is_file() for a in (cfg.data.train.annotations, cfg.data.val.annotations)):
        return
    from detkit.data.synthetic import SHAPE_CLASSES

    cfg.data.class_names = [name for _, name in sorted(SHAPE_CLASSES)]


def build_predictor(args: argparse.Namespace) -> Any:
    """Load the config (with overrides) and build a :class:`detkit.Predictor`."""
    from detkit.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(cfg, "task", "detection") != "detection":
        raise ToolError(f"--config {args.config}: task is {cfg.task!r}; infer.py needs a detection config")
    use_synthetic_class_names(cfg)
    if args.weights is not None and not Path(args.weights).is_file():
        raise ToolError(f"--weights {args.weights}: no such file; pass a checkpoint such as runs/x/checkpoints/best.pth")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ToolError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    from detkit import Predictor

    return Predictor(cfg, weights=args.weights, device=args.device, precision=args.precision)


def _np(x: Any) -> Optional[np.ndarray]:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().float().cpu() if x.dtype.is_floating_point else x.detach().cpu()
        x = x.numpy()
    return np.asarray(x)


def result_arrays(result: Any, score_thresh: float) -> dict[str, Optional[np.ndarray]]:
    """Predictor result -> numpy boxes/scores/labels/masks keeping scores >= ``score_thresh``."""
    scores = _np(result.scores).reshape(-1).astype(np.float32)
    keep = scores >= score_thresh
    masks = _np(result.masks)
    return {
        "boxes": _np(result.boxes).reshape(-1, 4).astype(np.float32)[keep],
        "scores": scores[keep],
        "labels": _np(result.labels).reshape(-1).astype(np.int64)[keep],
        "masks": None if masks is None else masks.astype(bool)[keep],
    }


def to_coco_records(
    det: dict[str, Optional[np.ndarray]], class_names: Sequence[str], file_name: str, image_id: int,
    frame: Optional[int] = None, category_ids: Optional[Sequence[int]] = None,
) -> list[dict]:
    """COCO results records: ``image_id``, ``category_id`` (``category_ids[label]``, or label + 1 when
    None), ``bbox`` as [x, y, w, h], ``score``, ``segmentation`` as compressed RLE (str counts);
    plus ``file_name``, ``label`` and ``category_name`` (ignored by COCO tools)."""
    import pycocotools.mask as mask_util

    records = []
    for i in range(det["boxes"].shape[0]):
        x1, y1, x2, y2 = (float(v) for v in det["boxes"][i])
        label = int(det["labels"][i])
        rec: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(category_ids[label]) if category_ids is not None else label + 1,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "score": round(float(det["scores"][i]), 5),
            "file_name": file_name,
            "label": label,
            "category_name": class_names[label] if 0 <= label < len(class_names) else str(label),
        }
        if frame is not None:
            rec["frame"] = frame
        if det["masks"] is not None:
            rle = mask_util.encode(np.asfortranarray(det["masks"][i].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            rec["segmentation"] = rle
        records.append(rec)
    return records


def read_coco_json(path: Path) -> tuple[dict[str, int], list[int]]:
    """(file name -> image id, sorted category ids) of a COCO annotations file.

    Images are matched by the base name of their ``file_name``; a base name listed twice with
    different ids is ambiguous and maps to -1."""
    if not path.is_file():
        raise ToolError(f"--coco-json {path}: no such file; pass a COCO annotations file such as instances_val2017.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ToolError(f"--coco-json {path}: not readable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ToolError(f"--coco-json {path}: no 'images' list; pass a COCO annotations file (not a results file)")
    ids: dict[str, int] = {}
    try:
        for im in data["images"]:
            name, iid = Path(str(im["file_name"])).name, int(im["id"])
            ids[name] = iid if ids.get(name, iid) == iid else -1
        cats = sorted({int(c["id"]) for c in data.get("categories") or []})
    except (KeyError, TypeError, ValueError) as e:
        raise ToolError(f"--coco-json {path}: an image or category lacks a valid {e} entry") from None
    return ids, cats


def resolve_category_ids(cfg: Any, num_classes: int, coco_cats: Optional[list[int]]) -> tuple[Optional[list[int]], str]:
    """(category id of each label or None for label + 1, a note saying where they come from)."""
    recorded = getattr(cfg.data, "category_ids", None)
    if recorded:
        if len(recorded) != num_classes:
            raise ToolError(f"the config's data.category_ids has {len(recorded)} ids but the model has {num_classes} "
                            "classes; fix or remove data.category_ids")
        if coco_cats and not set(recorded) <= set(coco_cats):
            print(f"warning: category ids {sorted(set(recorded) - set(coco_cats))[:5]} of the config's "
                  "data.category_ids are not in --coco-json's categories", file=sys.stderr)
        return [int(c) for c in recorded], "the config's data.category_ids"
    if coco_cats and len(coco_cats) == num_classes:
        return list(coco_cats), "--coco-json's categories (sorted ids)"
    return None, "label + 1 (the config records no data.category_ids)"


def image_ids_for(files: list[Path], coco_ids: Optional[dict[str, int]], coco_json: Optional[str]) -> list[Optional[int]]:
    """The image id of each input file: its --coco-json id (None when not listed), else its position."""
    if coco_ids is None:
        return list(range(len(files)))
    ids: list[Optional[int]] = []
    for f in files:
        iid = coco_ids.get(f.name)
        if iid == -1:
            raise ToolError(f"--coco-json {coco_json}: {f.name} is listed twice with different image ids")
        ids.append(iid)
    missing = [f.name for f, i in zip(files, ids) if i is None]
    if len(missing) == len(files):
        raise ToolError(f"--coco-json {coco_json}: none of the input images ({files[0].name}, ...) is listed in its "
                        "'images'; pass the annotations of these images")
    if missing:
        print(f"warning: {len(missing)} input image(s) not in --coco-json get no records (e.g. {missing[0]})",
              file=sys.stderr)
    return ids


def _write_image(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise ToolError(f"could not write {path}; check the --output folder is writable and the extension is an image type")


def run_images(
    predictor: Any, files: list[Path], out_dir: Optional[Path], score_thresh: float, records: list[dict],
    image_ids: Optional[Sequence[Optional[int]]] = None, category_ids: Optional[Sequence[int]] = None,
) -> tuple[int, list[str]]:
    """Predict and draw each image. Unreadable files are skipped (warned) when there are several.
    ``image_ids[i]`` is the records' image id of ``files[i]`` (None: no records; default: ``i``).

    Returns (number processed, skipped file messages)."""
    from detkit.data.images import read_image
    from detkit.visualization import draw_detections

    names = list(predictor.class_names)
    done, skipped = 0, []
    for idx, f in enumerate(files):
        try:
            image = read_image(f)
        except OSError as e:  # corrupt / unreadable (ImageReadError is an OSError)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else f"cannot read image {f}"
            if len(files) == 1:
                raise ToolError(msg + "; check the file is a valid image") from None
            print(f"warning: skipping {msg}", file=sys.stderr)
            skipped.append(msg)
            continue
        det = result_arrays(predictor(image), score_thresh)
        image_id = idx if image_ids is None else image_ids[idx]
        if image_id is not None:
            records.extend(to_coco_records(det, names, f.name, image_id, category_ids=category_ids))
        if out_dir is not None:
            drawn = draw_detections(image, det["boxes"], det["labels"], det["scores"], det["masks"], names, score_thresh)
            _write_image(out_dir / f.name, drawn)
        print(f"{f.name}: {det['boxes'].shape[0]} detections")
        done += 1
    return done, skipped


def run_video(predictor: Any, path: Path, out_dir: Optional[Path], score_thresh: float, records: list[dict],
              category_ids: Optional[Sequence[int]] = None) -> int:
    """Predict and draw every frame of a video; writes ``out_dir/<name>`` (mp4v); records' image id
    is the frame number. Returns frames done."""
    import cv2

    from detkit.visualization import draw_detections

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ToolError(f"--input {path}: OpenCV cannot open this video; re-encode it (e.g. ffmpeg -i in out.mp4)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    fps = fps if 0 < fps < 1000 else 25.0
    names = list(predictor.class_names)
    writer = None
    n = 0
    t0 = time.perf_counter()
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            det = result_arrays(predictor(rgb), score_thresh)
            records.extend(to_coco_records(det, names, path.name, n, frame=n, category_ids=category_ids))
            if out_dir is not None:
                if writer is None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    h, w = rgb.shape[:2]
                    writer = cv2.VideoWriter(str(out_dir / path.name), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                    if not writer.isOpened():
                        raise ToolError(f"cannot write video {out_dir / path.name} with the mp4v codec; try an .mp4 name")
                drawn = draw_detections(rgb, det["boxes"], det["labels"], det["scores"], det["masks"], names, score_thresh)
                writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            n += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if n == 0:
        raise ToolError(f"--input {path}: no frames could be decoded; check the video file")
    dt = time.perf_counter() - t0
    print(f"{path.name}: {n} frames, {n / max(dt, 1e-9):.2f} frames/s")
    return n


def run(args: argparse.Namespace) -> int:
    """Run inference as described by ``args``; returns the exit code."""
    kind, files = classify_input(Path(args.input))
    if args.output and Path(args.output).resolve() in {f.parent.resolve() for f in files}:
        raise ToolError(f"--output {args.output} is the input's folder; drawn files would overwrite the originals, "
                        "choose another folder")
    if kind == "images" and len(files) == 1:  # fail on an unreadable image before loading the model
        from detkit.data.images import read_image

        try:
            read_image(files[0])
        except OSError as e:
            raise ToolError(f"{e}; check the file is a valid image") from None
    coco_ids, coco_cats = None, None
    if args.coco_json is not None:
        if kind == "video":
            raise ToolError("--coco-json maps image file names to image ids; it does not apply to a video --input")
        coco_ids, coco_cats = read_coco_json(Path(args.coco_json))
    image_ids = image_ids_for(files, coco_ids, args.coco_json) if kind == "images" else None
    predictor = build_predictor(args)
    category_ids, source = resolve_category_ids(predictor.cfg, len(predictor.class_names), coco_cats)
    if args.save_json:
        print(f"category_id of the records: {source}", file=sys.stderr)
    if args.output is None and args.save_json is None:
        print("note: neither --output nor --save-json given; only printing detection counts", file=sys.stderr)
    out_dir = Path(args.output) if args.output else None
    records: list[dict] = []
    skipped: list[str] = []
    if kind == "video":
        run_video(predictor, files[0], out_dir, args.score_thresh, records, category_ids)
    else:
        done, skipped = run_images(predictor, files, out_dir, args.score_thresh, records, image_ids, category_ids)
        if done == 0:
            raise ToolError(f"--input {args.input}: none of the {len(files)} images could be read")
    if args.save_json:
        jp = Path(args.save_json)
        jp.parent.mkdir(parents=True, exist_ok=True)
        tmp = jp.with_suffix(jp.suffix + ".tmp")
        tmp.write_text(json.dumps(records), encoding="utf-8")
        os.replace(tmp, jp)
        print(f"wrote {len(records)} detections to {jp}")
    if out_dir is not None:
        print(f"drawn output in {out_dir}")
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s)", file=sys.stderr)
    return 0


def error_line(e: BaseException) -> str:
    """One line for a failure: the message of expected errors, type + message + hint otherwise."""
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, (ToolError, ValueError, OSError)) or type(e).__name__ in USER_ERRORS:
        return msg
    return f"{type(e).__name__}: {msg} (set DETKIT_DEBUG=1 for a traceback)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: one line on stderr and a non-zero exit code on failure."""
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("infer.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one actionable line
        if os.environ.get("DETKIT_DEBUG"):
            raise
        print(f"infer.py: error: {error_line(e)}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
