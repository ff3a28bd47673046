"""Verification: an exported artifact run against the PyTorch model, and the images to run it on.

:func:`verify_exports` runs PyTorch (eager), a TorchScript module and onnxruntime on the same
images and compares their detections: shapes and dtypes, counts, boxes, scores and (Mask R-CNN)
pasted-mask IoU, pairing detections by label, score and box so that near-equal scores that NMS
orders differently still pair up. The result is a :class:`VerificationReport` of one
:class:`BackendCheck` per backend and image.

:func:`verification_images` makes the images ``tools/export.py --verify`` uses: the user's files
resized like the :class:`~detkit.inference.predictor.Predictor` does (or two generated scenes), plus a blank
image of the model's mean color, which a trained model should find nothing in.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..config.schema import DetectionConfig
from ..data.images import read_image
from ..data.transforms import build_detection_transform
from .export import (
    BOX_OUTPUTS,
    INPUT_NAME,
    MASK_OUTPUT,
    ExportError,
    _check_sample,
    _wrap,
    load_onnx,
    load_torchscript,
    paste_masks,
    synthetic_scene,
)

__all__ = [
    "BackendCheck",
    "VerificationImage",
    "VerificationReport",
    "blank_image",
    "verification_images",
    "verify_exports",
]

PathLike = Union[str, os.PathLike]


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
        at_edge: unpaired detections (either side) that sit at a cut: a score within the score
            tolerance of the score threshold, or, when the other side holds the maximum number of
            detections, of that side's lowest score. Numerical noise legitimately moves these in or
            out; they are counted, not failed.
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
    at_edge: int = 0
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

    def failure_line(self) -> str:
        """The first failure on one line (``""`` when the verification passed)."""
        failures = self.failures()
        if not failures:
            return ""
        more = f" (+{len(failures) - 1} more, see the table)" if len(failures) > 1 else ""
        return f"verification failed: {failures[0]}{more}"

    def images_without_detections(self) -> list[int]:
        """Indices of the images PyTorch found nothing in (the zero-detection case was exercised)."""
        return sorted({c.image_index for c in self.checks if c.num_ref == 0})

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
            f"{'score_diff':>10} {'mask_iou':>8} {'swaps':>5} {'edge':>4} {'ms':>7}  status",
        ]
        for c in self.checks:
            size = f"{c.image_size[0]}x{c.image_size[1]}"
            lines.append(
                f"{c.backend:<12} {c.image_index:>5} {size:>9} {c.num_ref:>5} {c.num_out:>5} {c.max_box_diff:>9.2e} "
                f"{c.max_score_diff:>10.2e} {c.min_mask_iou:>8.4f} {c.reordered:>5} {c.at_edge:>4} {c.seconds * 1000:>7.1f}  "
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
                    "at_edge": c.at_edge,
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


@dataclass(frozen=True)
class _Cuts:
    """Where the detector cuts its detections: ``score > score_thresh``, at most ``max_detections``."""

    score_thresh: float
    max_detections: int


def _at_edge(scores: Tensor, other_scores: Tensor, cuts: _Cuts, score_atol: float) -> Tensor:
    """bool [N]: which of one side's unpaired ``scores`` a score change within ``score_atol`` could move
    across a cut of the other side: the score threshold, or the other side's lowest kept score when
    it holds ``max_detections`` (its top-k cut)."""
    edge = (scores - cuts.score_thresh).abs() <= score_atol
    if other_scores.numel() >= cuts.max_detections > 0:
        edge |= scores <= other_scores.min() + score_atol
    return edge


def _compare(
    backend: str, index: int, size: tuple[int, int], ref: Sequence[Tensor], out: Sequence[Tensor],
    seconds: float, box_atol: float, score_atol: float, mask_iou_min: float, mask_threshold: float,
    cuts: _Cuts,
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
    if check.num_out > cuts.max_detections:
        check.problems.append(f"{check.num_out} detections, more than the model's maximum of {cuts.max_detections}")
    if check.problems or n == check.num_out == 0:
        return check
    match = _match_detections(ref, out, score_atol)
    found = match >= 0
    check.reordered = int((match[found] != torch.arange(n)[found]).sum())
    extra = torch.ones(check.num_out, dtype=torch.bool)
    extra[match[found]] = False
    # unpaired detections at a cut (threshold / top-k) are noise moving a score across it; others fail
    ref_edge = _at_edge(ref[1][~found], out[1], cuts, score_atol)
    out_edge = _at_edge(out[1][extra], ref[1], cuts, score_atol)
    check.at_edge = int(ref_edge.sum() + out_edge.sum())
    if not bool(ref_edge.all()):
        check.problems.append(
            f"{int((~ref_edge).sum())} of {n} detections have no counterpart with the same label and a score within "
            f"{score_atol:g}"
        )
    if not bool(out_edge.all()):
        check.problems.append(f"{int((~out_edge).sum())} of its {check.num_out} detections are not in PyTorch's")
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

    For every image and backend: output shapes/dtypes as PyTorch's (also for zero detections), and
    every detection of either side paired with one of the other's with the same label, score within
    ``score_atol`` and box within ``box_atol`` pixels (pairs are found by label/score/box, so
    near-equal scores that NMS orders differently still pair up; the count of such swaps is
    ``BackendCheck.reordered``), and for Mask R-CNN pasted-mask IoU >= ``mask_iou_min`` per pair.
    A detection without a partner passes only where a score change within ``score_atol`` moves it
    across a cut: the score threshold, or the top-k cut when the other side holds the maximum
    number of detections (``BackendCheck.at_edge`` counts them). Use images of other sizes than
    the export sample, and one with no detections.

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
    heads = wrapper.model.roi_heads
    cuts = _Cuts(float(heads.score_thresh), int(heads.detections_per_image))
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
                checks.append(_compare("torchscript", index, size, ref, out, time.perf_counter() - t0, *tol, cuts))
        if session is not None:
            t0 = time.perf_counter()
            try:
                out = [torch.from_numpy(np.asarray(o)) for o in session.run(None, {INPUT_NAME: image.cpu().numpy()})]
            except Exception as e:  # noqa: BLE001
                checks.append(BackendCheck("onnxruntime", index, size, len(ref[0]), -1, problems=[_one_line(e)]))
            else:
                checks.append(_compare("onnxruntime", index, size, ref, out, time.perf_counter() - t0, *tol, cuts))
    return VerificationReport(checks, box_atol, score_atol, mask_iou_min, ref_seconds)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"crashed: {type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# --------------------------------------------------------------------------- verification images
@dataclass
class VerificationImage:
    """One image to verify on: ``image`` float32 [3, H, W] RGB 0..255; ``name`` says where it came from."""

    name: str
    image: Tensor


def blank_image(model: nn.Module, height: int, width: int) -> Tensor:
    """float32 [3, H, W] of the model's mean color: it normalizes to zeros, so a trained model should see nothing."""
    detector = _wrap(model).model
    mean = detector.pixel_mean.detach().float().cpu().view(3, 1, 1)
    if getattr(detector, "input_format", "RGB") == "BGR":
        mean = mean.flip(0)  # pixel_mean is in the backbone's channel order; images are RGB
    return mean.expand(3, height, width).clone()


