"""Export Faster / Mask R-CNN to TorchScript and ONNX, and check the exports against PyTorch.

The exported graph is the detector's own inference code (:meth:`TwoStageDetector.predict`)
recorded with ``torch.jit.trace``; the model code keeps every size-dependent step in the
graph while tracing (``torch.jit.is_tracing()`` branches: traced image sizes, top-k with
``k = min(k, n)`` as a graph value, per-level RoIAlign without empty-level shortcuts, per-image
selection without host-side splits), so one export runs on any image size and on images with
zero detections.

Exported signature (both formats), one image per call::

    image  float32 [3, H, W]  RGB, 0..255, any H and W (resize like the Predictor first:
                              short side ``input.min_size_test``, long side <= ``input.max_size_test``)
    ->  boxes  float32 [N, 4]  xyxy in the input image's pixels
        scores float32 [N]     decreasing
        labels int64   [N]     contiguous class indices in [0, K)
        masks  float32 [N, 1, M, M]  (Mask R-CNN only) mask probabilities of the predicted class,
                                     not pasted: use :func:`paste_masks` (or
                                     ``paste_masks_in_image``) with the boxes and ``mask_threshold``.

Masks are returned before pasting because pasting loops over data-dependent box sizes on the
host, which a traced graph cannot express; the M x M probabilities are also 10-100x smaller
than full-image masks.

Example::

    model = build_detector(cfg, num_classes).eval()
    export_torchscript(model, "out/model.ts", sample)          # sample: float [3, H, W]
    export_onnx(model, "out/model.onnx", sample, opset=17)
    report = verify_exports(model, [img_a, img_b, blank], torchscript="out/model.ts", onnx="out/model.onnx")
    print(report.summary()); assert report.ok
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torchvision  # noqa: F401  (registers the ONNX symbolics of torchvision::nms / roi_align)
from torch import Tensor, nn

from .models.detector import TwoStageDetector
from .models.roi_heads.mask_head import paste_masks_in_image

__all__ = [
    "ExportError",
    "ExportableDetector",
    "export_torchscript",
    "export_onnx",
    "load_torchscript",
    "load_onnx",
    "paste_masks",
    "BackendCheck",
    "VerificationReport",
    "verify_exports",
    "DEFAULT_OPSET",
]

PathLike = Union[str, os.PathLike]

#: RoIAlign with ``aligned=True`` (Detectron2's ROIAlignV2) needs ONNX opset >= 16.
DEFAULT_OPSET = 17
MIN_OPSET = 16

INPUT_NAME = "image"
BOX_OUTPUTS = ("boxes", "scores", "labels")
MASK_OUTPUT = "masks"


class ExportError(RuntimeError):
    """An export or verification step failed; the message is one line saying what to do."""


def _unwrap(model: nn.Module) -> TwoStageDetector:
    if isinstance(model, ExportableDetector):
        return model.model
    if not isinstance(model, TwoStageDetector):
        raise ExportError(
            f"export: expected a TwoStageDetector (detkit.models.build.build_detector) or ExportableDetector, "
            f"got {type(model).__name__}"
        )
    fused = sorted({type(m).__name__ for m in model.modules() if type(m).__module__ == "detkit.speed"})
    if fused:
        raise ExportError(
            f"export: the model holds speed-optimized modules ({', '.join(fused)}) whose fused oneDNN kernels cannot "
            "be exported; export the plain model (build_detector + load_weights, or Predictor(..., optimize=False))"
        )
    return model


class ExportableDetector(nn.Module):
    """One image in, plain tensors out: the traceable face of a :class:`TwoStageDetector`.

    ``forward`` calls ``model.predict([image], paste_masks=False)`` (the detector's own inference
    path: eval mode, no gradients) and returns ``(boxes, scores, labels)``, plus ``masks`` float
    ``[N, 1, M, M]`` probabilities for Mask R-CNN. See the module docstring for the shapes.

    Args:
        model: the detector; it is put in eval mode.
    """

    def __init__(self, model: TwoStageDetector) -> None:
        super().__init__()
        self.model = _unwrap(model).eval()

    @property
    def has_mask(self) -> bool:
        """True for Mask R-CNN (a fourth output, ``masks``)."""
        return bool(getattr(self.model.roi_heads, "has_mask", False))

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in order (also the ONNX output names)."""
        return [*BOX_OUTPUTS, MASK_OUTPUT] if self.has_mask else list(BOX_OUTPUTS)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        """float32 [3, H, W] RGB 0..255 -> (boxes [N, 4], scores [N], labels [N] [, masks [N, 1, M, M]])."""
        det = self.model.predict([image], paste_masks=False)[0]
        out = (det.boxes, det.scores, det.labels)
        if self.has_mask:
            out = out + (det.masks,)
        return out


