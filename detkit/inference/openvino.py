"""Run a detector in OpenVINO, from detkit's own ONNX export, with the detector's inference contract.

:class:`OpenVINODetector` exports the model with :func:`~detkit.export.export_onnx` (the detector's
own ``predict``, traced; any image size), compiles it with OpenVINO's CPU plugin and answers
``predict(images, paste_masks=False)`` like :meth:`TwoStageDetector.predict`: one
:class:`~detkit.structures.Detections` per image, masks as unpasted ``[N, 1, M, M]`` probabilities.
:class:`detkit.Predictor` uses it for ``runtime="openvino"``; the resizing, the mask pasting and
the outputs stay the Predictor's.

OpenVINO is optional (``pip install -e ".[openvino]"``). Precision ``"fp32"`` compiles with
``INFERENCE_PRECISION_HINT=f32`` (OpenVINO's default on CPUs with native bf16 is bf16), ``"bf16"``
with ``bf16``. In fp32 the detections equal the PyTorch model's up to float rounding
(``tests/test_openvino_runtime.py``; ``benchmarks/bench_runtimes.py`` compares AP).

Example::

    detector = OpenVINODetector(model, precision="bf16")     # model: a TwoStageDetector, eval mode
    det = detector.predict([image_uint8_chw])[0]
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError
from ..models.detector import TwoStageDetector
from ..structures import Detections
from ..export.export import ExportError, export_onnx, synthetic_scene

__all__ = ["OpenVINODetector", "openvino_available", "OPENVINO_PRECISIONS"]

#: detkit precision -> OpenVINO ``INFERENCE_PRECISION_HINT``
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def openvino_available() -> bool:
    """True when the ``openvino`` package is installed."""
    return importlib.util.find_spec("openvino") is not None


class OpenVINODetector:
    """A :class:`TwoStageDetector` compiled by OpenVINO for the CPU (inference only).

    Args:
        model: the detector, weights loaded, on the CPU; exported as it is (fold BNs first for a
            smaller graph). It is not kept: later changes to it do not reach the compiled model.
        precision: ``"fp32"`` or ``"bf16"``.
        threads: OpenVINO's inference threads; default ``torch.get_num_threads()``.
        onnx_path: an ONNX file of this model exported by :func:`export_onnx` (e.g. by
            ``tools/export.py``) to compile instead of exporting again.
        sample_size: (H, W) of the synthetic image traced with (any size runs afterwards);
            :func:`~detkit.export.trace_size` of the config is a good choice.

    Attributes:
        precision, threads; ``mask_threshold`` and ``mask_paste`` of the model (for pasting);
        ``has_mask``; ``export_seconds`` and ``compile_seconds``.
    """

    def __init__(self, model: TwoStageDetector, precision: str = "fp32", threads: Optional[int] = None,
                 onnx_path: Optional[Path] = None, sample_size: tuple[int, int] = (480, 640)) -> None:
        import time

        if precision not in OPENVINO_PRECISIONS:
            raise UsageError(f"OpenVINODetector: precision must be one of {tuple(OPENVINO_PRECISIONS)}, got {precision!r}")
        if not openvino_available():
            raise UsageError("runtime='openvino' needs OpenVINO: pip install -e \".[openvino]\" (or pip install openvino)")
        device = next(iter(model.parameters())).device
        if device.type != "cpu":
            raise UsageError(f"runtime='openvino' runs on the CPU; the model is on {device} (use device='cpu')")
        import openvino as ov

        self.precision = precision
        self.threads = int(threads or torch.get_num_threads())
        self.mask_threshold, self.mask_paste = model.mask_threshold, model.mask_paste
        self.has_mask = bool(getattr(model.roi_heads, "has_mask", False))
        self.export_seconds = 0.0
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="detkit-openvino-") as tmp:
            if onnx_path is None:
                h, w = sample_size
                t0 = time.perf_counter()
                onnx_path = export_onnx(model, Path(tmp) / "model.onnx", synthetic_scene(h, w, seed=0))
                self.export_seconds = time.perf_counter() - t0
            elif not Path(onnx_path).is_file():
                raise ExportError(f"{onnx_path}: no such ONNX file; export it with tools/export.py --format onnx")
            t0 = time.perf_counter()
            self._compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
            })
            self.compile_seconds = time.perf_counter() - t0
        n_out = len(self._compiled.outputs)
        if n_out != (4 if self.has_mask else 3):
            raise ExportError(f"{onnx_path}: {n_out} outputs, expected {4 if self.has_mask else 3} for this "
                              f"{'Mask' if self.has_mask else 'Faster'} R-CNN; export this model again")
        self._request = self._compiled.create_infer_request()

    def predict(self, images: Sequence[Tensor], paste_masks: bool = False) -> list[Detections]:
        """uint8 (or float 0..255) ``[3, H, W]`` RGB images -> detections in their pixels (masks unpasted)."""
        if paste_masks:
            raise UsageError("OpenVINODetector.predict returns unpasted masks; paste them with "
                             "detkit.models.detector.rescale_detections (as the Predictor does)")
        out = []
        for image in images:
            x = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)  # (3, H, W) 0..255
            result = self._request.infer([x])
            arrays = [np.asarray(result[port]) for port in self._compiled.outputs]
            boxes, scores, labels = (torch.from_numpy(a.copy()) for a in arrays[:3])
            masks = torch.from_numpy(arrays[3].copy()) if self.has_mask else None
            out.append(Detections(boxes=boxes.float(), scores=scores.float(), labels=labels.long(), masks=masks))
        return out