def verification_images(cfg: DetectionConfig, model: nn.Module,
                        paths: Optional[Sequence[PathLike]] = None) -> list[VerificationImage]:
    """Images for ``--verify``, sized like the Predictor's inputs (``cfg.input.*_size_test``).

    ``paths`` (read with :func:`detkit.data.images.read_image`, resized by the Predictor's test-time
    transform, :func:`detkit.data.transforms.build_detection_transform`), else two
    generated scenes of other sizes than :func:`detkit.export.trace_size`'s; always followed by a
    :func:`blank_image` (the zero-detection case).
    """
    s, smax = cfg.input.min_size_test, cfg.input.max_size_test
    images = []
    transform = build_detection_transform(cfg.input, is_train=False)  # the Predictor's resize
    for path in paths or []:
        rgb = transform(read_image(path)).image
        images.append(VerificationImage(str(path), torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()))
    if not paths:
        for i, (h, w) in enumerate([(s, min(s * 5 // 4, smax)), (min(s * 3 // 2, smax), s)]):
            images.append(VerificationImage(f"generated scene {h}x{w}", synthetic_scene(h, w, seed=100 + i)))
    h, w = s - s // 16, min(s + s // 8, smax)
    images.append(VerificationImage(f"blank {h}x{w} (mean color)", blank_image(model, h, w)))
    return images
