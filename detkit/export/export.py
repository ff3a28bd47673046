"""Producing the exported artifacts: TorchScript and ONNX files of a detector, and export.json.

:class:`ExportableDetector` is the traceable face of a :class:`TwoStageDetector` (one float
``[3, H, W]`` image in, plain tensors out); :func:`export_torchscript` and :func:`export_onnx`
trace it and write the files atomically (:func:`detkit.fileio.atomic_write`);
:func:`load_torchscript` and :func:`load_onnx` read them back.

What ``tools/export.py`` needs around that lives here too, so the tool is only a command line:
:func:`check_export_options` (arguments that cannot work, before anything heavy is loaded),
:func:`build_export_model` (the plain detector with its weights), :func:`trace_size` and
:func:`synthetic_scene` (the image traced with), :func:`export_to` (one format into the output
folder) and :func:`export_manifest` / :func:`write_manifest` (``export.json``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torchvision  # noqa: F401  (registers the ONNX symbolics of torchvision::nms / roi_align)
from torch import Tensor, nn

from ..checkpoint import is_weights_name, load_initial_weights
from ..config.schema import DetectionConfig
from ..data.classes import ClassInfo
from ..errors import DetkitError, UsageError
from ..fileio import atomic_write, write_json_atomic
from ..layers import fold_frozen_bn
from ..machine import resolve_device
from ..models.build import build_detector
from ..models.detector import TwoStageDetector
from ..models.roi_heads.mask_head import paste_masks_in_image

__all__ = [
    "DEFAULT_OPSET",
    "FILE_NAMES",
    "FORMATS",
    "MIN_OPSET",
    "ExportError",
    "ExportableDetector",
    "build_export_model",
    "check_export_options",
    "export_manifest",
    "export_onnx",
    "export_to",
    "export_torchscript",
    "load_onnx",
    "load_torchscript",
    "paste_masks",
    "split_overrides",
    "synthetic_scene",
    "trace_size",
    "write_manifest",
]

PathLike = Union[str, os.PathLike]

#: RoIAlign with ``aligned=True`` (Detectron2's ROIAlignV2) needs ONNX opset >= 16.
DEFAULT_OPSET = 17
MIN_OPSET = 16

INPUT_NAME = "image"
BOX_OUTPUTS = ("boxes", "scores", "labels")
MASK_OUTPUT = "masks"

#: ``--format`` choice -> the formats it writes
FORMATS: dict[str, tuple[str, ...]] = {"torchscript": ("torchscript",), "onnx": ("onnx",), "both": ("torchscript", "onnx")}
#: format -> file name in the output folder
FILE_NAMES: dict[str, str] = {"torchscript": "model.ts", "onnx": "model.onnx"}
#: the smallest image (pixels per side) worth tracing with
MIN_SAMPLE_SIDE = 32


class ExportError(DetkitError, RuntimeError):
    """An export or verification step failed; the message is one line saying what to do."""


def _unwrap(model: nn.Module) -> TwoStageDetector:
    if isinstance(model, ExportableDetector):
        return model.model
    if not isinstance(model, TwoStageDetector):
        raise ExportError(
            f"export: expected a TwoStageDetector (detkit.models.build.build_detector) or ExportableDetector, "
            f"got {type(model).__name__}"
        )
    fused = sorted({type(m).__name__ for m in model.modules() if type(m).__module__ == "detkit.inference.optimize"})
    if fused:
        raise ExportError(
            f"export: the model holds speed-optimized modules ({', '.join(fused)}) whose fused oneDNN kernels cannot "
            "be exported; export the plain model (build_export_model, or Predictor(..., optimize=False))"
        )
    return model


class ExportableDetector(nn.Module):
    """One image in, plain tensors out: the traceable face of a :class:`TwoStageDetector`.

    ``forward`` calls ``model.predict([image], paste_masks=False)`` (the detector's own inference
    path: eval mode, no gradients) and returns ``(boxes, scores, labels)``, plus ``masks`` float
    ``[N, 1, M, M]`` probabilities for Mask R-CNN. See :mod:`detkit.export` for the shapes.

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
        # the size-dependent computations are traced as graph values (see detkit.export).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return torch.jit.trace(wrapper, (sample,), check_trace=False)


