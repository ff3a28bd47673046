"""Everything that runs a trained detector on new images, in one package.

* :mod:`.predictor`: :class:`~detkit.inference.predictor.Predictor` (also ``detkit.Predictor``): config +
  weights -> detections on numpy images; the entry point of the Python API.
* :mod:`.optimize`: :func:`~detkit.inference.optimize.optimize_for_inference`, the CPU/GPU inference path
  (folded BN, channels-last, fused blocks, bf16, the conv kernel chosen from the CPU's flags).
* :mod:`.layers`: the fused modules that path is built from (prepacked convolutions and linears, casts).
* :mod:`.int8`: int8 post-training quantization (PT2E) of the backbone + FPN, RPN head and box head;
  calibration files (``tools/quantize.py``).
* :mod:`.openvino`: the ONNX export compiled by OpenVINO (``Predictor(runtime="openvino")``).
* :mod:`.runner`: images, folders and videos through a Predictor, in one process or sharded over
  ``torchrun`` processes (``tools/infer.py``); :mod:`.inputs` lists and reads its input, :mod:`.parts`
  keeps the per-process part files that make a run resumable.

Dataset evaluation (COCO AP of a model on a split) is :mod:`detkit.engine.evaluate`; exporting files
(TorchScript, ONNX) is :mod:`detkit.export`; the HTTP server is :mod:`detkit.serve`.

Importing this package loads nothing heavy; ``from detkit.inference import Predictor, Prediction`` works.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Predictor", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'detkit.inference' has no attribute {name!r}")
