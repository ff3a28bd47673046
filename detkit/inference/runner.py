"""Run a :class:`~detkit.inference.predictor.Predictor` on an image, a folder of images or a video: what
``tools/infer.py`` does.

:func:`run_inference` lists the input and resolves the records' image and category ids (the
helpers of :mod:`detkit.inference.inputs`, re-exported here), predicts, draws each image or frame into the
output folder and writes the detections as a COCO results file (:func:`prediction_records`, one
record per detection, via :func:`detkit.evaluation.detections_to_coco`). Images go to the model
``test.batch_size`` (``--batch-size``) at a time, read ahead on a thread; everything written per
image is the same at any batch size. Progress lines go to stdout, warnings (``warning: ...``) to
stderr; bad input raises a :class:`~detkit.errors.DetkitError`.

With ``--save-json``, each finished image is appended to a part file (:mod:`detkit.inference.parts`),
which ``--resume`` continues; the results file is merged from the parts in input order. Under
``torchrun`` (``WORLD_SIZE`` > 1) each process joins the process group (Gloo on CPU; NCCL on the
``LOCAL_RANK`` GPU with ``--device cuda``), predicts and draws its share of the images not done yet,
and rank 0 merges; the records (image ids included) are those of one process. A video is refused there.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import is_weights_name
from ..config import config_to_dict, load_detection_config
from ..data.images import read_image
from ..engine.distributed import all_gather_object, broadcast_object, get_local_rank, get_rank, init_distributed
from ..errors import DetkitError, UsageError
from ..evaluation import detections_to_coco
from ..fileio import write_json_atomic
from .inputs import (
    VIDEO_EXTENSIONS,
    CategoryIds,
    CocoIndex,
    InferInput,
    ReadImage,
    image_ids_for,
    list_input,
    read_coco_json,
    read_images,
    resolve_category_ids,
)
from .inputs import warn as _warn
from .parts import (
    PartsPlan,
    PartWriter,
    merge_parts,
    part_path,
    parts_dir_for,
    prepare_parts,
    remove_parts,
    run_settings,
    shard_indices,
)
from ..machine import resolve_device
from .predictor import Prediction, Predictor
from ..visualization import draw_detections

__all__ = [
    "VIDEO_EXTENSIONS", "InferInput", "CocoIndex", "CategoryIds", "InferOptions", "list_input", "read_coco_json",
    "resolve_category_ids", "image_ids_for", "confident", "prediction_records", "build_predictor", "run_images",
    "run_video", "run_inference",
]

#: decimals of the records' ``bbox`` (pixels) and ``score``
BBOX_DECIMALS, SCORE_DECIMALS = 2, 5



def confident(pred: Prediction, score_thresh: float) -> Prediction:
    """The detections of ``pred`` scoring at least ``score_thresh``."""
    keep = pred.scores >= score_thresh
    return Prediction(pred.boxes[keep], pred.scores[keep], pred.labels[keep],
                      None if pred.masks is None else pred.masks[keep])


def prediction_records(pred: Prediction, class_names: Sequence[str], file_name: str, image_id: int,
                       category_ids: Optional[Sequence[int]] = None, frame: Optional[int] = None) -> list[dict]:
    """COCO results records of one image: ``image_id``, ``category_id`` (``category_ids[label]``,
    or label + 1 when None), ``bbox`` [x, y, w, h] (0.01 px), ``score`` (5 decimals), then
    ``file_name``, ``label``, ``category_name`` (and ``frame`` for a video), which COCO tools
    ignore, and ``segmentation`` (compressed RLE, str counts) for Mask R-CNN."""
    extras = []
    for label in pred.labels.tolist():
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        extra: dict[str, Any] = {"file_name": file_name, "label": label, "category_name": name}
        if frame is not None:
            extra["frame"] = frame
        extras.append(extra)
    return detections_to_coco(image_id, pred.boxes, pred.scores, pred.labels, category_ids, pred.masks,
                              extras=extras, bbox_decimals=BBOX_DECIMALS, score_decimals=SCORE_DECIMALS)


def _draw(image: np.ndarray, pred: Prediction, class_names: Sequence[str], score_thresh: float) -> np.ndarray:
    return draw_detections(image, pred.boxes, pred.labels, pred.scores, pred.masks, class_names, score_thresh)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise UsageError(f"could not write {path}; check the --output folder is writable and the extension is an "
                         "image type")


def build_predictor(config: str, overrides: Sequence[str], weights: Optional[str], device: str,
                    precision: str) -> Predictor:
    """Load ``config`` (with ``key=value`` overrides) and build a :class:`Predictor` on ``device``."""
    cfg = load_detection_config(config, overrides, tool="infer.py")
    if weights is not None and not is_weights_name(weights) and not Path(weights).is_file():
        raise UsageError(f"--weights {weights}: no such file; pass a checkpoint such as runs/x/checkpoints/best.pth")
    resolve_device(device)
    return Predictor(cfg, weights=weights, device=device, precision=precision)


@dataclass
class ImagesDone:
    """Outcome of :func:`run_images`: images processed and the messages of the skipped files."""

    done: int
    skipped: list[str] = field(default_factory=list)


def run_images(
    predictor: Predictor, files: Sequence[Path], out_dir: Optional[Path], score_thresh: float, records: list[dict],
    image_ids: Optional[Sequence[Optional[int]]] = None, category_ids: Optional[Sequence[int]] = None,
    on_done: Optional[Callable[[int, Path, list[dict]], None]] = None, strict: Optional[bool] = None,
    prefix: str = "", batch_size: Optional[int] = None, read_ahead: Optional[int] = None,
) -> ImagesDone:
    """Predict and draw each image (``out_dir/<name>``); append its records to ``records``.

    ``image_ids[i]`` is the records' image id of ``files[i]`` (None: no records; default: ``i``).
    ``on_done(i, files[i], its records)`` is called once image ``i`` is drawn. An unreadable file
    is an error when ``strict`` (default: when it is the only one), else skipped with a warning.
    ``prefix`` starts each progress line (e.g. ``"[rank 1/2] "``). ``batch_size`` images (default:
    the config's ``test.batch_size``) go to one :meth:`Predictor.predict` call (1: ``predictor(image)``);
    the outputs are written image by image in input order all the same. ``read_ahead`` images
    (default: ``batch_size``) are read ahead on a thread; 0 reads each when it is needed.
    """
    names = list(predictor.class_names)
    strict = len(files) == 1 if strict is None else strict
    batch = max(int(predictor.cfg.test.batch_size if batch_size is None else batch_size), 1)
    result = ImagesDone(0)
    pending: list[ReadImage] = []  # read, not yet predicted; unreadable files keep their place

    def flush() -> None:
        images = [r.image for r in pending if r.image is not None]
        preds = iter([predictor(im) for im in images] if batch == 1 else predictor.predict(images))
        for r in pending:
            if r.image is None:
                _warn(f"skipping {r.error}", prefix)
                result.skipped.append(r.error)
                continue
            pred = confident(next(preds), score_thresh)
            image_id = r.index if image_ids is None else image_ids[r.index]
            recs = [] if image_id is None else prediction_records(pred, names, r.path.name, image_id, category_ids)
            records.extend(recs)
            if out_dir is not None:
                _write_image(out_dir / r.path.name, _draw(r.image, pred, names, score_thresh))
            if on_done is not None:
                on_done(r.index, r.path, recs)
            print(f"{prefix}{r.path.name}: {len(pred)} detections", flush=bool(prefix))
            result.done += 1
        pending.clear()

    t0 = time.perf_counter()
    with contextlib.closing(read_images(files, batch if read_ahead is None else read_ahead)) as reader:
        for r in reader:
            if r.image is None and strict:
                flush()
                raise UsageError(r.error + "; check the file is a valid image")
            pending.append(r)
            if sum(p.image is not None for p in pending) == batch:
                flush()
        flush()
    if result.done > 1:
        dt = max(time.perf_counter() - t0, 1e-9)
        print(f"{prefix}{result.done} images, {result.done / dt:.2f} images/s (batch size {batch})",
              flush=bool(prefix))
    return result


def run_video(predictor: Predictor, path: Path, out_dir: Optional[Path], score_thresh: float, records: list[dict],
              category_ids: Optional[Sequence[int]] = None) -> int:
    """Predict and draw every frame of a video into ``out_dir/<name>`` (mp4v); the records' image
    id (and ``frame``) is the frame number. Returns the number of frames."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise UsageError(f"--input {path}: OpenCV cannot open this video; re-encode it (e.g. ffmpeg -i in out.mp4)")
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
            pred = confident(predictor(rgb), score_thresh)
            records.extend(prediction_records(pred, names, path.name, n, category_ids, frame=n))
            if out_dir is not None:
                if writer is None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    h, w = rgb.shape[:2]
                    writer = cv2.VideoWriter(str(out_dir / path.name), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                    if not writer.isOpened():
                        raise UsageError(f"cannot write video {out_dir / path.name} with the mp4v codec; "
                                         "try an .mp4 name")
                writer.write(cv2.cvtColor(_draw(rgb, pred, names, score_thresh), cv2.COLOR_RGB2BGR))
            n += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if n == 0:
        raise UsageError(f"--input {path}: no frames could be decoded; check the video file")
    dt = time.perf_counter() - t0
    print(f"{path.name}: {n} frames, {n / max(dt, 1e-9):.2f} frames/s")
    return n


@dataclass(frozen=True)
class InferOptions:
    """The settings of one run (the command-line flags of ``tools/infer.py``)."""

    config: str
    input: str
    weights: Optional[str] = None
    output: Optional[str] = None
    score_thresh: float = 0.5
    save_json: Optional[str] = None
    coco_json: Optional[str] = None
    device: str = "cpu"
    precision: str = "fp32"
    overrides: Sequence[str] = ()
    resume: bool = False
    batch_size: Optional[int] = None  # None: the config's test.batch_size


def _check_before_loading(opts: InferOptions, inp: InferInput, world_size: int) -> None:
    """Fail on an output folder that would overwrite the input, an unreadable single image, a
    video with ``--coco-json``, ``--resume`` or under ``torchrun`` before the model is loaded."""
    if opts.output and Path(opts.output).resolve() in {f.parent.resolve() for f in inp.files}:
        raise UsageError(f"--output {opts.output} is the input's folder; drawn files would overwrite the originals, "
                         "choose another folder")
    if inp.kind == "images" and len(inp.files) == 1:
        try:
            read_image(inp.files[0])
        except OSError as e:
            raise UsageError(f"{e}; check the file is a valid image") from None
    if opts.coco_json is not None and inp.kind == "video":
        raise UsageError("--coco-json maps image file names to image ids; it does not apply to a video --input")
    if inp.kind == "video" and world_size > 1:
        raise UsageError(f"--input {opts.input} is a video, whose frames are not split over processes; run it in "
                         "one process (python tools/infer.py, without torchrun)")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError(f"--batch-size {opts.batch_size}: give 1 or more images per model call")
    if opts.resume and (inp.kind == "video" or not opts.save_json):
        raise UsageError("--resume continues the part files of an image run's --save-json; pass the stopped run's "
                         "--save-json" + (" (a video is always run whole)" if inp.kind == "video" else ""))


def _process_device(name: str, world_size: int) -> torch.device:
    """``--device`` for this process: under ``torchrun``, ``cuda`` is the ``LOCAL_RANK`` GPU (an
    index given is overridden, with a warning: NCCL needs one GPU per process)."""
    device = resolve_device(name)
    if world_size > 1 and device.type == "cuda":
        local = torch.device("cuda", get_local_rank() % torch.cuda.device_count())
        if device.index is not None and device != local:
            _warn(f"--device {name}: under torchrun each process uses its LOCAL_RANK GPU; this one uses {local}")
        device = local
    return device


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 and its result sent to every process; its error (bad input or a file
    that cannot be written) is raised on every process, so none waits for the others in vain."""
    result = None
    if get_rank() == 0:
        try:
            result = fn()
        except (DetkitError, OSError) as e:
            result = e
    result = broadcast_object(result)
    if isinstance(result, (DetkitError, OSError)):
        raise result
    return result


@dataclass(frozen=True)
class _Run:
    """What :func:`run_inference` resolved for the images: predictor, ids, output folder, rank."""

    predictor: Predictor
    image_ids: list[Optional[int]]
    category_ids: Optional[list[int]]
    out_dir: Optional[Path]
    rank: int
    world_size: int


def _plan_parts(opts: InferOptions, files: list[Path], run: _Run) -> PartsPlan:
    """Rank 0 sets up the parts folder of ``--save-json`` (refusing parts of another run or of
    other settings, the same error on every process); every process gets the plan."""
    names = [f.name for f in files]

    def prepare() -> PartsPlan:
        p = run.predictor
        settings = run_settings(config_to_dict(p.cfg), opts.weights, opts.score_thresh, p.precision,
                                opts.coco_json, names, p.class_names, run.category_ids)
        return prepare_parts(parts_dir_for(opts.save_json), settings, names, opts.resume)

    return _on_rank0(prepare)


def _run_image_shards(opts: InferOptions, files: list[Path], run: _Run, plan: PartsPlan) -> tuple[list[dict], int]:
    """Predict this process's share of the images that ``plan`` leaves, writing part files with
    ``--save-json``; rank 0 then merges them into ``opts.save_json``. Returns the records (rank 0:
    all of them when merged; otherwise this process's) and the number of unreadable images."""
    names = [f.name for f in files]
    parts_dir = parts_dir_for(opts.save_json) if opts.save_json else None
    done_before = set(plan.done)
    todo = shard_indices([i for i in range(len(files)) if i not in done_before], run.rank, run.world_size)
    if plan.done and run.rank == 0:
        print(f"--resume: {len(plan.done)} of {len(files)} images were done; predicting the other "
              f"{len(files) - len(plan.done)}")
    prefix = f"[rank {run.rank}/{run.world_size}] " if run.world_size > 1 else ""
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(PartWriter(part_path(parts_dir, plan.run, run.rank))) if parts_dir else None

        finished_here: list[int] = []

        def on_done(k: int, f: Path, recs: list[dict]) -> None:
            finished_here.append(todo[k])
            if writer is not None:
                writer.write(todo[k], f.name, recs)

        done = run_images(run.predictor, [files[i] for i in todo], run.out_dir, opts.score_thresh, records,
                          [run.image_ids[i] for i in todo], run.category_ids, on_done=on_done,
                          strict=len(files) == 1, prefix=prefix)
    counts = all_gather_object((done.done, len(done.skipped), finished_here))  # also waits for every process
    finished, skipped = len(plan.done) + sum(c[0] for c in counts), sum(c[1] for c in counts)
    if finished == 0:
        if parts_dir is not None and run.rank == 0:
            remove_parts(parts_dir)  # holds nothing to resume
        raise UsageError(f"--input {opts.input}: none of the {len(files)} images could be read")
    if parts_dir is not None and run.rank == 0:
        owners = {i: "an earlier run" for i in plan.done}
        owners.update({i: f"rank {r}" for r, c in enumerate(counts) for i in c[2]})
        records, _ = merge_parts(parts_dir, names, owners)  # kept, with what is missing, unless complete
        path = write_json_atomic(opts.save_json, records)
        remove_parts(parts_dir)
        print(f"wrote {len(records)} detections to {path}")
    return records, skipped


def run_inference(opts: InferOptions) -> list[dict]:
    """Run inference as ``opts`` says: draw into ``opts.output``, write ``opts.save_json``.

    Under ``torchrun`` this process joins the process group (left for
    :func:`detkit.cli.run_cli` to tear down) and predicts its share of the images. Returns the
    COCO results records: all of them on rank 0 (as written to ``opts.save_json`` when set),
    this process's share on the others.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    inp = list_input(Path(opts.input))
    _check_before_loading(opts, inp, world)
    coco = read_coco_json(Path(opts.coco_json)) if opts.coco_json is not None else None
    image_ids: list[Optional[int]] = []
    if inp.kind == "images":
        image_ids = image_ids_for(inp.files, None if coco is None else coco.image_ids, opts.coco_json)
    device = _process_device(opts.device, world)
    if world > 1:
        init_distributed(device)
    rank = get_rank()
    overrides = (*opts.overrides, f"test.batch_size={opts.batch_size}") if opts.batch_size else opts.overrides
    predictor = build_predictor(opts.config, overrides, opts.weights, str(device), opts.precision)
    cats = resolve_category_ids(predictor.classes, None if coco is None else coco.category_ids)
    out_dir = Path(opts.output) if opts.output else None
    run = _Run(predictor, image_ids, cats.ids, out_dir, rank, world)
    plan = _plan_parts(opts, inp.files, run) if inp.kind == "images" and opts.save_json else PartsPlan(0)
    if opts.save_json and rank == 0:
        print(f"category_id of the records: {cats.source}", file=sys.stderr)
    if opts.output is None and opts.save_json is None and rank == 0:
        print("note: neither --output nor --save-json given; only printing detection counts", file=sys.stderr)
    records: list[dict] = []
    skipped = 0
    if inp.kind == "video":
        if predictor.cfg.test.batch_size > 1 and rank == 0:
            print("note: a video runs one frame per model call (batch size 1)", file=sys.stderr)
        run_video(predictor, inp.files[0], out_dir, opts.score_thresh, records, cats.ids)
        if opts.save_json:
            path = write_json_atomic(opts.save_json, records)
            print(f"wrote {len(records)} detections to {path}")
    else:
        records, skipped = _run_image_shards(opts, inp.files, run, plan)
    if out_dir is not None and rank == 0:
        print(f"drawn output in {out_dir}")
    if skipped and rank == 0:
        _warn(f"skipped {skipped} unreadable image(s)")
    return records