def _check_sample(sample: Tensor, where: str) -> Tensor:
    if not isinstance(sample, Tensor) or sample.dim() != 3 or sample.shape[0] != 3 or min(sample.shape[1:]) <= 0:
        shape = tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
        raise ExportError(f"{where}: sample must be a float [3, H, W] RGB 0..255 tensor, got {shape}")
    return sample.float()


def _wrap(model: nn.Module) -> ExportableDetector:
    return model if isinstance(model, ExportableDetector) else ExportableDetector(model)


def _trace(wrapper: ExportableDetector, sample: Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TracerWarnings flag the Python-side checks that run once at trace time (input validation);
        # the size-dependent computations are traced as graph values (see the module docstring).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return torch.jit.trace(wrapper, (sample,), check_trace=False)


def _prepare_path(path: PathLike) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the folder of {path}: {e.strerror or e}; choose a writable --output") from None
    return path


def export_torchscript(model: nn.Module, path: PathLike, sample: Tensor) -> Path:
    """Trace the detector on ``sample`` and save it as TorchScript (``torch.jit.load`` reads it).

    Args:
        model: a :class:`TwoStageDetector` or :class:`ExportableDetector`.
        path: output file (e.g. ``model.ts``); its folder is created.
        sample: float [3, H, W] RGB 0..255 image to trace with (any content; detections or not).

    Returns:
        the written path. The module runs on the device the model was on when traced.
    """
    wrapper = _wrap(model).eval()
    sample = _check_sample(sample, "export_torchscript").to(wrapper.model.device)
    path = _prepare_path(path)
    traced = _trace(wrapper, sample)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        torch.jit.save(traced, str(tmp))
    os.replace(tmp, path)
    return path


def export_onnx(model: nn.Module, path: PathLike, sample: Tensor, opset: int = DEFAULT_OPSET) -> Path:
    """Export the detector to ONNX with dynamic image height and width.

    Uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) on the same
    traced code as :func:`export_torchscript`; NMS and RoIAlign become the ONNX
    ``NonMaxSuppression`` and ``RoiAlign`` operators (torchvision's registered symbolics).

    Args:
        model: a :class:`TwoStageDetector` or :class:`ExportableDetector`.
        path: output file (e.g. ``model.onnx``); its folder is created.
        sample: float [3, H, W] RGB 0..255 image to trace with.
        opset: ONNX opset, >= 16 (RoIAlign ``coordinate_transformation_mode``).

    Returns:
        the written path. Input ``image`` [3, height, width]; outputs ``boxes``, ``scores``,
        ``labels`` (and ``masks``) with a dynamic first dimension ``num_detections``.
    """
    if int(opset) < MIN_OPSET:
        raise ExportError(f"export_onnx: opset {opset} is too old; RoIAlign needs opset >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    wrapper = _wrap(model).eval()
    sample = _check_sample(sample, "export_onnx").to(wrapper.model.device)
    path = _prepare_path(path)
    names = wrapper.output_names
    dynamic_axes: dict[str, dict[int, str]] = {INPUT_NAME: {1: "height", 2: "width"}}
    dynamic_axes.update({n: {0: "num_detections"} for n in names})
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (sample,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes=dynamic_axes,
                opset_version=int(opset),
                do_constant_folding=True,
            )
    os.replace(tmp, path)
    return path


def load_torchscript(path: PathLike, device: Union[str, torch.device] = "cpu") -> torch.jit.ScriptModule:
    """Load an exported TorchScript detector (``module(image) -> (boxes, scores, labels[, masks])``)."""
    if not Path(path).is_file():
        raise ExportError(f"{path}: no such TorchScript file; export it first (tools/export.py --format torchscript)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        return torch.jit.load(str(path), map_location=device).eval()


def load_onnx(path: PathLike) -> Any:
    """An onnxruntime ``InferenceSession`` (CPUExecutionProvider) for an exported ONNX detector."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed; run `pip install detkit[export]`") from None
    if not Path(path).is_file():
        raise ExportError(f"{path}: no such ONNX file; export it first (tools/export.py --format onnx)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Exported ``[N, 1, M, M]`` mask probabilities -> bool ``[N, H, W]`` image masks (as ``predict`` pastes)."""
    return paste_masks_in_image(torch.as_tensor(masks).float(), torch.as_tensor(boxes).float(), image_size, threshold)


# --------------------------------------------------------------------------- verification
@dataclass
class BackendCheck:
    """One backend on one image, compared with PyTorch eager.

    Attributes:
        backend: ``"torchscript"`` or ``"onnxruntime"``.
        image_index, image_size: which image (``(h, w)``).
        num_ref, num_out: detections from PyTorch and from the backend.
        max_box_diff: max abs box coordinate difference in pixels (0 when both are empty).
        max_score_diff: max abs score difference.
        min_mask_iou: lowest IoU of the pasted masks (1.0 when no masks / no detections).
        reordered: detections matched at another position (near-equal scores ordered differently).
        seconds: the backend's run time on this image.
        problems: what failed (empty when the check passed).
    """

    backend: str
    image_index: int
    image_size: tuple[int, int]
    num_ref: int
    num_out: int
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    min_mask_iou: float = 1.0
    reordered: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerificationReport:
    """All :class:`BackendCheck` results plus the tolerances they were held to."""

    checks: list[BackendCheck]
    box_atol: float
    score_atol: float
    mask_iou_min: float
    reference_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backend matched PyTorch on every image."""
        return all(c.ok for c in self.checks)

    def failures(self) -> list[str]:
        """One line per failed check."""
        return [
            f"{c.backend} image {c.image_index} {c.image_size[0]}x{c.image_size[1]}: {'; '.join(c.problems)}"
            for c in self.checks
            if not c.ok
        ]

    def worst(self, backend: str) -> dict[str, float]:
        """Largest box/score differences and lowest mask IoU of one backend over all images."""
        cs = [c for c in self.checks if c.backend == backend]
        return {
            "max_box_diff": max((c.max_box_diff for c in cs), default=0.0),
            "max_score_diff": max((c.max_score_diff for c in cs), default=0.0),
            "min_mask_iou": min((c.min_mask_iou for c in cs), default=1.0),
        }

    def summary(self) -> str:
        """A small table: one row per backend and image."""
        lines = [
            f"tolerances: boxes <= {self.box_atol:g} px, scores <= {self.score_atol:g}, mask IoU >= {self.mask_iou_min:g}",
            f"{'backend':<12} {'image':>5} {'size':>9} {'n_ref':>5} {'n_out':>5} {'box_diff':>9} "
            f"{'score_diff':>10} {'mask_iou':>8} {'swaps':>5} {'ms':>7}  status",
        ]
        for c in self.checks:
            size = f"{c.image_size[0]}x{c.image_size[1]}"
            lines.append(
                f"{c.backend:<12} {c.image_index:>5} {size:>9} {c.num_ref:>5} {c.num_out:>5} {c.max_box_diff:>9.2e} "
                f"{c.max_score_diff:>10.2e} {c.min_mask_iou:>8.4f} {c.reordered:>5} {c.seconds * 1000:>7.1f}  "
                + ("ok" if c.ok else "FAIL: " + "; ".join(c.problems))
            )
        if self.reference_seconds:
            mean_ms = 1000 * sum(self.reference_seconds) / len(self.reference_seconds)
            lines.append(f"pytorch eager (reference): {mean_ms:.1f} ms per image on average")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for the export manifest)."""
        backends = sorted({c.backend for c in self.checks})
        return {
            "ok": self.ok,
            "tolerances": {"box_atol": self.box_atol, "score_atol": self.score_atol, "mask_iou_min": self.mask_iou_min},
            "worst": {b: self.worst(b) for b in backends},
            "checks": [
                {
                    "backend": c.backend, "image_index": c.image_index, "image_size": list(c.image_size),
                    "num_ref": c.num_ref, "num_out": c.num_out, "max_box_diff": c.max_box_diff,
                    "max_score_diff": c.max_score_diff, "min_mask_iou": c.min_mask_iou, "reordered": c.reordered,
                    "problems": c.problems,
                }
                for c in self.checks
            ],
        }


def _mask_ious(a: Tensor, b: Tensor) -> Tensor:
    """Per-instance IoU of two bool [N, H, W] mask stacks (1.0 where both are empty)."""
    a, b = a.flatten(1), b.flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _match_detections(ref: Sequence[Tensor], out: Sequence[Tensor], score_atol: float) -> Tensor:
    """For each reference detection, the index of its counterpart in ``out`` (-1: none).

    A counterpart has the same label and a score within ``score_atol``; among those the nearest box
    (max abs coordinate difference) not yet taken wins, reference detections taken in score order.
    Near-equal scores may come out of NMS in another order on another backend; this pairs them anyway.
    """
    # (n, 1, 4) - (1, m, 4) -> (n, m) box distance; pairs that cannot match get +inf
    cost = (ref[0][:, None, :] - out[0][None, :, :]).abs().amax(dim=2)
    ok = (ref[2][:, None] == out[2][None, :]) & ((ref[1][:, None] - out[1][None, :]).abs() <= score_atol)
    cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
    match = torch.full((cost.shape[0],), -1, dtype=torch.int64)
    for i in range(cost.shape[0]):
        j = int(cost[i].argmin())
        if torch.isfinite(cost[i, j]):
            match[i] = j
            cost[:, j] = float("inf")
    return match


def _compare(
    backend: str, index: int, size: tuple[int, int], ref: Sequence[Tensor], out: Sequence[Tensor],
    seconds: float, box_atol: float, score_atol: float, mask_iou_min: float, mask_threshold: float,
) -> BackendCheck:
    names = [*BOX_OUTPUTS, MASK_OUTPUT][: len(ref)]
    check = BackendCheck(backend, index, size, int(ref[0].shape[0]), -1, seconds=seconds)
    if len(out) != len(ref):
        check.problems.append(f"{len(out)} outputs, expected {len(ref)} ({', '.join(names)})")
        return check
    out = [torch.as_tensor(o).cpu() for o in out]
    check.num_out = int(out[0].shape[0])
    n = check.num_ref
    for name, r, o in zip(names, ref, out):  # shapes and dtypes, also for zero detections
        if o.shape[1:] != r.shape[1:] or o.dim() != r.dim():
            check.problems.append(f"{name} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        elif o.dtype != r.dtype:
            check.problems.append(f"{name} is {o.dtype}, expected {r.dtype}")
    if check.problems:
        return check
    if check.num_out != n:
        check.problems.append(f"{check.num_out} detections, expected {n}")
        return check
    if n == 0:
        return check
    match = _match_detections(ref, out, score_atol)
    found = match >= 0
    check.reordered = int((match[found] != torch.arange(n)[found]).sum())
    if not bool(found.all()):
        check.problems.append(
            f"{int((~found).sum())} of {n} detections have no counterpart with the same label and a score within "
            f"{score_atol:g}"
        )
        if not bool(found.any()):
            return check
    ref = [r[found] for r in ref]
    out = [o[match[found]] for o in out]
    check.max_box_diff = float((out[0] - ref[0]).abs().max())
    check.max_score_diff = float((out[1] - ref[1]).abs().max())
    if check.max_box_diff > box_atol:
        check.problems.append(f"boxes differ by {check.max_box_diff:.3g} px > {box_atol:g}")
    if check.max_score_diff > score_atol:
        check.problems.append(f"scores differ by {check.max_score_diff:.3g} > {score_atol:g}")
    if len(ref) == 4:
        ref_masks = paste_masks(ref[3], ref[0], size, mask_threshold)
        out_masks = paste_masks(out[3], out[0], size, mask_threshold)
        check.min_mask_iou = float(_mask_ious(ref_masks, out_masks).min())
        if check.min_mask_iou < mask_iou_min:
            check.problems.append(f"mask IoU {check.min_mask_iou:.4f} < {mask_iou_min:g}")
    return check


def verify_exports(
    model: nn.Module,
    images: Sequence[Tensor],
    torchscript: Union[None, PathLike, torch.jit.ScriptModule] = None,
    onnx: Union[None, PathLike, Any] = None,
    box_atol: float = 1e-2,
    score_atol: float = 1e-4,
    mask_iou_min: float = 0.99,
) -> VerificationReport:
    """Run PyTorch (eager), the TorchScript module and onnxruntime on ``images`` and compare.

    For every image and backend: output shapes/dtypes as PyTorch's (also for zero detections), the
    same number of detections, and every PyTorch detection paired with one of the backend's with
    the same label, score within ``score_atol`` and box within ``box_atol`` pixels (pairs are found
    by label/score/box, so near-equal scores that NMS orders differently still pair up; the count
    of such swaps is ``BackendCheck.reordered``), and for Mask R-CNN pasted-mask IoU >=
    ``mask_iou_min`` per pair. Use images of other sizes than the export sample, and one with no
    detections.

    Args:
        model: the detector that was exported (:class:`TwoStageDetector` or :class:`ExportableDetector`).
        images: float [3, H, W] RGB 0..255 images (already resized like the Predictor does).
        torchscript: path of, or loaded, TorchScript export; None skips it.
        onnx: path of the ONNX export, or an onnxruntime session; None skips it.
        box_atol, score_atol, mask_iou_min: tolerances.

    Returns:
        a :class:`VerificationReport` (``.ok``, ``.summary()``, ``.failures()``).
    """
    if torchscript is None and onnx is None:
        raise ExportError("verify_exports: nothing to verify; give torchscript= and/or onnx=")
    if len(images) == 0:
        raise ExportError("verify_exports: no images; give at least one float [3, H, W] image")
    wrapper = _wrap(model).eval()
    device = wrapper.model.device
    mask_threshold = float(wrapper.model.mask_threshold)
    ts_module = load_torchscript(torchscript, device) if isinstance(torchscript, (str, os.PathLike)) else torchscript
    session = load_onnx(onnx) if isinstance(onnx, (str, os.PathLike)) else onnx

    checks: list[BackendCheck] = []
    ref_seconds: list[float] = []
    for index, image in enumerate(images):
        image = _check_sample(image, f"verify_exports: image {index}")
        size = (int(image.shape[1]), int(image.shape[2]))
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = [t.cpu() for t in wrapper(image.to(device))]
        ref_seconds.append(time.perf_counter() - t0)
        tol = (box_atol, score_atol, mask_iou_min, mask_threshold)
        if ts_module is not None:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    out = list(ts_module(image.to(device)))
            except Exception as e:  # noqa: BLE001 - a crash is a verification failure, reported per image
                checks.append(BackendCheck("torchscript", index, size, len(ref[0]), -1, problems=[_one_line(e)]))
            else:
                checks.append(_compare("torchscript", index, size, ref, out, time.perf_counter() - t0, *tol))
        if session is not None:
            t0 = time.perf_counter()
            try:
                out = [torch.from_numpy(np.asarray(o)) for o in session.run(None, {INPUT_NAME: image.cpu().numpy()})]
            except Exception as e:  # noqa: BLE001
                checks.append(BackendCheck("onnxruntime", index, size, len(ref[0]), -1, problems=[_one_line(e)]))
            else:
                checks.append(_compare("onnxruntime", index, size, ref, out, time.perf_counter() - t0, *tol))
    return VerificationReport(checks, box_atol, score_atol, mask_iou_min, ref_seconds)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"crashed: {type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