def _prepare_path(path: PathLike) -> Path:
    """``path`` with its folder created (before the slow trace, so a bad --output fails at once)."""
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
        path: output file (e.g. ``model.ts``); its folder is created; written atomically.
        sample: float [3, H, W] RGB 0..255 image to trace with (any content; detections or not).

    Returns:
        the written path. The module runs on the device the model was on when traced.
    """
    wrapper = _wrap(model).eval()
    sample = _check_sample(sample, "export_torchscript").to(wrapper.model.device)
    path = _prepare_path(path)
    traced = _trace(wrapper, sample)
    with warnings.catch_warnings(), atomic_write(path, binary=True) as f:
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        torch.jit.save(traced, f)
    return path


def export_onnx(model: nn.Module, path: PathLike, sample: Tensor, opset: int = DEFAULT_OPSET) -> Path:
    """Export the detector to ONNX with dynamic image height and width.

    Uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) on the same
    traced code as :func:`export_torchscript`; NMS and RoIAlign become the ONNX
    ``NonMaxSuppression`` and ``RoiAlign`` operators (torchvision's registered symbolics).

    Args:
        model: a :class:`TwoStageDetector` or :class:`ExportableDetector`.
        path: output file (e.g. ``model.onnx``); its folder is created; written atomically.
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
    try:
        with warnings.catch_warnings(), torch.no_grad(), atomic_write(path, binary=True) as f:
            warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
            torch.onnx.export(
                wrapper, (sample,), f, dynamo=False, input_names=[INPUT_NAME], output_names=names,
                dynamic_axes=dynamic_axes, opset_version=int(opset), do_constant_folding=True,
            )
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("onnx", "onnxscript"):
            raise
        raise ExportError(f"{e.name} is not installed; run `pip install detkit[export]`") from None
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


# --------------------------------------------------------------------------- tools/export.py's steps
def split_overrides(values: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--verify-images a.jpg k=v``: argparse gives ``k=v`` to the images; -> (image paths, config overrides).

    A value is an override when it holds ``=`` and is not an existing file.
    """
    overrides = [v for v in values if "=" in v and not Path(v).is_file()]
    return [v for v in values if v not in overrides], overrides


def check_export_options(
    weights: PathLike,
    formats: Sequence[str],
    *,
    opset: int = DEFAULT_OPSET,
    device: str = "cpu",
    sample_size: Optional[Sequence[int]] = None,
    verify: bool = False,
    verify_images: Sequence[PathLike] = (),
) -> None:
    """Fail early, before loading anything heavy, on options that cannot work.

    Args are ``tools/export.py``'s flags (``formats``: the formats to write, e.g. ``("onnx",)``;
    ``sample_size``: (H, W) pixels). Raises :class:`UsageError` for a bad value and
    :class:`ExportError` when ``onnx`` (and, with ``verify``, ``onnxruntime``) is not installed
    for an ONNX export.
    """
    if not is_weights_name(weights) and not Path(weights).is_file():
        raise UsageError(f"--weights {weights}: no such file; pass a checkpoint such as runs/x/checkpoints/best.pth")
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: RoIAlign needs opset >= {MIN_OPSET}; use --opset {DEFAULT_OPSET}")
    for path in verify_images:
        if not Path(path).is_file():
            raise UsageError(f"--verify-images {path}: no such file")
    if sample_size is not None and min(sample_size) < MIN_SAMPLE_SIDE:
        raise UsageError(f"--sample-size {sample_size[0]} {sample_size[1]}: use at least "
                         f"{MIN_SAMPLE_SIDE} x {MIN_SAMPLE_SIDE} pixels")
    if "onnx" in formats:
        needed = ["onnx"] + (["onnxruntime"] if verify else [])
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"{' and '.join(missing)} not installed (needed for ONNX); run `pip install detkit[export]`")
    resolve_device(device)


def build_export_model(cfg: DetectionConfig, num_classes: int, weights: PathLike,
                       device: Union[str, torch.device] = "cpu") -> TwoStageDetector:
    """The plain detector (eval mode, BatchNorms folded) with ``weights``, on ``device``.

    The weights must fit fully (:func:`detkit.checkpoint.load_initial_weights` with
    ``training=False``; anything else is a one-line :class:`~detkit.checkpoint.CheckpointError`).
    Not the Predictor's speed-optimized model: its fused oneDNN kernels are neither traceable nor
    portable; the exported graph gets its own optimizations (TorchScript / onnxruntime).
    """
    model = build_detector(cfg, num_classes)
    load_initial_weights(model, cfg, os.fspath(weights), training=False)
    return fold_frozen_bn(model.eval()).to(device)


def trace_size(cfg: DetectionConfig, requested: Optional[Sequence[int]] = None) -> tuple[int, int]:
    """(H, W) of the image traced with: ``requested``, else about ``min_size_test`` x 4/3 of it.

    The default differs from every size :func:`detkit.export.verification_images` makes, so a
    verification shows that the export is not tied to the traced size.
    """
    if requested:
        return int(requested[0]), int(requested[1])
    s = cfg.input.min_size_test
    return s + s // 8, s * 4 // 3 + s // 16


def synthetic_scene(height: int, width: int, seed: int) -> Tensor:
    """A float32 [3, H, W] RGB 0..255 image: gray background, four colored rectangles and a green disc."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, height, width), 110.0)
    for _ in range(4):
        h = int(torch.randint(max(height // 6, 1), max(height // 2, 2), (1,), generator=g))
        w = int(torch.randint(max(width // 6, 1), max(width // 2, 2), (1,), generator=g))
        y0 = int(torch.randint(0, max(height - h, 1), (1,), generator=g))
        x0 = int(torch.randint(0, max(width - w, 1), (1,), generator=g))
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g) * 255
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = (yy - height * 0.6) ** 2 + (xx - width * 0.3) ** 2 < (min(height, width) * 0.15) ** 2
    img[:, disc] = torch.tensor([40.0, 200.0, 90.0])[:, None]
    return img


def export_to(model: nn.Module, fmt: str, output: PathLike, sample: Tensor, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` in ``fmt`` (``"torchscript"`` or ``"onnx"``) to ``output / FILE_NAMES[fmt]``; the path."""
    path = Path(output) / FILE_NAMES[fmt]
    if fmt == "torchscript":
        return export_torchscript(model, path, sample)
    return export_onnx(model, path, sample, opset=opset)


def export_manifest(
    cfg: DetectionConfig,
    classes: ClassInfo,
    model: nn.Module,
    files: dict[str, str],
    *,
    opset: Optional[int],
    traced_with_size: tuple[int, int],
    weights: PathLike,
) -> dict[str, Any]:
    """The contents of ``export.json`` (without ``verification``, which a verification adds).

    Args:
        cfg, classes: the exported config and its classes.
        model: the exported detector (:class:`TwoStageDetector` or :class:`ExportableDetector`).
        files: format -> file name written (``{"onnx": "model.onnx"}``).
        opset: the ONNX opset (recorded only when an ONNX file was written).
        traced_with_size: (H, W) of the traced sample.
        weights: the exported weights file.
    """
    wrapper = _wrap(model)
    return {
        "files": dict(files),
        "architecture": cfg.model.meta_architecture,
        "class_names": list(classes.names),
        "input": {
            "name": INPUT_NAME, "shape": ["3", "height", "width"], "dtype": "float32", "channels": "RGB",
            "range": [0, 255],
            "resize": {"min_size_test": cfg.input.min_size_test, "max_size_test": cfg.input.max_size_test},
        },
        "outputs": {
            "boxes": "float32 [N, 4] xyxy pixels of the input image",
            "scores": "float32 [N], decreasing",
            "labels": "int64 [N], index into class_names",
            **({"masks": "float32 [N, 1, M, M] probabilities; paste into the boxes, threshold mask_threshold"}
               if wrapper.has_mask else {}),
        },
        "mask_threshold": float(wrapper.model.mask_threshold),
        "opset": opset if "onnx" in files else None,
        "traced_with_size": list(traced_with_size),
        "weights": str(weights),
    }


def write_manifest(output: PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` to ``output / "export.json"`` atomically (indented JSON); the path."""
    return write_json_atomic(Path(output) / "export.json", manifest, indent=2)
