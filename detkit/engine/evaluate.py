"""Running a detector over a dataset and evaluating the results."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from typing import Any, Iterable, Literal, Optional, Sequence

import torch
from torch import nn

from ..config import DetectionConfig
from ..models.detector import rescale_detections
from .distributed import all_gather_object, is_main_process, unwrap_model

__all__ = ["inference_on_dataset", "evaluation_model", "same_size_groups"]

logger = logging.getLogger("detkit.engine")


def _precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    raise ValueError(f"test.precision must be 'fp32', 'bf16' or 'fp16' without optimize=True, got {precision!r}")


def same_size_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``images`` grouped by their ``(H, W)``, in order of first appearance.

    A model call pads its images to the largest one, and padding moves detections (the RPN
    sees a different image border, the backbone's receptive fields reach into the padding), so
    evaluation calls the model once per group: each image is detected as if alone, whatever
    ``test.batch_size`` and whatever other images share its batch (what :class:`detkit.Predictor`
    does since it groups by resized size too).
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
    return list(groups.values())


def evaluation_model(model: nn.Module, precision: str, config: Optional[DetectionConfig] = None
                     ) -> tuple[nn.Module, str]:
    """A copy of ``model`` (eval mode, weights loaded) optimized as :class:`detkit.Predictor` runs it,
    and the autocast precision to run it under (always ``"fp32"``: the copy holds its own dtypes).

    ``precision="int8"`` quantizes the copy (:func:`detkit.inference.int8.int8_model`) with the statistics of
    ``config.test.int8_quantized`` or, when unset, calibrated on ``config.test.int8_calibration_images``
    images of ``config.data.train``: the AP int8 users get. Where int8 does not run (no VNNI/AMX-INT8,
    no torchao, not a CPU) it falls back, with one warning, to bf16 or fp32 as the Predictor does.
    """
    from ..inference.optimize import optimize_for_inference

    net = copy.deepcopy(model).eval()
    if precision == "int8":
        from ..inference.int8 import int8_model, resolve_int8

        device = next(net.parameters()).device
        precision = resolve_int8(device)
        if precision == "int8":
            if config is None:
                raise ValueError("evaluation in int8 needs the config (test.int8_quantized or data.train to "
                                 "calibrate on): pass config= to inference_on_dataset")
            _, rest = int8_model(net, config, config.test.int8_quantized)
            return optimize_for_inference(net, rest), "fp32"
    return optimize_for_inference(net, precision), "fp32"


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable[Any],
    evaluator: Any,
    precision: Literal["fp32", "bf16", "fp16", "int8"] = "fp32",
    device: Optional[torch.device] = None,
    progress: bool = True,
    optimize: bool = False,
    config: Optional[DetectionConfig] = None,
) -> dict[str, float]:
    """Predict every batch of ``data_loader`` and return ``evaluator.evaluate()``.

    For each :class:`~detkit.structures.Batch`: ``model.predict(images, paste_masks=False)`` once per
    group of same-size images (:func:`same_size_groups`: results do not depend on ``test.batch_size``
    or on how the images are sharded over processes), then :func:`~detkit.models.detector.rescale_detections` maps boxes to each image's
    ``orig_size`` and pastes masks there, and ``evaluator.process(image_ids, detections)``
    receives them on the CPU. Unreadable images (``batch.skipped``) are counted over all
    processes and logged. The model's train/eval mode is restored afterwards.

    ``optimize=True`` evaluates a copy made by :func:`evaluation_model` in ``precision`` (what
    :class:`detkit.Predictor` runs, so ``test.precision=bf16`` or ``int8`` scores the same model users
    deploy; int8 calibrates from ``config``); the model itself is left untouched. Otherwise
    ``precision="bf16"`` / ``"fp16"`` is plain autocast on the model.

    Under ``torchrun`` every process must call this with its shard of the data
    (an inference sampler); the evaluator gathers, and the metrics are returned on rank 0
    (``{}`` elsewhere).
    """
    net = unwrap_model(model)
    if device is None:
        device = next(net.parameters()).device
    mask_threshold = float(getattr(net, "mask_threshold", 0.5))
    mask_paste = str(getattr(net, "mask_paste", "torchvision"))
    was_training = net.training
    net.eval()
    if optimize:
        original = net
        net, precision = evaluation_model(net, precision, config)  # no autocast on top of the copy's dtypes
    else:
        original = net
    evaluator.reset()
    skipped: list[str] = []
    num_images = 0
    total = len(data_loader) if hasattr(data_loader, "__len__") else None  # type: ignore[arg-type]
    bar = None
    if progress and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True, mininterval=0.5, leave=False)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in data_loader:
                skipped.extend(batch.skipped)
                if len(batch.images) > 0:
                    images = [im.to(device, non_blocking=True) for im in batch.images]
                    dets: list[Any] = [None] * len(images)
                    for group in same_size_groups(images):
                        with _precision_context(device, precision):
                            for i, det in zip(group, net.predict([images[i] for i in group], paste_masks=False)):
                                dets[i] = det
                    out = []
                    for img, det, orig in zip(images, dets, batch.orig_sizes):
                        det = _to_float32(det)
                        det = rescale_detections(det, tuple(img.shape[-2:]), tuple(orig), mask_threshold, mask_paste)
                        out.append(det.to("cpu"))
                    evaluator.process(batch.image_ids, out)
                    num_images += len(images)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        original.train(was_training)
    elapsed = time.perf_counter() - t0
    counts = all_gather_object((num_images, skipped))
    n_total = sum(c[0] for c in counts)
    all_skipped = [s for c in counts for s in c[1]]
    if is_main_process():
        logger.info("Inference on %d images took %.1fs (%.3f s/image)", n_total, elapsed,
                    elapsed * len(counts) / max(n_total, 1))
        if all_skipped:
            logger.warning("%d unreadable images were skipped in evaluation: %s%s", len(all_skipped),
                           ", ".join(all_skipped[:5]), " ..." if len(all_skipped) > 5 else "")
    return evaluator.evaluate()


def _to_float32(det: Any) -> Any:
    """bf16 autocast outputs -> float32 (masks included) before rescaling."""
    from dataclasses import replace

    changes = {}
    for name in ("boxes", "scores", "masks"):
        v = getattr(det, name)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32:
            changes[name] = v.float()
    return replace(det, **changes) if changes else det
